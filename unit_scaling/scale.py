"""The two primitives every scaled op is made of, and the scale constraints.

`scale_fwd(x, s)` multiplies by `s` in the forward pass only; `scale_bwd(x, s)` multiplies
the gradient by `s` in the backward pass only. Both are one `jax.custom_vjp` whose scales
are static Python floats (computed from shapes at trace time), so XLA folds them into the
neighbouring kernels and they never become traced values.

A scaled op is `scale_bwd` on each input -> the plain JAX op -> `scale_fwd` on the output.
Where an op's input and output lie on a path that is not a cut-edge of the graph, the
output scale and the input-gradient scale must be equal or the gradients stop being
proportional to the true gradients; a *constraint* picks that one scale.

Imports only jax and the standard library, so any JAX project can reuse it.
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Callable, Optional, Union

import jax

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
