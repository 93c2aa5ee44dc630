"""BERT and the causal LM: losses and RMS scales at init, scan/remat equivalence,
sharded = single device, cached generation, presets, checkpoint compatibility."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.common import load_config
from unit_scaling import functional as U
from unit_scaling.models import bert, causal_lm
from unit_scaling.nn.partitioning import DEFAULT_RULES
from unit_scaling.params import param_meta

V, B, L = 256, 8, 32
D, MLP_BERT, MLP_LM = 64, 256, 128


def _rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(x, jnp.float32)))))


def _flat(tree):
    def key(k):
        return str(getattr(k, "key", getattr(k, "idx", k)))
    return {"/".join(key(k) for k in path): x
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def bert_batch(seed=0, all_positions=True):
    r = np.random.default_rng(seed)
    # Every position masked (P = L): each hidden position receives a loss gradient,
    # so the predicted gradient scales are those of a dense loss.
    pos = np.tile(np.arange(L), (B, 1)) if all_positions else r.integers(1, L, (B, 5))
    mask = np.ones((B, L), np.int32)
    mask[0, -4:] = 0
    return dict(
        input_ids=r.integers(0, V, (B, L)).astype(np.int32),
        segment_ids=np.tile((np.arange(L) >= L // 2).astype(np.int32), (B, 1)),
        input_mask=mask,
        masked_lm_positions=pos.astype(np.int32),
        masked_lm_ids=r.integers(0, V, pos.shape).astype(np.int32),
        masked_lm_weights=np.ones(pos.shape, np.float32),
        next_sentence_label=(np.arange(B) % 2).astype(np.int32),
    )


def lm_batch(seed=0):
    r = np.random.default_rng(seed)
    ids = r.integers(0, V, (B, L + 1)).astype(np.int32)
    seg = np.ones((B, L), np.int32)
    seg[:, 20:] = 2
    seg[0, 28:] = 0  # padding
    pos = np.where(np.arange(L) < 20, np.arange(L), np.arange(L) - 20)
    weights = (seg > 0).astype(np.float32)
    weights[:, 19] = 0.0  # target would cross into the next document
    return dict(input_ids=ids[:, :-1], targets=ids[:, 1:], segment_ids=seg,
                positions=np.tile(pos, (B, 1)).astype(np.int32), weights=weights)


def bert_model(param, **kw):
    cfg = bert.BertConfig(vocab_size=V, d_model=D, num_layers=2, num_heads=4,
                          mlp_dim=MLP_BERT, max_len=L, param=param, dropout=0.0,
                          attention_dropout=0.0, tie_embeddings=False, **kw)
    return bert.BertForPreTraining(cfg)


def lm_model(param, **kw):
    kw = dict(dict(vocab_size=V, d_model=D, num_layers=2, num_heads=4, mlp_dim=MLP_LM,
                   max_len=L, param=param), **kw)
    return causal_lm.CausalLM(causal_lm.CausalLMConfig(**kw))


# Tests compile ~15 small programs; XLA's cheaper CPU pipeline halves compile time.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


def init_params(model, batch):
    # rbg keys: XLA compiles threefry slowly on CPU, and init is mostly RNG.
    key = jax.random.key(0, impl="rbg")
    return jit(lambda: model.init(key, batch, deterministic=True))()["params"]


def loss_and_grads(model, params, batch, capture=False):
    def f(p):
        out = model.apply({"params": p}, batch, deterministic=True,
                          capture_intermediates=capture, mutable=["intermediates"])
        (loss, metrics), inter = out
        return loss, (metrics, inter)

    (loss, (metrics, inter)), grads = jit(jax.value_and_grad(f, has_aux=True))(params)
    return loss, metrics, grads, inter


_CACHE = {}


def run_init(kind, param):
    """(boxed params, loss, metrics, grads, intermediates) at init; cached per test run."""
    if (kind, param) not in _CACHE:
        model, batch = (bert_model(param), bert_batch()) if kind == "bert" else (
            lm_model(param), lm_batch())
        boxed = init_params(model, batch)
        _CACHE[kind, param] = (boxed,) + loss_and_grads(model, nn.unbox(boxed), batch, True)
    return _CACHE[kind, param]


@pytest.mark.parametrize("param", ["sp", "unit", "umup"])
def test_bert_losses_at_init(param):
    _, loss, m, _, _ = run_init("bert", param)
    assert abs(float(m["mlm_loss"]) - math.log(V)) < 0.15
    assert abs(float(m["nsp_loss"]) - math.log(2)) < 0.15
    assert float(loss) == pytest.approx(float(m["mlm_loss"] + m["nsp_loss"]), rel=1e-6)
    assert 0.0 <= float(m["mlm_accuracy"]) < 0.05 and 0.0 <= float(m["nsp_accuracy"]) <= 1.0


@pytest.mark.parametrize("param", ["sp", "umup"])
def test_lm_loss_at_init(param):
    _, loss, m, _, _ = run_init("lm", param)
    assert abs(float(loss) - math.log(V)) < 0.15 and float(m["accuracy"]) < 0.05


def _check_scales(kind, param):
    """Every parameter, parameter gradient and captured activation at its predicted RMS;
    returns the list of violations."""
    boxed, _, _, grads, inter = run_init(kind, param)
    params, g = _flat(nn.unbox(boxed)), _flat(grads)
    bad = []

    def check(name, value, lo, hi):
        if not lo < value < hi:
            bad.append((name, round(value, 3), (lo, hi)))

    for path, box in param_meta(boxed):
        p_rms, g_rms = _rms(params[path]), _rms(g[path])
        if path.endswith("bias"):  # zero-initialised (linear and norm biases)
            check("param " + path, p_rms, -1e-9, 1e-9)
            # A bias gradient sums the output gradient over all positions; components
            # shared by positions (the [CLS]/NSP path, a common direction in the
            # residual stream) add coherently, so it is only bounded loosely.
            check("grad " + path, g_rms, 1 / 8, 8)
            continue
        if box.role == "norm":  # gains start at one
            check("param " + path, p_rms, 1 - 1e-6, 1 + 1e-6)
            # Like a bias, a gain's gradient sums over positions (coherent parts add).
            check("grad " + path, g_rms, 1 / 4, 4)
            continue
        check("param " + path, p_rms, 0.8, 1.25)  # N(0, 1)
        if kind == "bert" and box.role == "embedding":
            # Measured 0.37-0.53 for the token/position tables and ~2.4 for the 2-row
            # segment table (128 correlated contributions per row). Cause: the
            # oversized attention outputs (see the activations below) inflate the
            # input RMS of each post-norm LayerNorm, which divides the gradient by it
            # (probed: 1.18 -> 0.34 across layer 1's attention sublayer under umup).
            check("grad " + path, g_rms, 1 / 4, 4)
        elif kind == "bert" and "attention" in path:
            # Measured 2.1-3.1: these kernels' gradients are their inputs times the
            # output gradient, and the attention output has RMS 2-5 at init (shared
            # components across positions, see `_attention_rms`).
            check("grad " + path, g_rms, 0.5, 4)
        elif kind == "bert" and path.split("/")[0] in ("pooler", "nsp"):
            # Measured 0.44 (umup): the batch's [CLS] vectors are nearly identical at
            # init and the balanced NSP labels give gradients of opposite sign, which
            # cancel in the sum over the batch.
            check("grad " + path, g_rms, 1 / 4, 2)
        else:
            check("grad " + path, g_rms, 0.5, 2)
    checked = 0
    for path, x in _flat(inter).items():
        if x.ndim < 2:
            continue
        r, checked = _rms(x), checked + 1
        if "readout" in path or path.endswith("nsp/__call__/0"):
            # μP readout: logits RMS fan_in^-1/2 at init.
            check(path, r, 0.5 * D**-0.5, 2 * D**-0.5)
        elif "attention/__call__" in path or "Dropout_0" in path:
            # Attention outputs, at the value derived in `_attention_rms`.
            predicted = _attention_rms(kind, param, path, inter)
            # Measured 0.72-0.98 (BERT: the small post-norm branch weights leave
            # layer 1's input closer to the embeddings than the prediction assumes).
            check(path + " / predicted", r / predicted, 2 / 3, 1.5)
        else:
            check(path, r, 0.5, 2)
    assert checked > 20
    return bad


def _attention_rms(kind, param, path, inter):
    """The RMS the attention output at `path` should have, from its input `x`.

    The rule (`U.attention_output_scale`, `s`) assumes values independent across
    positions: averaging attention shrinks them by `1/s` and the scale undoes it.
    A component the values share across positions is not shrunk, so it comes out `s`
    times larger. With `c` the mean of `x` over the keys each query sees (the shared
    part; W_v and the output projection are unit-scaled random maps, which keep
    RMS), the output has `RMS^2 = s^2 |c|^2 + |x|^2 - |c|^2`. BERT has large shared
    parts: the segment embedding (half of the positions) at layer 0, and what layer
    0's nearly flat attention added to every position at layer 1 (~2 and ~4.5 at
    S=32 under umup, against 1 for independent values).
    """
    layer = int(path.split("layer_")[1].split("/")[0])
    if kind == "bert":
        batch, model = bert_batch(), bert_model(param)
        name = "encoder/embed_norm" if layer == 0 else f"encoder/stack/layer_{layer - 1}"
        mask = U.attention_mask(L, L, mask=batch["input_mask"].astype(bool)[:, None, None, :])
    else:  # pre-norm: the attention reads norm_0 of the residual stream
        batch, model = lm_batch(), lm_model(param)
        name = f"stack/layer_{layer}/norm_0"
        mask = U.attention_mask(L, L, causal=True, segment_ids=batch["segment_ids"])
    x = _flat(inter)[f"intermediates/{name}/__call__/0"].astype(jnp.float32)
    weights = jnp.broadcast_to(mask[:, 0], (B, L, L)).astype(jnp.float32)
    shared = jnp.einsum("bqk,bkd->bqd", weights / weights.sum(-1, keepdims=True), x)
    p, head_dim = model.config.parametrization, D // 4
    s = U.attention_output_scale(L, head_dim, p.ops.attention_mult(head_dim), kind == "lm")
    c2, x2 = _rms(shared) ** 2, _rms(x) ** 2
    return math.sqrt(s**2 * c2 + x2 - c2)


@pytest.mark.parametrize("param", ["unit", "umup"])
@pytest.mark.parametrize("kind", ["bert", "lm"])
def test_rms_scales_at_init(kind, param):
    assert _check_scales(kind, param) == []


def _stack_layers(params, n):
    """Unrolled `layer_i` subtrees -> the scanned `layers/layer` layout."""
    params = dict(params)
    stack = dict(params["stack"])
    layers = [stack.pop(f"layer_{i}") for i in range(n)]
    stack["layers"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    params["stack"] = stack
    return params


def test_scan_and_remat_match_unrolled():
    batch = lm_batch()
    # Pre-norm: the taus differ per layer (a scanned input under nn.scan).
    boxed, loss, _, grads, _ = run_init("lm", "umup")
    params = nn.unbox(boxed)
    stacked = _stack_layers(params, 2)
    for kw in (dict(scan_layers=True, remat_policy="full"),
               dict(scan_layers=False, remat_policy="save_proj")):
        model = lm_model("umup", **kw)
        p = stacked if kw["scan_layers"] else params
        loss2, _, grads2, _ = loss_and_grads(model, p, batch)
        np.testing.assert_allclose(loss2, loss, rtol=1e-5)
        ref = _stack_layers(grads, 2) if kw["scan_layers"] else grads
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
                     grads2, ref)


def test_sharded_matches_single_device():
    boxed, loss, _, grads, _ = run_init("bert", "umup")
    model, batch, params = bert_model("umup"), bert_batch(), nn.unbox(boxed)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, DEFAULT_RULES)
    # Parameters really are split over fsdp and tensor.
    used = {a for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, NamedSharding))
            for a in jax.tree.leaves(tuple(s.spec))}
    assert {"fsdp", "tensor"} <= used
    data = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded_params = jax.device_put(params, specs)
        sharded_batch = jax.device_put(batch, data)

        def f(p, b):
            return model.apply({"params": p}, b, deterministic=True)[0]

        loss2, grads2 = jit(jax.value_and_grad(f), out_shardings=(None, specs))(
            sharded_params, sharded_batch)
    assert grads2["encoder"]["token_embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 grads2, grads)


def test_generate_with_cache_equals_without():
    model = lm_model("umup", scan_layers=True)  # the cache is scanned over layers too
    batch = lm_batch()
    params = init_params(model, batch)
    prompt = jnp.asarray(batch["input_ids"][:2, :6])

    @jit
    def both(params, key):
        cached = causal_lm.generate(model, params, prompt, 10, key, temperature=0.0)
        full = causal_lm.generate(model, params, prompt, 10, key, temperature=0.0,
                                  use_cache=False)
        top1 = causal_lm.generate(model, params, prompt, 10, key, temperature=0.7, top_k=1)
        sampled = causal_lm.generate(model, params, prompt, 10, key, temperature=1.0,
                                     top_p=0.9)
        return cached, full, top1, sampled

    cached, full, top1, sampled = both(params, jax.random.key(1))
    assert cached.shape == (2, 10) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, full)
    np.testing.assert_array_equal(cached, top1)
    assert not np.array_equal(sampled, cached)
    assert int(sampled.min()) >= 0 and int(sampled.max()) < V


def _count(model, batch):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, deterministic=True))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))



@pytest.mark.parametrize("tie", [True, False])
def test_bert_without_biases_has_none_heads_included(tie):
    cfg = bert.BertConfig(vocab_size=V, d_model=D, num_layers=2, num_heads=4,
                          mlp_dim=MLP_BERT, max_len=L, use_bias=False, tie_embeddings=tie)
    model = bert.BertForPreTraining(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), bert_batch(), deterministic=True))
    paths = list(_flat(shapes["params"]))
    assert paths and not [p for p in paths if "bias" in p]

# The parameter counts the config files document for their sizes, at the models'
# default vocabularies (BERT 30522, max_len 512, tied readout, no attention key bias:
# layers x d_model fewer than google-research/bert; causal LM 50304, untied readout,
# no biases, embedding and readout included).
BERT_COUNTS = dict(tiny=4_433_212, mini=11_266_876, small=29_056_828, medium=41_664_316,
                   base=110_097_212, large=336_201_532)
LM_COUNTS = {"tiny": 13_304_448, "125m": 162_220_800, "350m": 411_354_112,
             "760m": 834_086_400, "1.3b": 1_439_270_912}
SHAPE = ("num_layers", "d_model", "num_heads", "mlp_dim")


def test_sizes_have_the_documented_parameter_counts():
    bb = {k: v[:1, :8] if v.ndim == 2 else v[:1] for k, v in bert_batch(all_positions=False).items()}
    lb = {k: v[:1, :8] for k, v in lm_batch().items()}
    for name, count in BERT_COUNTS.items():
        shape = {k: load_config(f"configs/bert.py:{name},param=sp").model[k] for k in SHAPE}
        # scan_layers: trace one layer (same parameter count, faster).
        assert _count(bert.BertForPreTraining(bert.BertConfig(scan_layers=True, **shape)), bb) == count, name
    for name, count in LM_COUNTS.items():
        shape = {k: load_config(f"configs/causal_lm.py:{name}").model[k] for k in SHAPE}
        assert _count(causal_lm.CausalLM(causal_lm.CausalLMConfig(scan_layers=True, **shape)), lb) == count, name
    assert abs(BERT_COUNTS["base"] - 110e6) < 2e6 and abs(BERT_COUNTS["large"] - 340e6) < 6e6


def test_classifier_loads_pretraining_encoder():
    batch = bert_batch(all_positions=False)
    cfg = bert.BertConfig(vocab_size=V, d_model=D, num_layers=2, num_heads=4,
                          mlp_dim=MLP_BERT, max_len=L, tie_embeddings=True)
    pre = init_params(bert.BertForPreTraining(cfg), batch)  # tied readout
    clf_model = bert.BertForSequenceClassification(cfg, num_classes=3)
    cbatch = dict(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"],
                  input_mask=batch["input_mask"], label=np.arange(B) % 3)
    clf = jax.eval_shape(lambda: clf_model.init(jax.random.key(0), cbatch, deterministic=True))
    clf = clf["params"]
    for sub in ("encoder", "pooler"):
        assert jax.tree.structure(nn.unbox(pre[sub])) == jax.tree.structure(nn.unbox(clf[sub]))
    params = nn.unbox(dict(clf, encoder=pre["encoder"], pooler=pre["pooler"],
                           classifier=jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                                                   nn.unbox(clf["classifier"]))))
    loss, metrics = jit(lambda p: clf_model.apply({"params": p}, cbatch,
                                                      deterministic=True))(params)
    assert np.isfinite(float(loss)) and set(metrics) == {"loss", "accuracy"}


def test_dropout_and_precision():
    batch = lm_batch()
    model = lm_model("umup", dropout=0.1)
    params = nn.unbox(init_params(model, batch))
    ids = batch["input_ids"]

    @jit
    def run(params):
        det = model.apply({"params": params}, batch, deterministic=True)[0]
        drop = model.apply({"params": params}, batch, deterministic=False,
                           rngs={"dropout": jax.random.key(3)})[0]
        logits = {p: lm_model("umup", precision=p).apply(
            {"params": params}, ids, method=causal_lm.CausalLM.logits)
            for p in ("fp32", "bf16", "fp8")}
        return det, drop, logits

    det, drop, logits = run(params)
    assert float(det) != float(drop) and abs(float(drop - det)) < 0.5
    assert all(v.dtype == jnp.float32 for v in logits.values())

    def rel(a, b):
        return _rms(a - b) / _rms(b)

    assert 0 < rel(logits["bf16"], logits["fp32"]) < 0.05
    assert rel(logits["bf16"], logits["fp32"]) < rel(logits["fp8"], logits["fp32"]) < 0.3


@pytest.mark.parametrize("kw, field", [
    (dict(num_heads=5), "num_heads"), (dict(param="mup"), "param"),
    (dict(precision="fp4"), "precision"), (dict(norm_position="sandwich"), "norm_position"),
    (dict(param="sp", attn_mult=2.0), "umup"), (dict(position="alibi"), "position"),
])
def test_bad_config_raises_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        bert.BertConfig(**dict(dict(d_model=64, num_heads=4), **kw))


def test_missing_batch_field():
    model = lm_model("umup")
    batch = lm_batch()
    del batch["weights"]
    with pytest.raises(ValueError, match="weights"):
        model.init(jax.random.key(0), batch, deterministic=True)
