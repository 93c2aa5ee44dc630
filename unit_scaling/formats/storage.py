"""Storing a tensor in 8 (or 16) bits: `store` -> `Stored` -> `Stored.dequantise`.

Post-training quantisation keeps weights (and a KV cache) in a narrow format and
computes in the compute dtype: `store(x, fmt, scaling, reduce_axes)` rounds `x` to
`fmt` and keeps the narrow array itself (`Stored.values`, 1 byte per element for fp8
and int8) with its scales; `Stored.dequantise()` gives back `values * scale` in float32.
Where the hardware has no 8-bit matmul (CPU) this is simulated quantisation: the
numbers are exactly those of the format, and `Stored.nbytes` is what storing them costs.

Formats (`STORAGE_FORMATS`):
  "bf16": bfloat16, round to nearest even; no scale (`scaling` must be "none").
  "fp8":  OCP E4M3FN (max 448, smallest normal 2^-6, smallest subnormal 2^-9), via
          `saturating_cast` (clipped, nearest even; equal to `quantise(x, E4M3FN)`).
  "int8": round(x / scale) clipped to [-127, 127] (symmetric; -128 unused).

Scalings (`SCALINGS`):
  "none" (a plain cast): fp8 and bf16 store `x` itself. int8 has no plain cast (its
    grid is the integers), so "none" means one fixed scale that does not look at the
    tensor: `PLAIN_INT8_SCALE = 4/127`, i.e. the int8 range is mapped to +-4, the
    absmax assumed for a unit-RMS tensor (4 sigma of a unit normal). Only tensors near
    RMS 1 (unit-scaled, u-μP) are meant to survive it; a std-0.02 tensor keeps about
    1.5 steps of its grid.
  "per_channel": one float32 scale per channel, `absmax / max` of the format (448 for
    fp8, 127 for int8), the absmax taken over `reduce_axes` (a kernel's fan-in axes:
    one scale per output channel). A channel of zeros gets scale 1.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.formats.quantisation import E4M3FN, saturating_cast

__all__ = ["PLAIN_INT8_SCALE", "SCALINGS", "STORAGE_FORMATS", "Stored", "round_trip", "store"]

STORAGE_FORMATS = ("bf16", "fp8", "int8")
SCALINGS = ("none", "per_channel")

INT8_MAX = 127
PLAIN_INT8_SCALE = 4.0 / INT8_MAX
"""int8's "plain cast": +-127 mapped to +-4, the absmax assumed of a unit-RMS tensor."""

_MAX = {"fp8": E4M3FN.max, "int8": float(INT8_MAX)}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stored:
    """A tensor stored in `fmt`: `values` (bfloat16, float8_e4m3fn or int8, the
    tensor's shape) and `scale` (float32, broadcastable to `values`; None: no scale).
    A pytree (values and scale are leaves), so it passes through `jit`."""

    values: jax.Array
    scale: Optional[jax.Array]
    fmt: str = dataclasses.field(metadata=dict(static=True))

    def dequantise(self, dtype=jnp.float32) -> jax.Array:
        """`values * scale` in `dtype` (the product is formed in float32)."""
        x = self.values.astype(jnp.float32)
        if self.scale is not None:
            x = x * self.scale
        elif self.fmt == "int8":
            x = x * PLAIN_INT8_SCALE
        return x.astype(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values and scales."""
        scale = 0 if self.scale is None else int(np.prod(self.scale.shape)) * 4
        return int(np.prod(self.values.shape)) * self.values.dtype.itemsize + scale


def _check(fmt: str, scaling: str) -> None:
    if fmt not in STORAGE_FORMATS:
        raise ValueError(f"storage format {fmt!r}: use one of {STORAGE_FORMATS}")
    if scaling not in SCALINGS:
        raise ValueError(f"scaling {scaling!r}: use one of {SCALINGS}")
    if fmt == "bf16" and scaling != "none":
        raise ValueError("bf16 storage takes no scale: use scaling='none'")


def store(x: jax.Array, fmt: str, scaling: str = "none",
          reduce_axes: Sequence[int] = (0,)) -> Stored:
    """`x` (float) stored in `fmt` with `scaling` (see the module docstring).
    `reduce_axes`: the axes each per-channel absmax is taken over (ignored for "none").
    Jit-safe; not differentiable (inference only)."""
    _check(fmt, scaling)
    x = jnp.asarray(x, jnp.float32)
    if fmt == "bf16":
        return Stored(x.astype(jnp.bfloat16), None, fmt)
    scale = None
    if scaling == "per_channel":
        absmax = jnp.max(jnp.abs(x), axis=tuple(reduce_axes), keepdims=True)
        scale = jnp.where(absmax > 0, absmax / _MAX[fmt], 1.0).astype(jnp.float32)
    scaled = x if scale is None else x / scale
    if fmt == "fp8":
        return Stored(saturating_cast(scaled, E4M3FN), scale, fmt)
    if scale is None:
        scaled = x / PLAIN_INT8_SCALE
    ints = jnp.clip(jnp.round(scaled), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Stored(ints, scale, fmt)


def round_trip(x: jax.Array, fmt: str, scaling: str = "none",
               reduce_axes: Sequence[int] = (0,)) -> jax.Array:
    """`store(x, ...).dequantise(x.dtype)`: the values a model reading the stored tensor
    computes with (simulated quantisation)."""
    return store(x, fmt, scaling, reduce_axes).dequantise(jnp.asarray(x).dtype)
