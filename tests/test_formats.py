"""Tests for unit_scaling.formats: format constants, quantise, custom_vjp wrappers,
real casts and the FormatPolicy matmul.

The oracle for rounding is ml_dtypes (x.astype(fp8).astype(f32)), which implements
round-to-nearest-even for every real format; small formats are checked against their
complete value sets, written out by hand.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unit_scaling import formats as F

REAL_PRESETS = [F.E4M3FN, F.E5M2, F.E4M3FNUZ, F.E5M2FNUZ, F.E2M1FN, F.FP16, F.BF16]
PRESET_DTYPES = {
    F.E4M3FN: ml_dtypes.float8_e4m3fn,
    F.E5M2: ml_dtypes.float8_e5m2,
    F.E4M3FNUZ: ml_dtypes.float8_e4m3fnuz,
    F.E5M2FNUZ: ml_dtypes.float8_e5m2fnuz,
    F.E2M1FN: ml_dtypes.float4_e2m1fn,
    F.FP16: np.float16,
    F.BF16: ml_dtypes.bfloat16,
}
# Other real dtypes that FPFormat describes (exercise bias / specials combinations).
EXTRA_FORMATS = [
    F.FPFormat(4, 3, bias=11),  # float8_e4m3b11fnuz
    F.FPFormat(4, 3, bias=7, specials="ieee"),  # float8_e4m3
    F.FPFormat(3, 4, bias=3, specials="ieee"),  # float8_e3m4
    F.FPFormat(2, 3, bias=1),  # float6_e2m3fn
    F.FPFormat(3, 2, bias=3),  # float6_e3m2fn
]

_quantise_jit = jax.jit(F.quantise, static_argnums=1)


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


def _normal(shape, seed):
    # numpy, not jax.random: eager jax.random costs seconds of compilation on CPU
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _finite_codes(dtype):
    """All finite values of a <= 8-bit dtype, from its bit patterns."""
    bits = np.dtype(dtype).itemsize * 8
    assert bits == 8  # float4/float6 are stored in a byte too
    values = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    return np.unique(values[np.isfinite(values)])


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", REAL_PRESETS + EXTRA_FORMATS, ids=str)
def test_format_constants_equal_finfo(fmt):
    info = ml_dtypes.finfo(fmt.dtype)
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert fmt.bits == info.bits


def test_preset_dtypes():
    for fmt, dtype in PRESET_DTYPES.items():
        assert fmt.dtype == np.dtype(dtype), fmt
    assert F.FPFormat(3, 2).dtype is None
    assert F.FPFormat(2, 1).dtype is None  # reference FPFormat(2, 1) != E2M1FN


@pytest.mark.parametrize("e", range(2, 8))
def test_defaults_reproduce_reference(e):
    for m in (0, 1, 2, 3, 7, 10):
        fmt = F.FPFormat(e, m)
        assert fmt.max == 2 ** (2 ** (e - 1) - 1) * (2 - 2.0**-m)
        assert fmt.min_normal == 2.0 ** (1 - 2 ** (e - 1))
        assert fmt.min_subnormal == fmt.min_normal * 2.0**-m
        assert fmt.bits == 1 + e + m
        assert fmt.rounding == "nearest"


def test_reference_formats_are_fnuz():
    assert F.FPFormat(4, 3) == F.E4M3FNUZ and F.FPFormat(4, 3).max == 240
    assert F.FPFormat(5, 2) == F.E5M2FNUZ
    assert F.FPFormat(4, 3, bias=8) == F.FPFormat(4, 3)
    assert hash(F.FPFormat(4, 3, bias=8)) == hash(F.FPFormat(4, 3))
    assert F.E4M3FN != F.E4M3FNUZ


def test_str():
    assert str(F.E4M3FN) == "E4M3FN-RN"
    assert str(F.E5M2) == "E5M2-RN"
    assert str(F.FPFormat(4, 3)) == "E4M3FNUZ-RN"
    assert str(F.FP16) == "FP16-RN"
    assert str(F.FPFormat(3, 2, "stochastic")) == "E3M2-SR"
    assert str(F.FPFormat(3, 2, bias=2, specials="ieee")) == (
        "E3M2(bias=2,specials=ieee)-RN"
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exponent_bits=1, mantissa_bits=2), "exponent_bits"),
        (dict(exponent_bits=9, mantissa_bits=2), "exponent_bits"),
        (dict(exponent_bits=4, mantissa_bits=23), "mantissa_bits"),
        (dict(exponent_bits=4, mantissa_bits=-1), "mantissa_bits"),
        (dict(exponent_bits=4.0, mantissa_bits=3), "int"),
        (dict(exponent_bits=4, mantissa_bits=3, rounding="up"), "rounding"),
        (dict(exponent_bits=4, mantissa_bits=3, specials="fn"), "specials"),
        (dict(exponent_bits=4, mantissa_bits=0, specials="nan"), "specials='nan'"),
        (dict(exponent_bits=8, mantissa_bits=7), "float32"),  # bias 128 too small
        (dict(exponent_bits=5, mantissa_bits=2, bias=-120), "bias"),
    ],
)
def test_invalid_formats(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.FPFormat(**kwargs)


def test_format_is_static_jit_argument():
    calls = []

    @functools.partial(jax.jit, static_argnums=1)
    def f(x, fmt):
        calls.append(fmt)
        return F.quantise(x, fmt)

    x = jnp.ones((3,))
    f(x, F.FPFormat(4, 3))
    f(x, F.FPFormat(4, 3, bias=8))  # equal format: cache hit, no retrace
    assert len(calls) == 1


# ---------------------------------------------------------------------------- quantise

E2M1FN_VALUES = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
REF_E2M1_VALUES = [0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3]  # reference FPFormat(2, 1)


@pytest.mark.parametrize(
    "fmt, positives",
    [(F.E2M1FN, E2M1FN_VALUES), (F.FPFormat(2, 1), REF_E2M1_VALUES)],
    ids=str,
)
def test_small_format_value_set(fmt, positives):
    values = np.array(sorted({s * v for v in positives for s in (1, -1)}), np.float32)
    assert fmt.max == max(positives) and fmt.min_subnormal == positives[1]
    np.testing.assert_array_equal(_f32(F.quantise(values, fmt)), values)
    x = np.random.default_rng(0).uniform(-8, 8, size=(2000,)).astype(np.float32)
    q = _f32(F.quantise(x, fmt))
    assert np.isin(q, values).all()
    # nearest: no value of the set is strictly closer than the chosen one
    dist = np.abs(x[:, None] - values[None, :]).min(axis=1)
    np.testing.assert_array_equal(np.abs(q - x), dist)


@pytest.mark.parametrize("fmt", [f for f in REAL_PRESETS + EXTRA_FORMATS
                                 if f.bits <= 8], ids=str)
def test_codes_are_fixed_points_and_outputs_are_codes(fmt):
    codes = _finite_codes(fmt.dtype)
    np.testing.assert_array_equal(_f32(_quantise_jit(codes, fmt)), codes)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(4000) * fmt.max / 3).astype(np.float32)
    x[:2000] *= 2.0 ** rng.integers(-20, 0, size=2000)  # reach the subnormals too
    assert np.isin(_f32(_quantise_jit(x, fmt)), codes).all()


def _test_values(fmt, rng):
    """Finite in-range values: log-uniform magnitudes (subnormals included), random
    signs, and exact midpoints between neighbouring codes (ties)."""
    # XLA:CPU flushes float32 denormals, so BF16 is tested on its normal range.
    lo = fmt.min_subnormal / 4 if fmt is not F.BF16 else fmt.min_normal
    mags = np.exp(rng.uniform(np.log(lo), np.log(fmt.max), size=3000))
    if fmt.bits <= 8:
        codes = _finite_codes(fmt.dtype)
        codes = codes[codes >= 0]
        ties = (codes[1:] + codes[:-1]) / 2
    else:
        small = mags[mags < fmt.max / 2]
        neighbours = np.sort(rng.choice(small, 500)).astype(fmt.dtype)
        if fmt is F.FP16:
            nxt = np.nextafter(neighbours, np.float16(np.inf))
        else:  # bfloat16: next code = bits + 1
            nxt = (neighbours.view(np.uint16) + 1).view(fmt.dtype)
        ties = (neighbours.astype(np.float32) + nxt.astype(np.float32)) / 2
    x = np.concatenate([mags, ties, [0.0, fmt.max, max(lo, fmt.min_subnormal)]])
    x = x[(x <= fmt.max) & ((x >= lo) | (x == 0))].astype(np.float32)
    signs = np.where(rng.random(x.shape) < 0.5, -1, 1).astype(np.float32)
    return x * signs


@pytest.mark.parametrize("in_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("fmt", REAL_PRESETS, ids=str)
def test_nearest_equals_ml_dtypes_cast(fmt, in_dtype):
    x = _test_values(fmt, np.random.default_rng(2))
    x = x[np.abs(x) <= float(ml_dtypes.finfo(in_dtype).max)].astype(in_dtype)
    x = x[np.abs(x.astype(np.float32)) <= fmt.max]  # in range after the input cast
    q = _quantise_jit(x, fmt)
    assert q.dtype == in_dtype
    expected = x.astype(fmt.dtype).astype(in_dtype).astype(np.float32)
    np.testing.assert_array_equal(_f32(q), expected)


@pytest.mark.parametrize("fmt", EXTRA_FORMATS, ids=str)
def test_nearest_equals_ml_dtypes_cast_other_formats(fmt):
    x = _test_values(fmt, np.random.default_rng(3))
    expected = x.astype(fmt.dtype).astype(np.float32)
    np.testing.assert_array_equal(_f32(_quantise_jit(x, fmt)), expected)


def test_ties_to_even():
    x = jnp.array([1 + 1 / 16, 1 + 3 / 16, 1 + 5 / 16, -(1 + 1 / 16), 3 * 2.0**-10,
                   2.0**-10, 232.0, 248.0])
    # 232 lies between 224 (1.110b * 2^7) and 240 (1.111b * 2^7): even is 224.
    expected = [1, 1.25, 1.25, -1, 2.0**-8, 0, 224, 256]
    np.testing.assert_array_equal(_f32(F.quantise(x, F.E4M3FN)), expected)
    y = jnp.array([1.125, 1.375, 1.625, 3 * 2.0**-17])
    np.testing.assert_array_equal(_f32(F.quantise(y, F.E5M2)), [1, 1.5, 1.5, 2.0**-15])


def test_quantise_under_jit_and_vmap_matches_eager():
    x = jnp.asarray(_normal((4, 16), seed=0) * 100)
    eager = F.quantise(x, F.E4M3FN)
    np.testing.assert_array_equal(_quantise_jit(x, F.E4M3FN), eager)
    np.testing.assert_array_equal(jax.vmap(lambda r: F.quantise(r, F.E4M3FN))(x), eager)


@pytest.mark.parametrize("fmt", REAL_PRESETS[:-1] + [F.FPFormat(3, 2)], ids=str)
def test_saturation(fmt):
    x = jnp.array([1e6, -1e6, 2 * fmt.max, -fmt.max * 1.001, jnp.inf, -jnp.inf,
                   fmt.max, jnp.nan])
    q = _f32(F.quantise(x, fmt))
    np.testing.assert_array_equal(q[:7], [fmt.max, -fmt.max] * 3 + [fmt.max])
    assert np.isnan(q[7])


def test_saturation_bf16():
    x = jnp.array([3.4e38, -jnp.inf, jnp.inf], jnp.float32)
    q = _f32(F.quantise(x, F.BF16))
    np.testing.assert_array_equal(q, [F.BF16.max, -F.BF16.max, F.BF16.max])
    q16 = F.quantise(jnp.array([1e6], jnp.bfloat16), F.E4M3FN)
    assert q16.dtype == jnp.bfloat16 and float(q16[0]) == 448


@pytest.mark.parametrize("dtype, top", [(jnp.float8_e4m3fn, 448.0),
                                        (jnp.float8_e5m2, 57344.0),
                                        (jnp.float8_e4m3fnuz, 240.0),
                                        (jnp.float16, 65504.0)])
def test_saturating_cast(dtype, top):
    x = jnp.array([1e6, -1e6, jnp.inf, 1.0, 0.3], jnp.float32)
    y = F.saturating_cast(x, dtype)
    assert y.dtype == dtype
    np.testing.assert_array_equal(_f32(y), [top, -top, top, 1.0,
                                            float(jnp.float32(0.3).astype(dtype))])
    # plain astype overflows (the reason for the clip)
    assert not np.isfinite(_f32(x[:1].astype(dtype))).all()


def test_saturating_cast_bf16_to_f16_and_format_argument():
    y = F.saturating_cast(jnp.array([1e30, -7e4], jnp.bfloat16), jnp.float16)
    np.testing.assert_array_equal(_f32(y), [65504, -65504])
    assert F.saturating_cast(jnp.ones((2,)), F.E5M2).dtype == jnp.float8_e5m2
    with pytest.raises(ValueError, match="no real dtype"):
        F.saturating_cast(jnp.ones((2,)), F.FPFormat(3, 2))


# ---------------------------------------------------------------- stochastic rounding

SR = dataclasses.replace(F.E4M3FN, rounding="stochastic")


def test_stochastic_rounding_unbiased_and_between_neighbours():
    # (x, lower, upper): normal range, negative, subnormal range, near the max
    cases = [(1.1, 1.0, 1.125), (-13.3, -14.0, -13.0),
             (0.0051, 0.00390625, 0.005859375), (300.0, 288.0, 320.0)]
    n = 20000
    x = jnp.repeat(jnp.array([c[0] for c in cases], jnp.float32)[:, None], n, axis=1)
    q = _f32(jax.jit(F.quantise, static_argnums=1)(x, SR, jax.random.key(0)))
    for (v, lo, hi), row in zip(cases, q):
        assert np.isin(row, [lo, hi]).all(), v
        p = (np.float32(v) - lo) / (hi - lo)
        sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
        assert abs(row.mean() - np.float32(v)) < 3 * sigma, (v, row.mean())
        assert 0 < (row == hi).mean() < 1


def test_stochastic_rounding_exact_values_and_determinism():
    codes = jnp.asarray(_finite_codes(ml_dtypes.float8_e4m3fn))
    np.testing.assert_array_equal(F.quantise(codes, SR, jax.random.key(1)), codes)
    x = jnp.asarray(_normal((256,), seed=2))
    a = F.quantise(x, SR, jax.random.key(3))
    np.testing.assert_array_equal(a, F.quantise(x, SR, jax.random.key(3)))
    assert not np.array_equal(a, F.quantise(x, SR, jax.random.key(4)))
    assert np.isin(_f32(a), codes).all()
    raw_key = jax.random.PRNGKey(3)  # legacy uint32 keys work too
    assert np.isin(_f32(F.quantise(x, SR, raw_key)), codes).all()


def test_stochastic_rounding_needs_key():
    with pytest.raises(ValueError, match="PRNG key"):
        F.quantise(jnp.ones((2,)), SR)
    with pytest.raises(ValueError, match="stochastic"):
        F.quantise_fwd(jnp.ones((2,)), SR)
    with pytest.raises(ValueError, match="stochastic"):
        F.quantise_bwd(jnp.ones((2,)), SR)


def test_quantise_rejects_bad_arguments():
    with pytest.raises(TypeError, match="floating"):
        F.quantise(jnp.ones((2,), jnp.int32), F.E4M3FN)
    with pytest.raises(TypeError, match="FPFormat"):
        F.quantise(jnp.ones((2,)), "e4m3")


# ------------------------------------------------------------ quantise_fwd / _bwd


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantise_fwd_passes_gradient_through(dtype):
    x = jnp.array([0.3, 1000.0, -5.1, 1e-4], dtype)
    c = jnp.array([1000.0, 0.3, 1e-4, -7.7], dtype)
    y, vjp = jax.vjp(lambda v: F.quantise_fwd(v, F.E4M3FN), x)
    np.testing.assert_array_equal(y, F.quantise(x, F.E4M3FN))
    (g,) = vjp(c)
    assert g.dtype == dtype
    np.testing.assert_array_equal(g, c)  # a bare astype(fp8) would give NaN / 0 here


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quantise_bwd_quantises_gradient_only(dtype):
    x = jnp.array([0.3, 1000.0, -5.1, 1e-4], dtype)
    c = jnp.array([1.3, 1e6, -1e-4, 3.0], dtype)
    y, vjp = jax.vjp(lambda v: F.quantise_bwd(v, F.E5M2), x)
    assert y.dtype == dtype
    y_bits, x_bits = np.asarray(y).view(np.uint8), np.asarray(x).view(np.uint8)
    np.testing.assert_array_equal(y_bits, x_bits)  # bitwise untouched
    (g,) = vjp(c)
    assert g.dtype == dtype
    e5m2_of_1e4 = float(jnp.float32(-1e-4).astype(jnp.float8_e5m2))  # -2**-13 * 0.75
    np.testing.assert_array_equal(_f32(g), [1.25, 57344, e5m2_of_1e4, 3.0])


def test_quantise_fwd_bwd_compose_under_jit_grad():
    f = jax.jit(jax.grad(lambda v: jnp.sum(F.quantise_bwd(F.quantise_fwd(v, F.E4M3FN),
                                                          F.E5M2) * 1.3)))
    np.testing.assert_array_equal(f(jnp.ones((3,))), jnp.full((3,), 1.25))


# -------------------------------------------------------------------- policy matmul


def _operands(shape_a, shape_b, dtype=jnp.float32, seed=0, scale=3.0):
    a = jnp.asarray(_normal(shape_a, seed) * scale).astype(dtype)
    b = jnp.asarray(_normal(shape_b, seed + 1) * scale).astype(dtype)
    return a, b


def _reference_vjp(a, b, g, policy):
    """Gradient of jnp.matmul at the quantised operands for the quantised cotangent."""
    qa = F.quantise(a, policy.fwd) if policy.fwd else a
    qb = F.quantise(b, policy.fwd) if policy.fwd else b
    qg = F.quantise(g, policy.bwd) if policy.bwd else g
    out, vjp = jax.vjp(jnp.matmul, qa, qb)
    return out, vjp(qg)


def test_policy_none_is_jnp_matmul():
    a, b = _operands((4, 8), (8, 5))
    np.testing.assert_array_equal(F.matmul(a, b), jnp.matmul(a, b))
    np.testing.assert_array_equal(F.matmul(a, b, F.FormatPolicy(None, None)),
                                  jnp.matmul(a, b))
    g1 = jax.grad(lambda a: F.matmul(a, b).sum())(a)
    np.testing.assert_array_equal(g1, jax.grad(lambda a: jnp.matmul(a, b).sum())(a))


@pytest.mark.parametrize(
    "shape_a, shape_b",
    [((4, 8), (8, 5)), ((2, 3, 8), (8, 4)), ((2, 3, 8), (2, 8, 4)), ((8,), (8, 4)),
     ((3, 8), (8,))],
)
def test_simulated_matmul_values_and_gradients(shape_a, shape_b):
    a, b = _operands(shape_a, shape_b)
    out, vjp = jax.vjp(lambda a, b: F.matmul(a, b, F.FP8), a, b)
    g = jnp.asarray(_normal(out.shape, seed=9) * 7)
    ref_out, (ref_ga, ref_gb) = _reference_vjp(a, b, g, F.FP8)
    np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-5)
    ga, gb = vjp(g)
    assert ga.shape == a.shape and gb.shape == b.shape
    np.testing.assert_allclose(ga, ref_ga, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(gb, ref_gb, rtol=1e-6, atol=1e-5)
    # the quantisation matters: the unquantised gradient is measurably different
    assert not np.allclose(gb, jax.vjp(jnp.matmul, a, b)[1](g)[1], rtol=1e-3)


def test_one_sided_policies():
    a, b = _operands((4, 8), (8, 5))
    g = jnp.asarray(_normal((4, 5), seed=5) * 5)
    for policy in (F.FormatPolicy(fwd=None), F.FormatPolicy(bwd=None)):
        out, vjp = jax.vjp(lambda a, b: F.matmul(a, b, policy), a, b)
        ref_out, ref_grads = _reference_vjp(a, b, g, policy)
        np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-5)
        for got, ref in zip(vjp(g), ref_grads):
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(F.matmul(a, b, F.FormatPolicy(fwd=None)),
                                  jnp.matmul(a, b))


REAL = F.FormatPolicy(real=True)


@pytest.mark.parametrize("shape_a, shape_b", [((4, 8), (8, 5)), ((2, 3, 8), (8, 4))])
def test_real_matches_simulated(shape_a, shape_b):
    a, b = _operands(shape_a, shape_b, scale=40.0)  # some values beyond 448 too

    def grads(policy):
        f = jax.jit(jax.value_and_grad(
            lambda a, b: jnp.sum(F.matmul(a, b, policy) ** 2) * 1e-4, (0, 1)))
        return f(a, b)

    (v_sim, g_sim), (v_real, g_real) = grads(F.FP8), grads(REAL)
    np.testing.assert_allclose(v_real, v_sim, rtol=1e-5)
    for got, ref in zip(g_real, g_sim):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _dot_input_dtypes(jaxpr):
    """Operand dtypes of every dot_general in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _dot_input_dtypes(sub)
    return found


def test_real_mode_dots():
    a, b = _operands((4, 8), (8, 5))
    fwd = jax.make_jaxpr(lambda a, b: F.matmul(a, b, REAL))(a, b).jaxpr
    assert _dot_input_dtypes(fwd) == [("float8_e4m3fn", "float8_e4m3fn")]
    loss = lambda a, b: F.matmul(a, b, REAL).sum()  # noqa: E731
    bwd = jax.make_jaxpr(jax.grad(loss, (0, 1)))(a, b).jaxpr
    dots = _dot_input_dtypes(bwd)
    # forward dot on float8, then the two gradient dots on upcast (float32) operands
    assert dots[0] == ("float8_e4m3fn", "float8_e4m3fn")
    assert len(dots) >= 3 and all("float8" not in t for d in dots[1:] for t in d)
    assert "f8_e5m2" in str(bwd)  # the output gradient went through E5M2


@pytest.mark.parametrize("policy", [F.FP8, REAL], ids=["simulate", "real"])
def test_bf16_in_bf16_out(policy):
    a, b = _operands((2, 3, 8), (8, 4), dtype=jnp.bfloat16)
    out = F.matmul(a, b, policy)
    assert out.dtype == jnp.bfloat16
    ga, gb = jax.grad(lambda a, b: F.matmul(a, b, policy).astype(jnp.float32).sum(),
                      (0, 1))(a, b)
    assert ga.dtype == jnp.bfloat16 and gb.dtype == jnp.bfloat16
    np.testing.assert_allclose(_f32(out), _f32(jnp.matmul(F.quantise(a, F.E4M3FN),
                                                         F.quantise(b, F.E4M3FN))),
                               rtol=2e-2, atol=0.5)


def test_mixed_dtypes_keep_primal_dtypes():
    a, _ = _operands((4, 8), (8, 5))
    _, b = _operands((4, 8), (8, 5), dtype=jnp.bfloat16)
    for policy in (F.FP8, REAL):
        ga, gb = jax.grad(lambda a, b: F.matmul(a, b, policy).sum(), (0, 1))(a, b)
        assert (ga.dtype, gb.dtype) == (jnp.float32, jnp.bfloat16)


def test_jit_vmap_grad():
    a, b = _operands((3, 4, 8), (8, 5))
    eager = F.matmul(a, b, F.FP8)
    np.testing.assert_allclose(jax.jit(F.matmul, static_argnums=2)(a, b, F.FP8), eager,
                               rtol=1e-6, atol=1e-5)
    vm = jax.vmap(lambda x: F.matmul(x, b, F.FP8))(a)
    np.testing.assert_allclose(vm, eager, rtol=1e-6, atol=1e-5)
    loss = lambda a: jnp.sum(F.matmul(a, b, F.FP8))
    g_vmap = jax.vmap(jax.grad(lambda x: jnp.sum(F.matmul(x, b, F.FP8))))(a)
    np.testing.assert_allclose(g_vmap, jax.jit(jax.grad(loss))(a), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("policy", [F.FP8, REAL], ids=["simulate", "real"])
def test_huge_inputs_never_nan(policy):
    a = jnp.full((4, 8), 1e5, jnp.float32)
    b = jnp.full((8, 5), -1e5, jnp.float32)
    out, vjp = jax.vjp(lambda a, b: F.matmul(a, b, policy), a, b)
    np.testing.assert_array_equal(out, jnp.full((4, 5), -448.0 * 448 * 8))
    ga, gb = vjp(jnp.full(out.shape, 1e9, jnp.float32))
    assert np.isfinite(ga).all() and np.isfinite(gb).all()
    np.testing.assert_array_equal(ga, jnp.full((4, 8), -57344.0 * 448 * 5))


def test_policy_validation():
    with pytest.raises(ValueError, match="no real dtype"):
        F.FormatPolicy(fwd=F.FPFormat(3, 2), real=True)
    with pytest.raises(ValueError, match="stochastic"):
        F.FormatPolicy(bwd=dataclasses.replace(F.E5M2, rounding="stochastic"))
    with pytest.raises(ValueError, match="FPFormat"):
        F.FormatPolicy(fwd="e4m3")
    with pytest.raises(TypeError, match="FormatPolicy"):
        F.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)), "fp8")
    assert F.FormatPolicy(fwd=F.FPFormat(3, 2)).real is False  # simulating is fine
    assert hash(F.FP8) == hash(F.FormatPolicy())
