"""Low-precision number formats: simulated quantisation and real FP8 casts.

Two ways to run a model in a narrow format, picked by one `FormatPolicy`:

- **Simulate** (`real=False`, works on CPU/TPU/GPU): values are rounded to the format
  with `quantise` but keep their compute dtype (float32/bfloat16), so every backend
  runs it and the numerics are exactly those of the format (round-to-nearest-even,
  saturating at the format's max). E4M3/E5M2 values are exact in bfloat16, so even a
  TPU's one-pass bf16 matmul of quantised float32 operands is exact per product.
- **Real** (`real=True`): operands are cast to `jnp.float8_e4m3fn` / `float8_e5m2`
  and the matmul takes float8 inputs (`preferred_element_type` = the compute dtype),
  which XLA on H100 lowers to FP8 GEMMs. CPU runs the same program by converting to
  float32 (emulation: same numbers, no speed-up). Simulate and real give the same
  values up to float32 accumulation order.

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

**Casts live inside custom_vjp.** JAX differentiates `astype(fp8)` by casting the
cotangent to the same fp8 type: a gradient of 1000 becomes NaN in E4M3FN and one of
1e-4 becomes 0. So every cast used under differentiation sits inside a
`jax.custom_vjp` (`quantise_fwd`, `quantise_bwd`, `matmul`) whose backward rule
decides the gradient's format deliberately (E5M2 for output gradients by default) and
returns cotangents in the primal's dtype, never float8.

**Why no loss scaling or amax history.** Unit scaling keeps activations, weights and
gradients near RMS 1 by construction, i.e. in the middle of FP8's range, so a plain
cast with no per-tensor scale works: these functions are stateless (no amax history,
no delayed scaling, no loss scale) and the policy is a static, hashable Python object.
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
    "FormatPolicy",
    "FP8",
    "matmul",
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


@dataclasses.dataclass(frozen=True)
class FormatPolicy:
    """Which formats a matmul's operands and output gradient are rounded to.

    Fields:
      fwd: format of both matmul inputs in the forward pass (None: not quantised).
      bwd: format of the output gradient in the backward pass (None: not quantised).
      real: False simulates (values rounded with `quantise`, compute dtype kept, any
        backend). True casts to the formats' real dtypes (float8_e4m3fn/e5m2) so that
        XLA on H100 runs FP8 GEMMs; needs formats with a `.dtype`.

    Only nearest rounding: matmul receives no PRNG key. Frozen and hashable (a static
    argument of the matmul's custom_vjp). Checked on construction.
    """

    fwd: FPFormat | None = E4M3FN
    bwd: FPFormat | None = E5M2
    real: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.real, bool):
            raise ValueError(f"FormatPolicy.real must be a bool, got {self.real!r}")
        for side in ("fwd", "bwd"):
            fmt = getattr(self, side)
            if fmt is None:
                continue
            if not isinstance(fmt, FPFormat):
                raise ValueError(
                    f"FormatPolicy.{side} must be an FPFormat or None, got {fmt!r}"
                )
            _check_nearest(fmt, f"FormatPolicy.{side}")
            if self.real and fmt.dtype is None:
                raise ValueError(
                    f"FormatPolicy(real=True): {side}={fmt} has no real dtype to cast "
                    "to; use a format with one (E4M3FN, E5M2, E4M3FNUZ, E5M2FNUZ, "
                    "FP16, BF16, ...) or simulate it with real=False"
                )


FP8 = FormatPolicy()
"""E4M3FN forward operands, E5M2 output gradients, simulated."""


def _fwd_operand(x: jax.Array, policy: FormatPolicy) -> jax.Array:
    """The forward operand as stored: quantised (same dtype) or cast (float8)."""
    if policy.fwd is None:
        return x
    if policy.real:
        return saturating_cast(x, policy.fwd)
    return quantise(x, policy.fwd)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _policy_matmul_fwd(
    policy: FormatPolicy, dtypes: tuple[np.dtype, np.dtype], a: jax.Array, b: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    a_q, b_q = _fwd_operand(a, policy), _fwd_operand(b, policy)
    out_dtype = jnp.result_type(*dtypes)
    if policy.real and policy.fwd is not None:
        out = jnp.matmul(a_q, b_q, preferred_element_type=out_dtype)
    else:
        out = jnp.matmul(a_q, b_q)
    return out, (a_q, b_q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _policy_matmul(
    policy: FormatPolicy, dtypes: tuple[np.dtype, np.dtype], a: jax.Array, b: jax.Array
) -> jax.Array:
    return _policy_matmul_fwd(policy, dtypes, a, b)[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _policy_matmul_bwd(
    policy: FormatPolicy,
    dtypes: tuple[np.dtype, np.dtype],
    saved: tuple[jax.Array, jax.Array],
    g: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    # Upcast stored float8 operands to the compute dtype: XLA's GPU GEMM rewriter
    # fuses convert(f8) -> dot into an FP8 GEMM, and cotangents are never float8.
    a_q, b_q = saved[0].astype(dtypes[0]), saved[1].astype(dtypes[1])
    if policy.bwd is not None:
        if policy.real:
            g = saturating_cast(g, policy.bwd).astype(g.dtype)
        else:
            g = quantise(g, policy.bwd)
    _, matmul_vjp = jax.vjp(jnp.matmul, a_q, b_q)  # handles 1-D and broadcast cases
    g_a, g_b = matmul_vjp(g)
    return g_a.astype(dtypes[0]), g_b.astype(dtypes[1])


_policy_matmul.defvjp(_policy_matmul_fwd, _policy_matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, policy: FormatPolicy | None = None) -> jax.Array:
    """`jnp.matmul(a, b)`; inputs rounded to `policy.fwd`, output gradient to `.bwd`.

    Shapes as jnp.matmul: a[..., m, k] @ b[..., k, n] with numpy broadcasting of batch
    dims (e.g. x[b, s, k] @ kernel[k, n]), and the 1-D cases. Output dtype:
    jnp.result_type(a, b).

    - policy None (or fwd and bwd both None): exactly jnp.matmul(a, b).
    - Forward: both operands rounded to policy.fwd (simulate: `quantise`, same
      dtype; real: `saturating_cast` to policy.fwd.dtype and a float8-input matmul
      with preferred_element_type = the output dtype).
    - Backward: the output gradient rounded to policy.bwd, then the input gradients
      are those of jnp.matmul at the saved *quantised* operands (upcast to the compute
      dtype in real mode). Cotangents have their primal's dtype.

    No scale factors here: unit scaling applies them around this call.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if policy is None:
        return jnp.matmul(a, b)
    if not isinstance(policy, FormatPolicy):
        raise TypeError(
            f"matmul: policy must be a FormatPolicy or None, got {policy!r}"
        )
    if policy.fwd is None and policy.bwd is None:
        return jnp.matmul(a, b)
    _check_floating(a, "matmul (a)")
    _check_floating(b, "matmul (b)")
    return _policy_matmul(policy, (a.dtype, b.dtype), a, b)
