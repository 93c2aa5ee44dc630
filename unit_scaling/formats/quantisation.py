"""Number formats (`FPFormat`), rounding to them (`quantise`) and casts to real dtypes
(`saturating_cast`).

**OCP vs FNUZ.** Two FP8 conventions exist. The OCP formats (H100, `ml_dtypes`
`float8_e4m3fn` and `float8_e5m2`) have bias 7/15: E4M3FN spends only the all-ones
code on NaN (max 448, no inf); E5M2 is IEEE-like (inf and NaN in the top exponent, max
57344). The Graphcore/AMD "FNUZ" formats (`float8_e4m3fnuz`, `float8_e5m2fnuz`) have
bias 8/16, no inf, and use the negative-zero code as NaN (max 240 / 57344). The PyTorch
reference's `FPFormat(4, 3)` / `FPFormat(5, 2)` simulate the FNUZ ones, and so do ours
(`FPFormat(e, m)` defaults to bias 2**(e-1) with every code finite). `FPFormat` fields
`bias` and `specials` describe any of them exactly.

**Clip before casting.** `x.astype(float8_e4m3fn)` turns anything above 464 into NaN
(the format has no inf) and `astype(float8_e5m2)` turns overflow into inf. Real casts
(`saturating_cast`) clip to the dtype's finite max first; `quantise` saturates too,
so simulate and real agree for every finite input (and ±inf maps to ±max in both).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

__all__ = [
    "FPFormat",
    "E4M3FN",
    "E5M2",
    "E4M3FNUZ",
    "E5M2FNUZ",
    "E2M1FN",
    "FP16",
    "BF16",
    "quantise",
    "quantise_fwd",
    "quantise_bwd",
    "saturating_cast",
]

_ROUNDINGS = ("nearest", "stochastic")
_SPECIALS = ("none", "nan", "ieee")

# (exponent_bits, mantissa_bits, bias, specials) -> name of the real dtype with exactly
# that value set (FNUZ's lack of -0 aside). tests/test_formats.py checks each entry
# against ml_dtypes.finfo.
_KNOWN_DTYPES = {
    (4, 3, 7, "nan"): "float8_e4m3fn",
    (5, 2, 15, "ieee"): "float8_e5m2",
    (4, 3, 8, "none"): "float8_e4m3fnuz",
    (5, 2, 16, "none"): "float8_e5m2fnuz",
    (4, 3, 11, "none"): "float8_e4m3b11fnuz",
    (4, 3, 7, "ieee"): "float8_e4m3",
    (3, 4, 3, "ieee"): "float8_e3m4",
    (2, 1, 1, "none"): "float4_e2m1fn",
    (2, 3, 1, "none"): "float6_e2m3fn",
    (3, 2, 3, "none"): "float6_e3m2fn",
    (5, 10, 15, "ieee"): "float16",
    (8, 7, 127, "ieee"): "bfloat16",
}
_SHORT_NAMES = {"float16": "FP16", "bfloat16": "BF16"}


def _lookup_dtype(name: str) -> np.dtype | None:
    if name == "float16":
        return np.dtype(np.float16)
    scalar_type = getattr(ml_dtypes, name, None)
    return None if scalar_type is None else np.dtype(scalar_type)


@dataclasses.dataclass(frozen=True)
class FPFormat:
    """A binary floating-point format: sign, `exponent_bits`, `mantissa_bits`.

    Fields:
      exponent_bits: 2..8.
      mantissa_bits: explicit mantissa (fraction) bits, 0..22 (quantise computes in
        float32, which has 23).
      rounding: "nearest" (round to nearest, ties to even) or "stochastic" (round up
        with probability equal to the distance from the lower neighbour, in units of
        the spacing; unbiased; `quantise` then needs a PRNG key).
      bias: exponent bias; None means 2**(exponent_bits-1), the PyTorch reference's
        convention (stored resolved, so `FPFormat(4, 3) == FPFormat(4, 3, bias=8)`).
      specials: which codes are not finite numbers.
        "none": every code is a number (FNUZ formats, whose NaN is the negative-zero
          code, and E2M1FN, which has no NaN): the top exponent holds finite values.
          The default, as in the reference.
        "nan": only the all-ones code (top exponent, all-ones mantissa) is NaN, as
          in OCP E4M3FN: the top exponent loses its largest mantissa.
        "ieee": the whole top exponent is inf/NaN (IEEE half, bfloat16, OCP E5M2).

    `FPFormat(e, m)` reproduces the reference: max = 2**(2**(e-1)-1) * (2 - 2**-m),
    min_normal = 2**(1 - 2**(e-1)), min_subnormal = min_normal * 2**-m. The format's
    normal range must lie inside float32's normal range ([2**-126, 2**128)).
    Frozen and hashable, so it can be a static argument of jit / custom_vjp.
    """

    exponent_bits: int
    mantissa_bits: int
    rounding: str = "nearest"
    bias: int | None = None
    specials: str = "none"

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        for field in ("exponent_bits", "mantissa_bits"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"FPFormat.{field} must be an int, got {value!r}")
        if not 2 <= e <= 8:
            raise ValueError(
                f"FPFormat.exponent_bits={e}: must be in [2, 8] (at least one normal "
                "exponent besides the subnormal one, and a range that fits float32)"
            )
        if not 0 <= m <= 22:
            raise ValueError(
                f"FPFormat.mantissa_bits={m}: must be in [0, 22] (quantise computes in "
                "float32, which has 23 mantissa bits)"
            )
        if self.rounding not in _ROUNDINGS:
            raise ValueError(
                f"FPFormat.rounding={self.rounding!r}: must be one of {_ROUNDINGS}"
            )
        if self.specials not in _SPECIALS:
            raise ValueError(
                f"FPFormat.specials={self.specials!r}: must be one of {_SPECIALS} "
                "('none': all codes finite (FNUZ, reference default); 'nan': only the "
                "all-ones code is NaN (OCP E4M3FN); 'ieee': top exponent is inf/NaN)"
            )
        if self.specials == "nan" and m == 0:
            raise ValueError(
                "FPFormat(specials='nan') needs mantissa_bits >= 1: with no mantissa "
                "the top exponent's only code would be NaN; use specials='ieee'"
            )
        if self.bias is None:
            object.__setattr__(self, "bias", 2 ** (e - 1))
        elif not isinstance(self.bias, (int, np.integer)) or isinstance(
            self.bias, bool
        ):
            raise ValueError(f"FPFormat.bias must be an int or None, got {self.bias!r}")
        object.__setattr__(self, "bias", int(self.bias))
        if self.min_exponent < -126 or self.max_exponent > 127:
            raise ValueError(
                f"FPFormat(exponent_bits={e}, bias={self.bias}, specials="
                f"{self.specials!r}): exponents 2**{self.min_exponent}..2**"
                f"{self.max_exponent} leave float32's normal range [2**-126, 2**127], "
                "in which quantise computes; choose a bias in "
                f"[{self._top_code - 127}, 127]"
            )

    @property
    def _top_code(self) -> int:
        """Largest biased exponent code holding finite values."""
        top = 2**self.exponent_bits - 1
        return top - 1 if self.specials == "ieee" else top

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal value (subnormals share its spacing)."""
        return 1 - self.bias  # type: ignore[operator]

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest finite value."""
        return self._top_code - self.bias  # type: ignore[operator]

    @property
    def max(self) -> float:
        """Largest finite value (exact)."""
        lost = 2 if self.specials == "nan" else 1  # "nan" loses the all-ones mantissa
        return 2.0**self.max_exponent * (2.0 - lost * 2.0**-self.mantissa_bits)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value (exact)."""
        return 2.0**self.min_exponent

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (exact)."""
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def bits(self) -> int:
        """Storage bits: sign + exponent + mantissa."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def dtype(self) -> np.dtype | None:
        """The real dtype with this value set (e.g. float8_e4m3fn), or None."""
        key = (self.exponent_bits, self.mantissa_bits, self.bias, self.specials)
        name = _KNOWN_DTYPES.get(key)
        return None if name is None else _lookup_dtype(name)

    def __str__(self) -> str:
        rounding = {"nearest": "RN", "stochastic": "SR"}[self.rounding]
        name = _KNOWN_DTYPES.get(
            (self.exponent_bits, self.mantissa_bits, self.bias, self.specials)
        )
        if name is not None:
            label = _SHORT_NAMES.get(name, name.split("_", 1)[-1].upper())
        else:
            label = f"E{self.exponent_bits}M{self.mantissa_bits}"
            if self.bias != 2 ** (self.exponent_bits - 1) or self.specials != "none":
                label += f"(bias={self.bias},specials={self.specials})"
        return f"{label}-{rounding}"


E4M3FN = FPFormat(4, 3, bias=7, specials="nan")
"""OCP E4M3 (H100 forward format): max 448, min normal 2^-6, min subnormal 2^-9."""
E5M2 = FPFormat(5, 2, bias=15, specials="ieee")
"""OCP E5M2 (H100 gradient format): max 57344, min normal 2^-14, min subnormal 2^-16."""
E4M3FNUZ = FPFormat(4, 3)
"""Graphcore/AMD E4M3 (the reference's FPFormat(4, 3)): max 240, 2^-7, 2^-10."""
E5M2FNUZ = FPFormat(5, 2)
"""Graphcore/AMD E5M2 (the reference's FPFormat(5, 2)): max 57344, 2^-15, 2^-17."""
E2M1FN = FPFormat(2, 1, bias=1)
"""OCP MX FP4: values 0, 0.5, 1, 1.5, 2, 3, 4, 6 (and negatives)."""
FP16 = FPFormat(5, 10, bias=15, specials="ieee")
"""IEEE half: max 65504, min normal 2^-14, min subnormal 2^-24."""
BF16 = FPFormat(8, 7, bias=127, specials="ieee")
"""bfloat16: float32's range with 8 significant bits."""


def _check_format(fmt: Any, where: str) -> FPFormat:
    if not isinstance(fmt, FPFormat):
        raise TypeError(f"{where}: fmt must be an FPFormat, got {fmt!r}")
    return fmt


def _check_floating(x: jax.Array, where: str) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: expects a floating-point array, got dtype {x.dtype}")


def _pow2(n: jax.Array) -> jax.Array:
    """Exact float32 2**n for int32 n in [-126, 127], built from the bits."""
    return lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def _scale(x: jax.Array, n: jax.Array, split: bool) -> jax.Array:
    """x * 2**n, exact while the result is a normal float32."""
    if not split:
        return x * _pow2(n)
    half = n >> 1  # floor(n / 2): both factors stay normal for |n| <= 252
    return x * _pow2(half) * _pow2(n - half)


def quantise(x: jax.Array, fmt: FPFormat, key: jax.Array | None = None) -> jax.Array:
    """Round `x` to the values of `fmt`; output dtype and shape equal the input's.

    Pure, elementwise and jit-safe (`fmt` is static Python data). Not meant to be
    differentiated (the gradient of rounding is zero almost everywhere): use
    `quantise_fwd` / `quantise_bwd` under autodiff.

    - `fmt.rounding == "nearest"`: round to nearest, ties to even (as IEEE and
      `ml_dtypes` casts). `key` is ignored.
    - `"stochastic"`: round to one of the two neighbours, up with probability equal
      to the distance from the lower one over their spacing, using `key` (required);
      unbiased below `fmt.max`.
    - Saturating: finite values beyond ±fmt.max, and ±inf, give ±fmt.max (never inf
      or NaN, unlike a bare fp8 cast). NaN stays NaN. Subnormals of `fmt` are exact.

    Computed in float32 (bf16/f16 inputs are exact there); the result is cast back to
    x.dtype, which rounds again only when `fmt` is finer than x.dtype. XLA:CPU
    flushes float32 denormals, so this never forms them: the spacing is applied as
    two power-of-two factors when a format's range needs it (BF16).
    """
    fmt = _check_format(fmt, "quantise")
    x = jnp.asarray(x)
    _check_floating(x, "quantise")
    if fmt.rounding == "stochastic" and key is None:
        raise ValueError(
            f"quantise: format {fmt} uses stochastic rounding and needs a PRNG key: "
            "quantise(x, fmt, key=jax.random.key(...))"
        )
    return _quantise(x, fmt, key)


# Jitted so that eager calls compile once per shape instead of once per primitive;
# inside an outer jit this is inlined.
@functools.partial(jax.jit, static_argnums=1)
def _quantise(x: jax.Array, fmt: FPFormat, key: jax.Array | None) -> jax.Array:
    m = fmt.mantissa_bits
    x32 = x.astype(jnp.float32)
    # Exponent from the bits (no float op, so denormal flushing cannot touch it);
    # clamped below at the format's min normal exponent (subnormals share its
    # spacing) and above just past its max exponent (everything beyond saturates).
    biased = (lax.bitcast_convert_type(x32, jnp.int32) >> 23) & 0xFF
    exponent = jnp.clip(biased - 127, fmt.min_exponent, fmt.max_exponent + 1)
    # r = x / spacing, with spacing = 2**(exponent - m): exact, |r| < 2**(m+1).
    shift = m - exponent
    split = max(m - fmt.min_exponent, fmt.max_exponent + 1 - m) > 126
    r = _scale(x32, shift, split)
    if fmt.rounding == "nearest":
        r = jnp.round(r)  # half to even
    else:
        u = jax.random.uniform(key, x.shape, jnp.float32)  # multiples of 2**-23
        floor = jnp.floor(r)
        r = floor + (u < r - floor).astype(jnp.float32)  # P(up) = frac(r), exactly
    y = _scale(r, -shift, split)
    return jnp.clip(y, -fmt.max, fmt.max).astype(x.dtype)


def _check_nearest(fmt: FPFormat, where: str) -> None:
    if fmt.rounding != "nearest":
        raise ValueError(
            f"{where}: format {fmt} uses stochastic rounding, which needs a PRNG key "
            "that this function has no way to receive; use rounding='nearest', or "
            "call quantise(x, fmt, key) inside your own custom_vjp"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _quantise_fwd(x: jax.Array, fmt: FPFormat) -> jax.Array:
    return quantise(x, fmt)


def _quantise_fwd_fwd(x: jax.Array, fmt: FPFormat) -> tuple[jax.Array, None]:
    return quantise(x, fmt), None


def _quantise_fwd_bwd(fmt: FPFormat, _: None, g: jax.Array) -> tuple[jax.Array]:
    return (g,)


_quantise_fwd.defvjp(_quantise_fwd_fwd, _quantise_fwd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _quantise_bwd(x: jax.Array, fmt: FPFormat) -> jax.Array:
    return x


def _quantise_bwd_fwd(x: jax.Array, fmt: FPFormat) -> tuple[jax.Array, None]:
    return x, None


def _quantise_bwd_bwd(fmt: FPFormat, _: None, g: jax.Array) -> tuple[jax.Array]:
    return (quantise(g, fmt),)


_quantise_bwd.defvjp(_quantise_bwd_fwd, _quantise_bwd_bwd)


def quantise_fwd(x: jax.Array, fmt: FPFormat) -> jax.Array:
    """Forward: `quantise(x, fmt)`; backward: the gradient passes through unchanged.

    Nearest rounding only (a stochastic format raises ValueError: there is no key).
    """
    fmt = _check_format(fmt, "quantise_fwd")
    _check_nearest(fmt, "quantise_fwd")
    x = jnp.asarray(x)
    _check_floating(x, "quantise_fwd")
    return _quantise_fwd(x, fmt)


def quantise_bwd(x: jax.Array, fmt: FPFormat) -> jax.Array:
    """Forward: `x` unchanged; backward: the cotangent is `quantise(g, fmt)`.

    The cotangent keeps x's dtype. Nearest rounding only (a stochastic format raises
    ValueError: there is no key).
    """
    fmt = _check_format(fmt, "quantise_bwd")
    _check_nearest(fmt, "quantise_bwd")
    x = jnp.asarray(x)
    _check_floating(x, "quantise_bwd")
    return _quantise_bwd(x, fmt)


def saturating_cast(x: jax.Array, dtype: Any) -> jax.Array:
    """Cast `x` to a real (e.g. float8) dtype, clipping to its finite max first.

    `dtype` is a dtype (jnp.float8_e4m3fn, ...) or an FPFormat with a `.dtype`.
    Without the clip, float8_e4m3fn turns overflow into NaN and float8_e5m2 into inf.
    ±inf gives ±max, NaN stays NaN. Not for use under autodiff as is: JAX
    differentiates astype by casting the cotangent to the same narrow dtype; call it
    inside a custom_vjp (as `matmul` does).
    """
    if isinstance(dtype, FPFormat):
        if dtype.dtype is None:
            raise ValueError(
                f"saturating_cast: format {dtype} has no real dtype; only these do: "
                f"{sorted(set(_KNOWN_DTYPES.values()))}. Use quantise() to simulate it"
            )
        dtype = dtype.dtype
    dtype = np.dtype(dtype)
    x = jnp.asarray(x)
    _check_floating(x, "saturating_cast")
    top = float(ml_dtypes.finfo(dtype).max)
    with np.errstate(over="ignore"):
        exact = float(np.asarray(top, dtype=x.dtype)) == top
    if not exact:
        x = x.astype(jnp.float32)  # x's dtype cannot hold the bound (bf16 -> f16)
    x = jnp.clip(x, -top, top)
    return x.astype(dtype)
