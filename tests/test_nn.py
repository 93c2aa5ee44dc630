"""Flax modules: parameter metadata, masks (padding, causal, packed segments), RoPE,
dtypes and formats."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unit_scaling import formats
from unit_scaling import nn as unn
from unit_scaling.models.transformer import TransformerConfig, TransformerLayer, TransformerStack
from unit_scaling.parametrization import Parametrization
from unit_scaling.params import ScaledParam
from unit_scaling.precision import Precision

UMUP = Parametrization("umup")
# XLA's cheaper CPU pipeline halves compile time; rbg keys avoid compiling threefry.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KEY = jax.random.key(1, impl="rbg")


def jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


def _normal(seed, shape):
    # numpy: eager jax.random compiles a program per shape (slow on CPU).
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _boxes(params):
    return jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def test_linear_param_metadata():
    m = unn.Linear(8, kernel_axes=("embed", "mlp"), parametrization=UMUP)
    params = jax.eval_shape(m.init, KEY, jnp.ones((2, 4)))["params"]
    k, b = params["kernel"], params["bias"]
    assert isinstance(k, ScaledParam) and k.names == ("embed", "mlp") and k.role == "weight"
    assert k.depth is None and k.value.shape == (4, 8)
    assert b.role == "bias" and b.names == ("mlp",) and b.value.shape == (8,)
    r = jax.eval_shape(unn.LinearReadout(16, parametrization=UMUP).init, KEY, jnp.ones((2, 4)))["params"]["kernel"]
    assert r.role == "output" and r.names == ("embed", "vocab")


def test_scanned_stack_keeps_roles_and_adds_layers_axis():
    stack = TransformerStack(TransformerConfig(d_model=16, num_layers=3, num_heads=2, mlp_dim=32,
                                               scan_layers=True))
    params = jax.eval_shape(stack.init, jax.random.key(0), jnp.ones((1, 4, 16)))["params"]
    boxes = _boxes(params)
    assert boxes and all(isinstance(b, ScaledParam) for b in boxes)
    for b in boxes:
        assert b.names[0] == "layers" and b.value.shape[0] == 3 and b.depth == 3
    qkv = params["layers"]["layer"]["attention"]["qkv_kernel"]
    assert qkv.fan_in == 16 and qkv.names == ("layers", "embed", "heads", None, "kv")


def test_a_layer_needs_a_parametrization():
    with pytest.raises(TypeError, match="parametrization"):
        unn.Linear(8)
    with pytest.raises(TypeError, match="parametrization"):
        unn.MultiHeadAttention(num_heads=2)


def test_heads_must_divide_d_model():
    attn = unn.MultiHeadAttention(num_heads=3, parametrization=UMUP)
    with pytest.raises(ValueError, match="num_heads"):
        jax.eval_shape(attn.init, KEY, jnp.ones((1, 4, 16)))


def _attn(**kw):
    m = unn.MultiHeadAttention(num_heads=2, **{"parametrization": UMUP, **kw})
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 16)), jnp.float32)
    params = jit(m.init)(KEY, x)
    apply = jit(lambda p, x, **a: m.apply(p, x, **a))
    return apply, params, x


@pytest.fixture(scope="module")
def causal_attn():
    return _attn(causal=True, rope=True)


@pytest.mark.parametrize("param", ["sp", "umup"])
def test_padding_mask_hides_padded_tokens(param):
    apply, params, x = _attn(parametrization=Parametrization(param))
    mask = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
    y1 = apply(params, x, mask=mask)
    x2 = x.at[0, 5:].set(100.0)  # change the padded tokens only
    y2 = apply(params, x2, mask=mask)
    np.testing.assert_allclose(y1[0, :5], y2[0, :5], atol=1e-5)
    y3 = apply(params, x.at[0, 2].set(100.0), mask=mask)  # a real token: visible
    assert not np.allclose(y1[0, :5], y3[0, :5], atol=1e-3)


def test_causal_mask_ignores_the_future(causal_attn):
    apply, params, x = causal_attn
    y1 = apply(params, x)
    y2 = apply(params, x.at[:, 5].set(3.0))
    np.testing.assert_allclose(y1[:, :5], y2[:, :5], atol=1e-5)
    assert not np.allclose(y1[:, 5:], y2[:, 5:], atol=1e-3)


def test_packed_segments_equal_separate_sequences(causal_attn):
    apply, params, x = causal_attn
    seg = jnp.array([[1] * 5 + [2] * 3] * 2)
    pos = jnp.array([list(range(5)) + list(range(3))] * 2)
    packed = apply(params, x, segment_ids=seg, positions=pos)
    # Document 2 alone (positions from 0). The u-μP attention scale depends on the key
    # length, so compare against a run with the same length: doc 2 padded at the end.
    doc2 = jnp.concatenate([x[:, 5:], jnp.zeros((2, 5, 16))], axis=1)
    alone = apply(params, doc2, segment_ids=jnp.array([[2] * 3 + [0] * 5] * 2),
                  positions=jnp.array([list(range(8))] * 2))
    np.testing.assert_allclose(packed[:, 5:], alone[:, :3], atol=1e-5)


def test_fused_attention_kernel_gives_the_layers_output_and_gradients():
    """`attention_impl="xla"` through the layer (causal, RoPE, packed segments): the
    reference kernel's output and parameter gradients (float32, 1e-5)."""
    seg = jnp.array([[1] * 5 + [2] * 3] * 2)
    grads = {}
    for impl in ("reference", "xla"):
        m = unn.MultiHeadAttention(num_heads=2, parametrization=UMUP, causal=True, rope=True,
                                   attention_impl=impl)
        x = _normal(0, (2, 8, 16))
        params = jit(m.init)(KEY, x)
        loss = lambda p: jnp.sum(m.apply(p, x, segment_ids=seg) * x)  # noqa: E731
        grads[impl] = jit(jax.value_and_grad(loss))(params)
    for a, b in zip(jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["reference"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_rope_depends_only_on_relative_position():
    q = _normal(0, (1, 1, 1, 8))
    k = _normal(1, (1, 1, 1, 8))

    def score(pq, pk):
        rq = unn.apply_rope(q, jnp.array([[pq]]))
        rk = unn.apply_rope(k, jnp.array([[pk]]))
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
    r = unn.apply_rope(q, jnp.array([[7]]))
    assert float(jnp.linalg.norm(r)) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)


def test_sinusoidal_is_unit_scaled():
    enc = unn.sinusoidal(jnp.arange(512), 64, unit=True)
    assert 0.9 < float(jnp.sqrt(jnp.mean(enc**2))) < 1.1


def test_compute_and_param_dtypes():
    m = TransformerLayer(TransformerConfig(d_model=16, num_heads=2, mlp_dim=32, precision="bf16",
                                           param_dtype="float32", norm_position="pre"))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 16)), jnp.float32)
    params = nn.unbox(jit(m.init)(KEY, x)["params"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

    def loss(p):
        y = m.apply({"params": p}, x)
        return jnp.sum(y.astype(jnp.float32)), y

    (_, y), grads = jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert y.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_mlp_fp8_and_critical_high_precision(activation):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 32)), jnp.float32)
    ref = unn.MLP(64, activation=activation, parametrization=UMUP)
    params = jit(ref.init)(KEY, x)

    @jit
    def run(params, x):
        y = ref.apply(params, x)
        fp8 = Precision(formats=formats.FP8)
        y8 = ref.clone(precision=fp8).apply(params, x)
        y8_hp = ref.clone(precision=Precision(formats=formats.FP8, high_precision_critical=True)
                          ).apply(params, x)
        return y, y8, y8_hp

    y, y8, y8_hp = run(params, x)
    assert 0.5 < float(jnp.sqrt(jnp.mean(y**2))) < 2.0
    err, err_hp = (float(jnp.sqrt(jnp.mean((a - y) ** 2))) for a in (y8, y8_hp))
    assert 0 < err_hp < err < 0.1  # quantised, close, and the flag removes some error


def test_unknown_choices_raise():
    x = jnp.ones((1, 4, 16))
    with pytest.raises(ValueError, match="activation"):
        jax.eval_shape(unn.MLP(8, activation="relu", parametrization=UMUP).init, KEY, x)
    with pytest.raises(ValueError, match="norm"):
        unn.make_norm("batch_norm")
    with pytest.raises(ValueError, match="remat_policy"):
        TransformerConfig(d_model=16, num_heads=2, remat_policy="some")


def test_every_logical_name_has_a_rule():
    from unit_scaling.models import bert
    cfg = bert.BertConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=2, mlp_dim=32,
                          max_len=8, scan_layers=True, tie_embeddings=False)
    b = dict(input_ids=jnp.zeros((1, 8), jnp.int32), segment_ids=jnp.zeros((1, 8), jnp.int32),
             input_mask=jnp.ones((1, 8), jnp.int32),
             masked_lm_positions=jnp.zeros((1, 2), jnp.int32),
             masked_lm_ids=jnp.zeros((1, 2), jnp.int32), masked_lm_weights=jnp.ones((1, 2)),
             next_sentence_label=jnp.zeros((1,), jnp.int32))
    model = bert.BertForPreTraining(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), b, deterministic=True))
    names = {n for box in _boxes(params["params"]) for n in box.names if n is not None}
    assert names == {"embed", "mlp", "heads", "kv", "vocab", "layers"}
    assert names <= {name for name, _ in unn.DEFAULT_RULES}
