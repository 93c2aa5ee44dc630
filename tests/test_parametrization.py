"""Parametrizations: precision names, validation, and the scales of the ops that the
reference lacks (tanh pooler, summed embeddings) and of traced residual taus."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unit_scaling import formats
from unit_scaling import functional as U
from unit_scaling.parametrization import Parametrization, make_parametrization, resolve_precision


def _normal(seed, shape):
    # numpy: eager jax.random compiles a program per shape (slow on CPU).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))


def test_resolve_precision():
    assert resolve_precision("fp32") == (jnp.float32, None)
    assert resolve_precision("bf16") == (jnp.bfloat16, None)
    assert resolve_precision("fp16") == (jnp.float16, None)
    dtype, policy = resolve_precision("fp8")
    assert dtype == jnp.bfloat16 and policy == formats.FP8 and not policy.real
    assert resolve_precision("fp8", real_fp8=True)[1].real
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int4")


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="param"):
        Parametrization("mup")
    with pytest.raises(ValueError, match="umup"):
        Parametrization("sp", attn_mult=2.0)
    with pytest.raises(ValueError, match="act_mult"):
        Parametrization("umup", act_mult=-1.0)
    with pytest.raises(ValueError, match="unknown parametrization field"):
        make_parametrization("umup", attention_mult=2.0)


def test_scaled_tanh_is_unit_scaled():
    p = Parametrization("unit")
    x = _normal(0, (1 << 16,))
    g = _normal(1, x.shape)
    y, vjp = jax.vjp(p.tanh, x)
    (gx,) = vjp(g)
    assert 0.95 < _rms(y) < 1.05
    # One (output) scale for both directions: the gradient is 1.593/1.467 = 1.09.
    assert 1.0 < _rms(gx) < 1.15
    # sp is a plain tanh.
    np.testing.assert_allclose(Parametrization("sp").tanh(x), jnp.tanh(x))


def test_sum_embeddings_unit_forward_and_gradient():
    p = Parametrization("umup")
    xs = [_normal(i, (4096, 8)) for i in range(3)]
    g = _normal(9, (4096, 8))
    y, vjp = jax.vjp(lambda *a: p.sum_embeddings(*a), *xs)
    assert 0.95 < _rms(y) < 1.05
    for gi in vjp(g):  # each table's gradient is the (unit) output gradient itself
        np.testing.assert_allclose(gi, g)


@pytest.mark.parametrize("tau", [0.3, 1.7])
def test_traced_tau_residual_equals_static(tau):
    p = Parametrization("umup")
    x = _normal(0, (16, 8))

    def f(x, t):
        res, skip = p.residual_split(x, t)
        return jnp.sum(jnp.sin(p.residual_add(2.0 * res, skip, t)))

    static = jax.value_and_grad(f)(x, tau)
    traced = jax.jit(jax.value_and_grad(f))(x, jnp.float32(tau))
    np.testing.assert_allclose(static[0], traced[0], rtol=1e-5)
    np.testing.assert_allclose(static[1], traced[1], rtol=1e-5, atol=1e-6)


def test_residual_taus():
    p = Parametrization("umup", residual_mult=0.7, residual_attn_ratio=1.3)
    rule = U.transformer_residual_scaling_rule(0.7, 1.3)
    for layer in range(3):
        assert p.residual_taus(layer, 3, post_norm=False) == (
            rule(2 * layer, 6), rule(2 * layer + 1, 6))
    alpha_mlp = 0.7 * (2 / (1 + 1.3**2)) ** 0.5
    assert p.residual_taus(2, 3, post_norm=True) == pytest.approx((1.3 * alpha_mlp, alpha_mlp))


def test_sp_attention_matches_jax_reference():
    p = Parametrization("sp")
    q, k, v = (_normal(i, (2, 8, 2, 16)) for i in range(3))
    ours = p.attention(q, k, v, causal=True)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_attention_temperatures():
    assert Parametrization("sp").attention_mult(64) == 8.0
    assert Parametrization("unit").attention_mult(64) == 8.0
    assert Parametrization("unit", unit_attn_temperature="linear").attention_mult(64) == 1.0
    assert Parametrization("umup", attn_mult=2.0).attention_mult(64) == 2.0


def test_cross_entropy_sp_and_unit_agree_in_value():
    # Many rows: the weighted mean must not be rounded to the precision of the sum.
    n = 8192
    logits = _normal(0, (n, 10))
    labels = jnp.arange(n) % 10
    w = jnp.asarray(np.random.default_rng(1).integers(0, 2, n), jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ref = float(jnp.sum(ce * w) / jnp.sum(w))
    for name in ("sp", "unit"):
        out = Parametrization(name).cross_entropy(logits, labels, w)
        assert float(out) == pytest.approx(ref, rel=1e-6), name
    # unit: the gradient is that of the weighted *sum* (unit-scaled), not of the mean.
    p = Parametrization("umup", loss_mult=2.0)
    g = jax.grad(lambda z: p.cross_entropy(z, labels, w))(logits)
    g_sum = jax.grad(lambda z: U.cross_entropy(z, labels, mult=2.0, reduction="sum",
                                               weights=w))(logits)
    np.testing.assert_allclose(g, g_sum, rtol=1e-6)
