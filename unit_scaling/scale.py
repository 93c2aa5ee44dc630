"""The two primitives every scaled op is made of, and the scale constraints.

`scale_fwd(x, s)` multiplies by `s` in the forward pass only; `scale_bwd(x, s)` multiplies
the gradient by `s` in the backward pass only. Both are one `jax.custom_vjp` whose scales
are static Python floats (computed from shapes at trace time), so XLA folds them into the
neighbouring kernels and they never become traced values.

A scaled op is `scale_bwd` on each input -> the plain JAX op -> `scale_fwd` on the output.
Where an op's input and output lie on a path that is not a cut-edge of the graph, the
output scale and the input-gradient scale must be equal or the gradients stop being
proportional to the true gradients; a *constraint* picks that one scale.

`scale_traced(x, fwd, bwd)` is the same pair of scales for scales that are traced values
(e.g. a per-layer residual weight fed to `nn.scan` as a scanned input).

`share_over_vmap(param, input)` is the hook that makes weight-gradient scales see the
batch of a `jax.vmap` (see `vmap_reduction` and the `unit_scaling.functional` docstring).

Imports only jax and the standard library, so any JAX project can reuse it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from numbers import Real
from typing import Callable, Iterator, Optional, Union

import jax
import jax.custom_batching
import jax.numpy as jnp

__all__ = [
    "CONSTRAINTS",
    "Constraint",
    "VMAP_REDUCTIONS",
    "amean",
    "apply_constraint",
    "gmean",
    "hmean",
    "scale_bwd",
    "scale_fwd",
    "scale_traced",
    "share_over_vmap",
    "to_grad_input_scale",
    "to_left_grad_scale",
    "to_output_scale",
    "to_right_grad_scale",
    "vmap_reduction",
]


def __dir__() -> list[str]:
    """`dir(module)` lists the public API, not the imported jax/numpy modules."""
    return sorted(__all__)

Constraint = Optional[Union[str, Callable[..., float]]]


def _static_scale(scale, name: str) -> float:
    if isinstance(scale, jax.core.Tracer) or isinstance(scale, jax.Array):
        raise TypeError(
            f"{name} must be a static Python float computed from shapes, got a "
            f"{type(scale).__name__}. Scales are folded into the graph at trace time; "
            "pass a learned or traced multiplier as an ordinary array argument and "
            "multiply by it instead."
        )
    if not isinstance(scale, Real):
        raise TypeError(f"{name} must be a real number, got {scale!r}")
    return float(scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _scale(x: jax.Array, fwd: float, bwd: float) -> jax.Array:
    return x * fwd if fwd != 1.0 else x


def _scale_fwd_rule(x, fwd, bwd):
    return _scale(x, fwd, bwd), None


def _scale_bwd_rule(fwd, bwd, _, g):
    # A Python float is weakly typed: the cotangent keeps the primal's dtype.
    return (g * bwd if bwd != 1.0 else g,)


_scale.defvjp(_scale_fwd_rule, _scale_bwd_rule)


def scale_fwd(x: jax.Array, scale: float) -> jax.Array:
    """`scale * x` in the forward pass; the gradient passes through unchanged.

    Args:
      x: any floating array; the output has its shape and dtype.
      scale: a static Python float.
    """
    return _scale(x, _static_scale(scale, "scale_fwd scale"), 1.0)


def scale_bwd(x: jax.Array, scale: float) -> jax.Array:
    """`x` unchanged in the forward pass; the gradient is multiplied by `scale`.

    Args:
      x: any floating array; the output has its shape and dtype, and so does the
        gradient.
      scale: a static Python float.
    """
    return _scale(x, 1.0, _static_scale(scale, "scale_bwd scale"))


def scale_traced(x: jax.Array, fwd: jax.Array | float, bwd: jax.Array | float) -> jax.Array:
    """`fwd * x` in the forward pass and `bwd * g` in the backward pass, for scales that
    may be traced scalars (e.g. a layer's residual weight under `nn.scan`, where the
    layer index is not static).

    Args:
      x: any floating array; the output and its gradient have its shape and dtype.
      fwd, bwd: scalar arrays or Python floats. They receive zero cotangents: a scale
        is a constant of the model, not something to differentiate.

    Unlike `scale_fwd`/`scale_bwd`, a Python float here is multiplied in even when it
    is 1, and XLA cannot fold a traced scale into the neighbouring kernels: prefer the
    static pair where the scale is known at trace time.
    """
    return _traced(x, fwd, bwd)


@jax.custom_vjp
def _traced(x, fwd, bwd):
    return (x * fwd).astype(x.dtype)


def _traced_fwd(x, fwd, bwd):
    return _traced(x, fwd, bwd), (fwd, bwd)


def _traced_bwd(res, g):
    fwd, bwd = res
    return (g * bwd).astype(g.dtype), jnp.zeros_like(fwd), jnp.zeros_like(bwd)


_traced.defvjp(_traced_fwd, _traced_bwd)


# Constraints: each takes the op's scales `(output_scale, *grad_input_scales)` and returns
# the one scale that all of them are set to.


def gmean(*scales: float) -> float:
    """Geometric mean of the scales (the usual compromise for unit scaling)."""
    return math.prod(scales) ** (1 / len(scales))


def hmean(*scales: float) -> float:
    """Harmonic mean of the scales (as in Glorot/Xavier initialisation)."""
    return len(scales) / sum(1 / s for s in scales)


def amean(*scales: float) -> float:
    """Arithmetic mean of the scales."""
    return sum(scales) / len(scales)


def to_output_scale(output_scale: float, *grad_input_scales: float) -> float:
    """The output scale: the forward pass stays unit-scaled (the default)."""
    return output_scale


def to_grad_input_scale(output_scale: float, grad_input_scale: float) -> float:
    """The (single) input-gradient scale: the backward pass stays unit-scaled."""
    return grad_input_scale


def to_left_grad_scale(
    output_scale: float, left_grad_scale: float, right_grad_scale: float
) -> float:
    """For a binary op such as matmul: the left operand's gradient scale."""
    return left_grad_scale


def to_right_grad_scale(
    output_scale: float, left_grad_scale: float, right_grad_scale: float
) -> float:
    """For a binary op such as matmul: the right operand's gradient scale."""
    return right_grad_scale


CONSTRAINTS = {
    f.__name__: f
    for f in (
        gmean,
        hmean,
        amean,
        to_output_scale,
        to_grad_input_scale,
        to_left_grad_scale,
        to_right_grad_scale,
    )
}


def apply_constraint(constraint: Constraint, *scales: float) -> tuple[float, ...]:
    """Applies `constraint` to a group of scales.

    Args:
      constraint: None (every scale kept as it is), the name of a constraint in
        `CONSTRAINTS`, or a callable `(*scales) -> float`.
      *scales: `(output_scale, *grad_input_scales)`.

    Returns:
      The scales, all set to the chosen one unless `constraint` is None.
    """
    if constraint is None:
        return scales
    if isinstance(constraint, str):
        if constraint not in CONSTRAINTS:
            raise ValueError(
                f"unknown constraint {constraint!r}; use None or one of "
                f"{sorted(CONSTRAINTS)}"
            )
        constraint = CONSTRAINTS[constraint]
    scale = constraint(*scales)
    return tuple(scale for _ in scales)


# ------------------------------------------------------------------ vmapped batches

VMAP_REDUCTIONS = ("sum", "mean", "none")
_VMAP_REDUCTION: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "unit_scaling_vmap_reduction", default=None
)


@contextlib.contextmanager
def vmap_reduction(reduction: str) -> Iterator[None]:
    """Says how per-example results computed under `jax.vmap` are reduced, so that the
    weight-gradient scales of the ops traced inside see the whole batch.

    - "sum": the caller sums the per-example losses (or per-example gradients): every
      vmapped axis of size `n` over which a parameter is shared counts as batch, and
      the parameter's gradient is multiplied by `n^-1/2`. Gradients then equal those of
      the same model written batched.
    - "mean": the caller averages them, which divides every gradient by `n`; the
      parameter's gradient is multiplied by `n^1/2` instead, so parameter gradients
      again equal the batched ones. Activation gradients stay `n` times smaller, which
      low-precision gradient formats round differently: prefer "sum", with the mean
      taken in the forward pass only (`scale_fwd(jnp.sum(losses), 1 / n)`, as
      `U.cross_entropy`'s "mean" does).
    - "none": the lanes are independent problems (per-example gradients used one by
      one, ensembles): each keeps the batch it sees.

    Read when the ops are traced (the forward pass), like any Python state under `jit`.
    Without it, differentiating an op whose parameter is shared across a vmapped axis
    raises a ValueError that names the op and the axis size, rather than silently using
    the per-example batch.
    """
    if reduction not in VMAP_REDUCTIONS:
        raise ValueError(f"vmap_reduction must be one of {VMAP_REDUCTIONS}, got {reduction!r}")
    token = _VMAP_REDUCTION.set(reduction)
    try:
        yield
    finally:
        _VMAP_REDUCTION.reset(token)


def share_over_vmap(param: jax.Array, input: jax.Array, op: str = "op") -> jax.Array:
    """`param` unchanged; for every `jax.vmap` axis of size `n` over which `input` is
    batched and `param` is not, the gradient of `param` is multiplied by `n^-1/2`
    ("sum"), `n^1/2` ("mean") or 1 ("none"), as set by `vmap_reduction`.

    The scaled ops call it on their parameters (kernels, biases, tables, norm gains),
    whose gradient scale `B^-1/2` counts the rows summed into the parameter: this adds
    the vmapped rows the op cannot see in its shapes. The axis sizes come from a
    `jax.custom_batching.custom_vmap` rule in the backward pass, so the vmap is seen
    through `jit`, `scan`, `remat` and nested vmaps. Outside vmap it is the identity
    in both passes (no arithmetic is added).
    """
    return _share(param, input, _VMAP_REDUCTION.get(), op)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _share(param, input, reduction, op):
    return param


def _probe(x: jax.Array) -> jax.Array:
    """An empty float array that is batched exactly where `x` is."""
    return x.reshape(-1)[:0].astype(jnp.float32)


def _share_fwd(param, input, reduction, op):
    return param, (_probe(input), _probe(param))


def _share_bwd(reduction, op, res, g):
    return _lane_scale(reduction, op)(g, *res), None


_share.defvjp(_share_fwd, _share_bwd)


@functools.lru_cache(maxsize=None)
def _lane_scale(reduction: Optional[str], op: str):
    """`g` unchanged outside vmap; one vmap level's factor per rule application."""

    @jax.custom_batching.custom_vmap
    def lane_scale(g, input_probe, param_probe):
        return g

    @lane_scale.def_vmap
    def rule(axis_size, in_batched, g, input_probe, param_probe):
        g_batched, input_batched, param_batched = in_batched
        if input_batched and not param_batched:
            if reduction is None:
                raise ValueError(
                    f"unit_scaling: {op}'s parameter is shared across a jax.vmap axis of "
                    f"size {axis_size}, so its gradient scale needs the batch the vmap "
                    "hides. Say how the per-example results are reduced, around the "
                    "code that traces the model: `with unit_scaling.scale.vmap_reduction"
                    "('sum')` (losses summed), 'mean' (averaged) or 'none' (independent "
                    "lanes: per-example gradients, ensembles)."
                )
            factor = {"sum": axis_size**-0.5, "mean": axis_size**0.5, "none": 1.0}[reduction]
            g = g * factor if factor != 1.0 else g
        out = lane_scale(
            g,
            input_probe[0] if input_batched else input_probe,
            param_probe[0] if param_batched else param_probe,
        )
        return out, g_batched

    return lane_scale
