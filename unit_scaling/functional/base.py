"""What every op family of `unit_scaling.functional` shares: the interpolation of the
fitted rules, `rms`, and the helpers that broadcast, share parameters over `jax.vmap`
and scale an elementwise op."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from unit_scaling import formats as formats_lib
from unit_scaling.scale import (
    Constraint,
    apply_constraint,
    scale_bwd,
    scale_fwd,
    share_over_vmap,
)

Array = jax.Array
FormatPolicy = Optional[formats_lib.FormatPolicy]


def logarithmic_interpolation(alpha: float, lower: float, upper: float) -> float:
    """`exp(alpha*ln(upper) + (1-alpha)*ln(lower))`: `lower` at 0, `upper` at 1.

    Interpolates between two limits with constant ratio; the fitted rules of `gelu`,
    `silu`, `softmax` and attention use it to move between the regimes of small and
    large `mult`.
    """
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))


def rms(
    x: Array,
    axis: Optional[int | Sequence[int]] = None,
    keepdims: bool = False,
    eps: float = 0.0,
) -> Array:
    """`sqrt(mean(x^2) + eps)` over `axis`, computed in float32, returned in x's dtype."""
    mean_sq = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=keepdims)
    return jnp.sqrt(mean_sq + eps).astype(x.dtype)


def _lead(x: Array, ndim: int) -> Array:
    """`x` with leading unit axes up to `ndim`: explicit broadcasting, so the ops also
    run under `jax_numpy_rank_promotion="raise"`."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _share(input: Array, op: str, *params: Optional[Array]) -> tuple[Optional[Array], ...]:
    """The op's parameters through `share_over_vmap`: their gradient scale also counts
    the rows of the `jax.vmap` axes they are shared across (module docstring)."""
    return tuple(None if p is None else share_over_vmap(p, input, op) for p in params)


def _scale_elementwise(
    f: Callable[[Array], Array],
    x: Array,
    output_scale: float,
    grad_input_scale: float,
    constraint: Constraint,
) -> Array:
    output_scale, grad_input_scale = apply_constraint(
        constraint, output_scale, grad_input_scale
    )
    return scale_fwd(f(scale_bwd(x, grad_input_scale)), output_scale)
