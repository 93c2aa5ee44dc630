"""u-μP optimizer transforms: the per-tensor lr table, composition with optax chains,
and independent weight decay."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unit_scaling import optim
from unit_scaling.models import bert, causal_lm
from unit_scaling.params import ScaledParam

D, H, M, V, N = 32, 4, 64, 128, 3


def _lm_params(scan=False, param="umup"):
    cfg = causal_lm.CausalLMConfig(vocab_size=V, d_model=D, num_layers=N, num_heads=H,
                                   mlp_dim=M, max_len=16, param=param, scan_layers=scan)
    batch = dict(input_ids=jnp.zeros((1, 8), jnp.int32), targets=jnp.zeros((1, 8), jnp.int32),
                 segment_ids=jnp.ones((1, 8), jnp.int32), positions=jnp.zeros((1, 8), jnp.int32),
                 weights=jnp.ones((1, 8)))
    model = causal_lm.CausalLM(cfg)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), batch, deterministic=True))["params"]


@pytest.mark.parametrize("scan", [False, True])
def test_umup_lr_table_equals_the_rule(scan):
    table = optim.lr_table(_lm_params(scan), "umup", "adam")
    depth = N**-0.5
    layer = {
        "attention/qkv_kernel": D**-0.5 * depth,  # fused [D, H, 3, D/H]: fan_in D
        "attention/out_kernel": D**-0.5 * depth,  # [H, D/H, D]: fan_in H * D/H
        "mlp/wi/kernel": D**-0.5 * depth,
        "mlp/wg/kernel": D**-0.5 * depth,
        "mlp/wo/kernel": M**-0.5 * depth,
        "norm_0/scale": depth,
        "norm_1/scale": depth,
    }
    expected = {"token_embed/embedding": D**-0.5, "readout/kernel": 1.0,
                "stack/final_norm/scale": 1.0}
    prefixes = ["stack/layers/layer/"] if scan else [f"stack/layer_{i}/" for i in range(N)]
    for prefix in prefixes:
        expected.update({prefix + k: v for k, v in layer.items()})
    assert table.keys() == expected.keys()
    for k, v in expected.items():
        assert table[k] == pytest.approx(v, rel=1e-12), k


def test_bert_roles_in_the_table():
    cfg = bert.BertConfig(vocab_size=V, d_model=D, num_layers=N, num_heads=H, mlp_dim=M,
                          max_len=16, tie_embeddings=True)
    b = dict(input_ids=jnp.zeros((1, 8), jnp.int32), segment_ids=jnp.zeros((1, 8), jnp.int32),
             input_mask=jnp.ones((1, 8), jnp.int32),
             masked_lm_positions=jnp.zeros((1, 2), jnp.int32),
             masked_lm_ids=jnp.zeros((1, 2), jnp.int32), masked_lm_weights=jnp.ones((1, 2)),
             next_sentence_label=jnp.zeros((1,), jnp.int32))
    model = bert.BertForPreTraining(cfg)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), b, deterministic=True))["params"]
    t = optim.lr_table(params)
    for name in ("token_embed", "segment_embed", "position_embed"):
        assert t[f"encoder/{name}/embedding"] == pytest.approx(D**-0.5)
    assert t["encoder/stack/layer_1/attention/qv_bias"] == pytest.approx(N**-0.5)
    assert t["encoder/stack/layer_2/mlp/wo/kernel"] == pytest.approx((M * N) ** -0.5)
    assert t["pooler/dense/kernel"] == pytest.approx(D**-0.5)
    assert t["nsp/kernel"] == 1.0 and t["mlm_output_bias"] == 1.0
    # Post-norm: the norms on the stream get tau_mlp (`Parametrization.norm_lr_mult`),
    # the MLM head's norm keeps u-μP's factor 1.
    tau_mlp = 0.02**2 * (128 * M * 128 // D) ** 0.5 / 2  # at POST_NORM_REFERENCE_WIDTH
    assert t["encoder/embed_norm/scale"] == pytest.approx(tau_mlp)
    assert t["mlm_norm/bias"] == 1.0
    assert t["encoder/stack/layer_1/norm_0/bias"] == pytest.approx(tau_mlp * N**-0.5)
    pre = bert.BertForPreTraining(dataclasses.replace(cfg, norm_position="pre"))
    params = jax.eval_shape(lambda: pre.init(jax.random.key(0), b, deterministic=True))["params"]
    assert optim.lr_table(params)["encoder/embed_norm/scale"] == 1.0


def test_sgd_rules():
    params = _lm_params()
    assert optim.lr_table(params, "umup", "sgd") == optim.lr_table(params, "umup", "adam")
    t = optim.lr_table(params, "umup", "sgd", readout_constraint="to_output_scale")
    assert t["stack/layer_0/mlp/wo/kernel"] == pytest.approx(M**0.5 * N**-0.5)
    assert t["stack/layer_0/norm_0/scale"] == pytest.approx(D * N**-0.5)
    assert t["readout/kernel"] == 1.0 and t["token_embed/embedding"] == pytest.approx(D**0.5)


def _concrete(abstract, seed=0):
    # numpy: eager jax.random compiles a program per shape (slow on CPU).
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda l: jnp.asarray(r.standard_normal(l.shape), jnp.float32),
                        nn.unbox(abstract))


@pytest.mark.parametrize("make", [lambda: optax.adamw(1e-2, weight_decay=0.0),
                                  lambda: optax.lamb(1e-2), lambda: optax.sgd(1e-2)])
def test_composes_with_optax_chains(make):
    boxed = _lm_params()
    params, grads = _concrete(boxed, 0), _concrete(boxed, 1)
    table = optim.lr_table(boxed)

    @jax.jit
    def updates(params, grads):
        out = []
        for tx in (make(), optax.chain(make(), optim.scale_by_parametrization(boxed, "umup"))):
            out.append(tx.update(grads, tx.init(params), params)[0])
        return out

    base, scaled = updates(params, grads)
    flat_b = {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(base)[0]}
    flat_s = {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(scaled)[0]}
    for k, f in table.items():
        np.testing.assert_allclose(flat_s[k], flat_b[k] * f, rtol=1e-5, atol=1e-8)
    assert min(table.values()) < 0.2  # the factors are not trivially 1


@pytest.mark.parametrize("param", ["sp", "unit"])
def test_identity_for_sp_and_unit(param):
    boxed = _lm_params(param=param)
    assert set(optim.lr_table(boxed, param).values()) == {1.0}
    tx = optim.scale_by_parametrization(boxed, param)
    g = _concrete(boxed)
    out = tx.update(g, tx.init(g))[0]
    jax.tree.map(np.testing.assert_array_equal, out, g)


def test_independent_weight_decay():
    boxed = _lm_params()
    params = _concrete(boxed)
    zeros = jax.tree.map(jnp.zeros_like, params)
    wd, steps = 0.1, 3

    def run(peak):
        shape = optax.linear_schedule(1.0, 0.5, 10)
        sched = lambda t: peak * shape(t)  # noqa: E731
        tx = optax.chain(optax.adamw(sched, weight_decay=0.0),
                         optim.scale_by_parametrization(boxed, "umup"),
                         optim.add_independent_weight_decay(boxed, wd, peak, sched))
        @jax.jit
        def train(p):
            state = tx.init(p)
            for _ in range(steps):
                u, state = tx.update(zeros, state, p)
                p = optax.apply_updates(p, u)
            return p

        return train(params)

    p1, p2 = run(1e-3), run(1.0)
    # Same decay whatever the peak lr (and whatever the tensor's lr factor).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p1, p2)
    shape = optax.linear_schedule(1.0, 0.5, 10)
    factor = np.prod([1 - wd * float(shape(t)) for t in range(steps)])
    k = p1["stack"]["layer_0"]["mlp"]["wo"]["kernel"]
    np.testing.assert_allclose(k, params["stack"]["layer_0"]["mlp"]["wo"]["kernel"] * factor,
                               rtol=1e-5)
    emb = p1["token_embed"]["embedding"]
    np.testing.assert_allclose(emb, params["token_embed"]["embedding"] * factor, rtol=1e-5)
    # Norm gains are not decayed.
    np.testing.assert_array_equal(p1["stack"]["final_norm"]["scale"],
                                  params["stack"]["final_norm"]["scale"])


def test_params_without_roles_are_rejected():
    bad = {"w": nn.LogicallyPartitioned(jnp.ones((2, 2)), names=("embed", "mlp"))}
    with pytest.raises(ValueError, match="'w'"):
        optim.lr_table(bad)
    with pytest.raises(ValueError, match="parametrization"):
        optim.lr_table({"w": ScaledParam(jnp.ones(2), names=("embed",))}, "mu")


# ------------------------------------------------------------------ without Flax


def test_spec_path_equals_the_flax_path():
    """Plain arrays + a (role, fan_in, depth) tree give the same lr table and the same
    updates as the boxed Flax params they come from."""
    boxed = _lm_params(scan=True)
    arrays = jax.tree.map(lambda s: jax.random.normal(jax.random.key(1), s.shape, s.dtype),
                          nn.unbox(boxed))
    spec = jax.tree.map(lambda m: (m.role, m.fan_in, m.depth), optim.flax_spec(boxed),
                        is_leaf=lambda m: isinstance(m, optim.ParamSpec))
    assert optim.lr_table(arrays, spec=spec) == optim.lr_table(boxed)

    def chain(params, **kw):
        return optax.chain(optax.adam(0.1), optim.scale_by_parametrization(params, "umup", **kw),
                           optim.add_independent_weight_decay(params, 0.1, 0.1, **kw))

    grads = jax.tree.map(lambda p: jnp.cos(p), arrays)
    flax_tx, spec_tx = chain(boxed), chain(arrays, spec=spec)
    want, _ = flax_tx.update(grads, flax_tx.init(arrays), arrays)
    got, _ = spec_tx.update(grads, spec_tx.init(arrays), arrays)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_plain_dict_with_a_path_function():
    params = {"embed": jnp.ones((50, 16)), "block": {"w": jnp.ones((16, 64)), "g": jnp.ones(16)},
              "out": jnp.ones((16, 50))}

    def spec(path, leaf):
        name = jax.tree_util.keystr(path)
        depth = 4 if "block" in name else None
        if "embed" in name:
            return optim.ParamSpec("embedding")
        if "out" in name:
            return optim.ParamSpec("output")
        return optim.ParamSpec("norm" if leaf.ndim == 1 else "weight", depth=depth)

    table = optim.lr_table(params, spec=spec)
    assert table == pytest.approx({"embed": 16**-0.5, "block/w": 16**-0.5 / 2,
                                   "block/g": 0.5, "out": 1.0})
    updates, _ = optim.scale_by_parametrization(params, spec=spec).update(params, None)
    assert float(updates["block"]["w"][0, 0]) == pytest.approx(16**-0.5 / 2)
    with pytest.raises(ValueError, match="'block/g' has no u-μP role: pass `spec=`"):
        optim.scale_by_parametrization({"block": {"g": jnp.ones(3)}})
    with pytest.raises(ValueError, match="2 entries for 4 parameters"):
        optim.lr_table(params, spec={"a": ("weight", None, None), "b": ("bias", 3, None)})
    with pytest.raises(ValueError, match="role 'kernel' is unknown"):
        optim.ParamSpec("kernel")


def test_roles_match_the_parametrization():
    from unit_scaling import parametrization, params

    assert optim.ROLES == params.ROLES
    assert optim._PARAMETRIZATIONS == parametrization.PARAMETRIZATIONS
