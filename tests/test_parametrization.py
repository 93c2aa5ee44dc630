"""Parametrizations and their ops: precision names, validation, and the scales of the
ops that the reference lacks (tanh pooler, summed embeddings) and of traced residual
taus."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unit_scaling import formats
from unit_scaling import functional as U
from unit_scaling.ops import StandardOps, UnitScaledOps
from unit_scaling.parametrization import Parametrization, make_parametrization
from unit_scaling.precision import LossScaling, Precision


def _normal(seed, shape):
    # numpy: eager jax.random compiles a program per shape (slow on CPU).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))


def test_precision_from_name():
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16), ("fp16", jnp.float16)):
        assert Precision.from_name(name) == Precision(dtype=dtype, param_dtype=jnp.float32)
    fp8 = Precision.from_name("fp8")
    assert fp8.dtype == jnp.bfloat16 and fp8.formats == formats.FP8 and not fp8.formats.real
    assert fp8.attention_formats is None and fp8.matmul_formats(critical=True) == formats.FP8
    assert Precision.from_name("fp8", real_fp8=True).formats.real
    hp = Precision.from_name("fp8", high_precision_critical=True, fp8_attention=True)
    assert hp.matmul_formats(critical=True) is None and hp.attention_formats == formats.FP8
    with pytest.raises(ValueError, match="precision"):
        Precision.from_name("int4")
    with pytest.raises(ValueError, match="param_dtype"):
        Precision.from_name("fp32", param_dtype="float16")


def test_loss_scaling_defaults_are_the_configs():
    """The config's `train.loss_scale*` defaults are `LossScaling`'s: none, 2^15, 2000."""
    from configs import bert, causal_lm

    assert LossScaling() == LossScaling("none", 2.0**15, 2000)
    for config in (bert.get_config("tiny"), causal_lm.get_config("tiny")):
        train = config.train
        assert LossScaling(train.loss_scale, train.loss_scale_value,
                           train.loss_scale_period) == LossScaling()
    for kwargs, field in (({"kind": "auto"}, "loss_scale"), ({"value": 0.0}, "loss_scale_value"),
                          ({"period": 0}, "loss_scale_period")):
        with pytest.raises(ValueError, match=f"config.train.{field}="):
            LossScaling(**kwargs)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="param"):
        Parametrization("mup")
    with pytest.raises(ValueError, match="umup"):
        Parametrization("sp", attn_mult=2.0)
    with pytest.raises(ValueError, match="act_mult"):
        Parametrization("umup", act_mult=-1.0)
    with pytest.raises(ValueError, match="unknown parametrization field"):
        make_parametrization("umup", attention_mult=2.0)
    with pytest.raises(ValueError, match="depth"):
        Parametrization("umup", depth=0)


def test_ops_per_parametrization():
    assert type(Parametrization("sp").ops) is StandardOps
    assert Parametrization("unit").ops == UnitScaledOps(mup_tied_readout=False)
    assert Parametrization("umup", act_mult=2.0).ops == UnitScaledOps(act_mult=2.0, attn_mult=1.0)
    assert Parametrization("umup").in_stack(4) == Parametrization("umup", depth=4)


def test_scaled_tanh_is_unit_scaled():
    p = Parametrization("unit")
    x = _normal(0, (1 << 16,))
    g = _normal(1, x.shape)
    y, vjp = jax.vjp(p.ops.tanh, x)
    (gx,) = vjp(g)
    assert 0.95 < _rms(y) < 1.05
    # One (output) scale for both directions: the gradient is 1.593/1.467 = 1.09.
    assert 1.0 < _rms(gx) < 1.15
    # sp is a plain tanh.
    np.testing.assert_allclose(Parametrization("sp").ops.tanh(x), jnp.tanh(x))


def test_sum_embeddings_unit_forward_and_gradient():
    p = Parametrization("umup")
    xs = [_normal(i, (4096, 8)) for i in range(3)]
    g = _normal(9, (4096, 8))
    y, vjp = jax.vjp(lambda *a: p.ops.sum_embeddings(*a), *xs)
    assert 0.95 < _rms(y) < 1.05
    for gi in vjp(g):  # each table's gradient is the (unit) output gradient itself
        np.testing.assert_allclose(gi, g)


@pytest.mark.parametrize("tau", [0.3, 1.7])
def test_traced_tau_residual_equals_static(tau):
    p = Parametrization("umup")
    x = _normal(0, (16, 8))

    def f(x, t):
        res, skip = p.ops.residual_split(x, t)
        return jnp.sum(jnp.sin(p.ops.residual_add(2.0 * res, skip, t)))

    static = jax.value_and_grad(f)(x, tau)
    traced = jax.jit(jax.value_and_grad(f))(x, jnp.float32(tau))
    np.testing.assert_allclose(static[0], traced[0], rtol=1e-5)
    np.testing.assert_allclose(static[1], traced[1], rtol=1e-5, atol=1e-6)


def test_residual_taus():
    p = Parametrization("umup", residual_mult=0.7, residual_attn_ratio=1.3)
    rule = U.transformer_residual_scaling_rule(0.7, 1.3)
    for layer in range(3):
        assert p.residual_taus(layer, 3) == (rule(2 * layer, 6), rule(2 * layer + 1, 6))


def test_post_norm_taus_follow_the_mults():
    base = Parametrization("umup").post_norm_taus(128, 512, "gelu", 64)
    p = Parametrization("umup", residual_mult=0.7, residual_attn_ratio=1.3)
    alpha_mlp = 0.7 * (2 / (1 + 1.3**2)) ** 0.5
    assert p.post_norm_taus(128, 512, "gelu", 64) == pytest.approx(
        (1.3 * alpha_mlp * base[0], alpha_mlp * base[1]))
    # Standard BERT's ratios grow with width; unit follows them, umup takes them at
    # POST_NORM_REFERENCE_WIDTH so that they do not depend on width (μP).
    unit = Parametrization("unit")
    assert unit.post_norm_taus(512, 2048, "gelu", 64) == pytest.approx(
        tuple(4 * t for t in unit.post_norm_taus(128, 512, "gelu", 64)))
    assert Parametrization("umup").post_norm_taus(512, 2048, "gelu", 64) == pytest.approx(base)


def _sp_dense(x, z, std=0.02):
    """A standard dense layer with kernel `std * z` (z ~ N(0, 1))."""
    return x @ (std * z)


@pytest.mark.parametrize("param", ["unit", "umup"])
@pytest.mark.parametrize("shared", [0.0, 0.6])
def test_post_norm_taus_reproduce_standard_bert_branches(param, shared):
    """With the same N(0,1) draws as the kernels, tau times the unit-scaled branch is
    standard BERT's branch (std 0.02 kernels): the post-norm rule's derivation. With a
    component shared by all positions (`shared` of the input's variance, like the
    segment embeddings), which the unit-scaled attention amplifies by its output
    scale, the attention branch stays within a factor 2 of BERT's (exact for umup,
    whose attention is flat at init like BERT's)."""
    p = Parametrization(param)
    batch, length, d, heads, d_ff = 4, 64, 128, 2, 512
    dh = d // heads
    noise = _normal(0, (batch, length, d))
    common = _normal(1, (batch, 1, d))
    x = (1 - shared) ** 0.5 * noise + shared**0.5 * common
    zq, zk, zv, zo = (_normal(10 + i, (d, d)) for i in range(4))
    z1, z2 = _normal(20, (d, d_ff)), _normal(21, (d_ff, d))
    heads_of = lambda t: t.reshape(batch, length, heads, dh)
    merge = lambda t: t.reshape(batch, length, d)

    sp = Parametrization("sp")
    sp_attn = _sp_dense(merge(sp.ops.attention(*(heads_of(_sp_dense(x, z)) for z in (zq, zk, zv)))), zo)
    unit_attn = U.linear(merge(p.ops.attention(*(heads_of(U.linear(x, z)) for z in (zq, zk, zv)))), zo)
    sp_mlp = _sp_dense(jax.nn.gelu(_sp_dense(x, z1), approximate=False), z2)
    unit_mlp = U.linear(p.ops.gelu(U.linear(x, z1)), z2)

    tau_attn, tau_mlp = p.post_norm_taus(d, d_ff, "gelu", length)
    ratio = tau_attn * _rms(unit_attn) / _rms(sp_attn)
    if param == "umup":
        assert ratio == pytest.approx(1.0, rel=0.05)
    else:  # 1/sqrt(d_head) logits are not flat at init; the output scale is a fit
        assert 0.5 < ratio < 2, ratio
    # MLP: gelu(z) ~ z/2 at BERT's small pre-activations; the unit gelu has RMS ~1.
    assert _rms(sp_mlp) == pytest.approx(tau_mlp * _rms(unit_mlp), rel=0.15)


def test_sp_attention_matches_jax_reference():
    p = Parametrization("sp")
    q, k, v = (_normal(i, (2, 8, 2, 16)) for i in range(3))
    ours = p.ops.attention(q, k, v, causal=True)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_attention_temperatures():
    assert Parametrization("sp").ops.attention_mult(64) == 8.0
    assert Parametrization("unit").ops.attention_mult(64) == 8.0
    assert Parametrization("unit", unit_attn_temperature="linear").ops.attention_mult(64) == 1.0
    assert Parametrization("umup", attn_mult=2.0).ops.attention_mult(64) == 2.0


def test_cross_entropy_sp_and_unit_agree_in_value():
    # Many rows: the weighted mean must not be rounded to the precision of the sum.
    n = 8192
    logits = _normal(0, (n, 10))
    labels = jnp.arange(n) % 10
    w = jnp.asarray(np.random.default_rng(1).integers(0, 2, n), jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ref = float(jnp.sum(ce * w) / jnp.sum(w))
    for name in ("sp", "unit"):
        out = Parametrization(name).ops.cross_entropy(logits, labels, w)
        assert float(out) == pytest.approx(ref, rel=1e-6), name
    # unit: the gradient is that of the weighted *sum* (unit-scaled), not of the mean.
    p = Parametrization("umup", loss_mult=2.0)
    g = jax.grad(lambda z: p.ops.cross_entropy(z, labels, w))(logits)
    g_sum = jax.grad(lambda z: U.cross_entropy(z, labels, mult=2.0, reduction="sum",
                                               weights=w))(logits)
    np.testing.assert_allclose(g, g_sum, rtol=1e-6)
