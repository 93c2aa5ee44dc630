"""Normalisation: `layer_norm` and `rms_norm`."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from unit_scaling.functional.base import Array, _lead, _share
from unit_scaling.scale import scale_bwd


def _normalise(x: Array, eps: float, centre: bool) -> Array:
    x32 = x.astype(jnp.float32)
    if centre:
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def layer_norm(
    x: Array,
    weight: Optional[Array] = None,
    bias: Optional[Array] = None,
    eps: float = 1e-5,
) -> Array:
    """Layer norm over the last axis, statistics in float32; output in x's dtype.

    Shapes: x `[..., d]`, weight and bias `[d]`. `B = x.size / d`.
    Forward: plain (a normalised output is unit-scaled already).
    Backward: `g_weight = g_bias = B^-1/2` (each is a sum over `B` rows).
    """
    batch = x.size // x.shape[-1]
    weight, bias = _share(x, "layer_norm", weight, bias)
    y = _normalise(x, eps, centre=True)
    if weight is not None:
        y = y * _lead(scale_bwd(weight, batch**-0.5).astype(jnp.float32), y.ndim)
    if bias is not None:
        y = y + _lead(scale_bwd(bias, batch**-0.5).astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)


def rms_norm(x: Array, weight: Optional[Array] = None, eps: float = 1e-5) -> Array:
    """RMS norm `x / (mean(x^2) + eps)^1/2 * weight` over the last axis (float32 stats).

    Shapes: x `[..., d]`, weight `[d]`. Forward: plain. Backward: `g_weight = B^-1/2`,
    `B = x.size / d`.
    """
    batch = x.size // x.shape[-1]
    (weight,) = _share(x, "rms_norm", weight)
    y = _normalise(x, eps, centre=False)
    if weight is not None:
        y = y * _lead(scale_bwd(weight, batch**-0.5).astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)
