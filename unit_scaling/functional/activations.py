"""Nonlinearities: `gelu`, `silu`, the SwiGLU gate `silu_glu`, `softmax` and `dropout`."""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from unit_scaling.functional.base import Array, logarithmic_interpolation, _scale_elementwise
from unit_scaling.scale import Constraint, apply_constraint, scale_bwd, scale_fwd


def gelu(
    x: Array,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
    approximate: bool = False,
    scaled: bool = True,
) -> Array:
    """Unit-scaled GELU: `gelu(mult*x) / mult`, scaled.

    Forward: `li(a, 2, (2/(1-1/pi))^1/2)` with `a = 1/(1+0.25/mult^2)`.
    Backward: `g_x = li(a, 2, 2^1/2)`.
    Constraint: `to_output_scale`. `approximate=True` uses the tanh form.
    `scaled=False`: both scales 1, the plain GELU (the standard parametrization's).
    Computed in float32 whatever x's dtype, one cast in and one out each way: in
    bfloat16, XLA rounds every op of GELU's erf and its derivative to bfloat16 and
    back, and on CPU those casts made GELU's backward the largest elementwise cost of a
    bfloat16 BERT step.
    """
    alpha = 1 / (1 + 0.25 / mult**2)
    output_scale = logarithmic_interpolation(alpha, 2.0, (2 / (1 - 1 / math.pi)) ** 0.5)
    grad_input_scale = logarithmic_interpolation(alpha, 2.0, 2**0.5)
    if scaled:
        output_scale, grad_input_scale = apply_constraint(
            constraint, output_scale, grad_input_scale)
    else:
        output_scale = grad_input_scale = 1.0
    return _float32_pointwise(functools.partial(_gelu, mult=float(mult), approximate=approximate),
                              x, output_scale, grad_input_scale)


def _gelu(x: Array, mult: float, approximate: bool) -> Array:
    if mult == 1:
        return jax.nn.gelu(x, approximate=approximate)
    return jax.nn.gelu(x * mult, approximate=approximate) / mult


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 2, 3))
def _float32_pointwise(f: Callable[[Array], Array], x: Array, output_scale: float,
                       grad_input_scale: float) -> Array:
    """`f(x) * output_scale` with `f` run in float32 and the result cast back to x's
    dtype; backward `f'(x) * g * grad_input_scale`, recomputed from `x` in float32."""
    y = f(x.astype(jnp.float32))
    return (y if output_scale == 1.0 else y * output_scale).astype(x.dtype)


def _float32_pointwise_fwd(f, x, output_scale, grad_input_scale):
    return _float32_pointwise(f, x, output_scale, grad_input_scale), x


def _float32_pointwise_bwd(f, output_scale, grad_input_scale, x, g):
    del output_scale
    g32 = g.astype(jnp.float32)
    _, vjp = jax.vjp(f, x.astype(jnp.float32))
    (g_x,) = vjp(g32 if grad_input_scale == 1.0 else g32 * grad_input_scale)
    return (g_x.astype(x.dtype),)


_float32_pointwise.defvjp(_float32_pointwise_fwd, _float32_pointwise_bwd)


def _silu(x: Array, mult: float) -> Array:
    return jax.nn.silu(x) if mult == 1 else x * jax.nn.sigmoid(x * mult)


def silu(x: Array, mult: float = 1.0, constraint: Constraint = "to_output_scale") -> Array:
    """Unit-scaled SiLU (swish): `x * sigmoid(mult*x)`, scaled.

    Forward: `li(1/(1+0.25/mult^2), 2, (2/(1-1/pi))^1/2)`.
    Backward: `g_x = li(1/(1+1/mult^2), 2, 2^1/2)`.
    Constraint: `to_output_scale`.
    """
    output_scale = logarithmic_interpolation(
        1 / (1 + 0.25 / mult**2), 2.0, (2 / (1 - 1 / math.pi)) ** 0.5
    )
    grad_input_scale = logarithmic_interpolation(1 / (1 + 1 / mult**2), 2.0, 2**0.5)
    return _scale_elementwise(
        lambda x: _silu(x, mult), x, output_scale, grad_input_scale, constraint
    )


def silu_glu(x: Array, gate: Array, mult: float = 1.0, scaled: bool = True) -> Array:
    """Unit-scaled SwiGLU gate `x * gate * sigmoid(mult*gate)`.

    Shapes: x and gate equal; output the same.
    Forward and backward (`g_x`, `g_gate`): `s = li(1/(1+1/mult^2), 2, 2^1/2)`.
    No constraint: both inputs and the output share the one scale.
    `scaled=False`: `s = 1`, the plain gate (the standard parametrization's).
    One fused pass each way: the backward recomputes the sigmoid from `x` and `gate`
    (matmul outputs, kept anyway) where autodiff kept each intermediate, and XLA:CPU
    ran the gate as three `[tokens, mlp]` passes forward and more backward.
    """
    s = logarithmic_interpolation(1 / (1 + 1 / mult**2), 2.0, 2**0.5) if scaled else 1.0
    return _silu_glu(x, gate, float(mult), s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _silu_glu(x: Array, gate: Array, mult: float, scale: float) -> Array:
    # In float32, one cast in and one out (as `gelu`: not a bfloat16 round trip per op).
    y = x.astype(jnp.float32) * _silu(gate.astype(jnp.float32), mult)
    return (y * scale if scale != 1.0 else y).astype(jnp.result_type(x, gate))


def _silu_glu_fwd(x, gate, mult, scale):
    return _silu_glu(x, gate, mult, scale), (x, gate)


def _silu_glu_bwd(mult, scale, res, g):
    x, gate = res
    x32, gate32, g32 = (t.astype(jnp.float32) for t in (x, gate, g))
    sig = jax.nn.sigmoid(gate32 * mult if mult != 1.0 else gate32)
    if scale != 1.0:
        g32 = g32 * scale
    # d/dgate [gate * sigmoid(m gate)] = sigmoid * (1 + m gate (1 - sigmoid))
    g_x = g32 * (gate32 * sig)
    g_gate = g32 * x32 * (sig * (1 + mult * gate32 * (1 - sig)))
    return g_x.astype(x.dtype), g_gate.astype(gate.dtype)


_silu_glu.defvjp(_silu_glu_fwd, _silu_glu_bwd)


def softmax(
    x: Array,
    axis: int = -1,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
) -> Array:
    """Unit-scaled softmax of `mult * x` along `axis` (computed in float32).

    `n = x.shape[axis]`, `a = 1/(1+4/mult^2)`.
    Forward: `li(a, n, n^1/2)` (flat limit `n`, one-hot limit `n^1/2`).
    Backward: `g_x = li(a, n/mult, (n/mult)^1/2)`.
    Constraint: `to_output_scale`.

    The fit is empirical (the reference's). For unit-normal x, output and gradient RMS
    are within 0.1 of 1 for mult <= 1/4, for n <= 128 at mult <= 2, and for mult >= 4
    at n >= 512; they fall to about 0.8 at n = 64..128, mult = 8 and to about 0.71 at
    n = 4096, mult = 1..2.
    """
    n = x.shape[axis]
    alpha = 1 / (1 + 4 / mult**2)
    output_scale = logarithmic_interpolation(alpha, n, n**0.5)
    grad_input_scale = logarithmic_interpolation(alpha, n / mult, (n / mult) ** 0.5)

    def f(x):
        return jax.nn.softmax(x.astype(jnp.float32) * mult, axis=axis).astype(x.dtype)

    return _scale_elementwise(f, x, output_scale, grad_input_scale, constraint)


def dropout(
    x: Array,
    rate: float,
    key: Optional[Array] = None,
    deterministic: bool = False,
) -> Array:
    """Unit-scaled dropout: keeps each element with probability `1-rate`.

    Training: `x * mask / (1-rate)^1/2` (inverted dropout times `(1-rate)^1/2`), so the
    output RMS equals the input RMS. `deterministic=True`: `x * (1-rate)^1/2`, the same
    expectation as training.
    Forward and backward scale: `(1-rate)^1/2` on top of inverted dropout.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return x
    s = (1 - rate) ** 0.5
    if deterministic:
        return scale_fwd(scale_bwd(x, s), s)
    if key is None:
        raise ValueError("dropout needs a PRNG `key` unless deterministic=True")
    keep = jax.random.bernoulli(key, 1 - rate, x.shape)
    x = scale_bwd(x, s)
    return scale_fwd(jnp.where(keep, x / (1 - rate), jnp.zeros_like(x)), s)
