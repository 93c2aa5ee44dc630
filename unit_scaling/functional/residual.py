"""Additions: `add` and the residual branch ops (`residual_split`, `residual_add`,
`residual_apply`) with the transformer's tau rule."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.functional.base import Array, _lead
from unit_scaling.scale import Constraint, apply_constraint, scale_bwd, scale_fwd


def add(a: Array | float, b: Array | float, constraint: Constraint = "to_output_scale") -> Array:
    """Unit-scaled addition `(a + b) * 2^-1/2`.

    A Python scalar operand gives a plain add. Where an operand has a single element,
    the output scale is 1 (adding a constant does not change scale).
    Backward: `g_a = f_a^-1/2`, `g_b = f_b^-1/2`, `f_i` = the factor by which
    broadcasting grows operand `i` (its gradient is a sum of `f_i` terms).
    Constraint: `to_output_scale` (all three scales equal).
    """
    if not isinstance(a, jax.Array | np.ndarray) or not isinstance(b, jax.Array | np.ndarray):
        return a + b
    out_size = math.prod(jnp.broadcast_shapes(a.shape, b.shape))
    output_scale = 1.0 if (a.size == 1 or b.size == 1) else 2**-0.5
    output_scale, a_grad_scale, b_grad_scale = apply_constraint(
        constraint,
        output_scale,
        (out_size // a.size) ** -0.5,
        (out_size // b.size) ** -0.5,
    )
    ndim = max(a.ndim, b.ndim)
    a, b = _lead(scale_bwd(a, a_grad_scale), ndim), _lead(scale_bwd(b, b_grad_scale), ndim)
    return scale_fwd(a + b, output_scale)


def residual_split(x: Array, tau: float = 1.0) -> tuple[Array, Array]:
    """Splits `x` into `(residual, skip)` before a residual branch with weight `tau`.

    Forward: two identity copies.
    Backward: `g_x = tau/(1+tau^2)^1/2 * g_residual + 1/(1+tau^2)^1/2 * g_skip`, so the
    gradient into a unit-scaled branch is delayed to the split and stays unit-scaled.
    Use with `residual_add` and the same `tau`.
    """
    denom = (1 + tau**2) ** 0.5
    return scale_bwd(x, tau / denom), scale_bwd(x, 1 / denom)


def residual_add(residual: Array, skip: Array, tau: float = 1.0) -> Array:
    """Merges a residual branch: `tau/(1+tau^2)^1/2 * residual + 1/(1+tau^2)^1/2 * skip`.

    For unit-scaled, uncorrelated inputs the output is unit-scaled; `tau` is the ratio
    of the branch's contribution to the skip's. Backward: identity to both inputs
    (their scale was applied at `residual_split`).
    """
    denom = (1 + tau**2) ** 0.5
    return scale_fwd(residual, tau / denom) + scale_fwd(skip, 1 / denom)


def residual_apply(fn: Callable[[Array], Array], x: Array, tau: float = 1.0) -> Array:
    """`residual_add(fn(residual), skip, tau)` with `residual, skip = residual_split(x, tau)`."""
    residual, skip = residual_split(x, tau)
    return residual_add(fn(residual), skip, tau)


def transformer_residual_scaling_rule(
    residual_mult: float = 1.0, residual_attn_ratio: float = 1.0
) -> Callable[[int, int], float]:
    """The u-μP rule for the `tau` of each residual branch of a transformer.

    Returns `tau(index, layers)` where `layers = N` is the number of residual branches
    (2 per transformer layer: even index = attention, odd = MLP). With
    `alpha_mlp = residual_mult * (2/(1+residual_attn_ratio^2))^1/2` and
    `alpha_attn = residual_attn_ratio * alpha_mlp`, branch `i` gets
    `tau_i = alpha_i / (N/2 + n_attn(i)*alpha_attn^2 + n_mlp(i)*alpha_mlp^2)^1/2` with
    `n_attn(i) = (i+1)//2`, `n_mlp(i) = i//2` branches before it. Then every attention
    branch contributes equally, every MLP branch equally, all residual branches together
    contribute `residual_mult` times the embedding (in variance), attention vs MLP in the
    ratio `residual_attn_ratio` (u-μP paper, Appendix G).
    """
    alpha_mlp = residual_mult * (2 / (1 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp

    def tau(index: int, layers: int) -> float:
        n_attn, n_mlp = (index + 1) // 2, index // 2
        alpha = alpha_attn if index % 2 == 0 else alpha_mlp
        return alpha / (layers / 2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5

    return tau
