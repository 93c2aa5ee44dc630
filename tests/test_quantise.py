"""Post-training compression (#14 items 3-5): 8-bit storage, weight quantisation of a
params tree, the 8-bit KV cache, low-rank projections, the decode steps (one
compilation for every token, no prompt recomputation) and the flags' errors."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unit_scaling import compress
from unit_scaling.errors import ConfigError
from unit_scaling.formats import E4M3FN, PLAIN_INT8_SCALE, quantise, round_trip, store
from unit_scaling.models import causal_lm

V, D, L = 64, 32, 24


def lm(param="umup", **kw):
    kw = dict(dict(num_layers=1), **kw)  # one layer: these tests are mostly compilation
    return causal_lm.CausalLM(causal_lm.CausalLMConfig(
        vocab_size=V, d_model=D, num_heads=2, mlp_dim=64, max_len=L,
        param=param, **kw))


def lm_params(model):
    ids = jnp.zeros((1, 4), jnp.int32)
    key = jax.random.key(0, impl="rbg")
    init = jax.jit(lambda: model.init(key, ids, method=causal_lm.CausalLM.logits))
    return flax.linen.unbox(init()["params"])


# ---------------------------------------------------------------- storage


def test_fp8_storage_is_the_e4m3_cast_subnormals_included():
    # std 0.02 (sp's init) puts most values below E4M3's smallest normal 2^-6.
    x = jax.random.normal(jax.random.key(0), (64, 48)) * 0.02
    stored = store(x, "fp8")
    assert stored.values.dtype == jnp.float8_e4m3fn and stored.scale is None
    np.testing.assert_array_equal(stored.dequantise(), quantise(x, E4M3FN))
    assert np.mean(np.abs(np.asarray(x)) < E4M3FN.min_normal) > 0.5
    assert stored.nbytes == x.size


def test_int8_plain_cast_has_a_fixed_scale_and_per_channel_has_absmax():
    x = jax.random.normal(jax.random.key(1), (64, 48))
    plain = store(x, "int8")
    np.testing.assert_array_equal(plain.dequantise(),
                                  jnp.clip(jnp.round(x / PLAIN_INT8_SCALE), -127, 127)
                                  * PLAIN_INT8_SCALE)
    y = np.asarray(x) * np.arange(1, 49)[None]  # columns of different sizes
    per = store(y, "int8", "per_channel", (0,))
    assert per.scale.shape == (1, 48) and per.nbytes == x.size + 48 * 4
    np.testing.assert_allclose(per.scale[0], np.abs(y).max(0) / 127, rtol=1e-6)
    err = np.abs(np.asarray(per.dequantise()) - y)
    assert np.all(err <= per.scale / 2 * (1 + 1e-6))
    assert int(np.abs(per.values).max()) == 127


def test_a_plain_int8_cast_loses_an_sp_sized_tensor_but_not_a_unit_one():
    x = jax.random.normal(jax.random.key(2), (256, 64))
    rel = lambda y, s: float(jnp.sqrt(jnp.mean((round_trip(y * s, "int8") - y * s) ** 2))) / s
    assert rel(x, 1.0) < 0.01 and rel(x, 0.02) > 0.3
    with pytest.raises(ValueError, match="bf16 storage takes no scale"):
        store(x, "bf16", "per_channel")


# ---------------------------------------------------------------- params trees


def test_quantise_params_stores_the_matrices_and_counts_their_bytes():
    params = lm_params(lm())
    tree = compress.quantise_params(params, "int8", "per_channel")
    qkv = tree["stack"]["layer_0"]["attention"]["qkv_kernel"]
    assert qkv.values.dtype == jnp.int8 and qkv.scale.shape == (1, 2, 3, 16)
    assert tree["token_embed"]["embedding"].scale.shape == (V, 1)  # per token
    norm = tree["stack"]["layer_0"]["norm_0"]["scale"]
    assert not isinstance(norm, type(qkv))  # 1-D: kept
    dense = compress.dequantise_params(tree)
    flat_q = jax.tree.leaves(dense)
    flat = jax.tree.leaves(jax.tree.map(np.asarray, params))
    for a, b in zip(flat_q, flat):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=float(np.abs(b).max()) / 127 / 2 + 1e-7)
    full = compress.params_nbytes(params)
    assert full / 4 < compress.params_nbytes(tree) < full / 3.5
    assert compress.count_params(tree) == compress.count_params(params)  # scales aside


def test_an_unknown_weight_matrix_is_refused_not_skipped():
    with pytest.raises(ValueError, match="unknown weight name 'w'"):
        compress.quantise_params({"layer": {"w": np.ones((4, 4), np.float32)}}, "fp8")


def test_low_rank_is_the_truncated_svd_and_counts_the_factors():
    params = lm_params(lm(scan_layers=True, num_layers=2))  # factorised per layer
    same = compress.expand(compress.factorise(params, 1.0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), same,
                 jax.tree.map(np.asarray, params))
    tree = compress.factorise(params, 0.25)
    wi = params["stack"]["layers"]["layer"]["mlp"]["wi"]["kernel"]  # [2, 32, 64]
    low = tree["stack"]["layers"]["layer"]["mlp"]["wi"]["kernel"]
    assert low.a.shape == (2, 32, 8) and low.b.shape == (2, 8, 64)
    s = np.linalg.svd(np.asarray(wi[1], np.float64), compute_uv=False)
    err = np.linalg.norm(np.asarray(low.dense()[1]) - np.asarray(wi[1]))
    np.testing.assert_allclose(err, np.sqrt(np.sum(s[8:] ** 2)), rtol=1e-4)
    dense_proj = compress.count_params(params, projections_only=True)
    # Per layer: qkv 32x96, out 32x32, wi/wg 32x64, wo 64x32, each rank 8.
    assert dense_proj == 2 * (32 * 96 + 32 * 32 + 3 * 32 * 64)
    assert compress.count_params(tree, projections_only=True) == 2 * 8 * (
        (32 + 96) + (32 + 32) + 3 * (32 + 64))
    assert compress.count_params(tree) - compress.count_params(tree, True) == \
        compress.count_params(params) - dense_proj


# ---------------------------------------------------------------- KV cache and decoding


@pytest.mark.parametrize("kv_cache,scales", [("int8", "per_channel"), ("fp8", "none")])
def test_an_8bit_kv_cache_decodes_what_the_full_forward_computes(kv_cache, scales):
    model = lm("sp", kv_cache=kv_cache, kv_cache_scales=scales)
    params = lm_params(model)
    cache = causal_lm.init_cache(model, 2)
    layer = cache["stack"]["layer_0"]["attention"]
    assert layer["cached_key"].dtype == {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[kv_cache]
    assert ("cached_key_scale" in layer) == (scales == "per_channel")
    prompt = jax.random.randint(jax.random.key(3), (2, 5), 0, V)
    cached = causal_lm.generate(model, params, prompt, 8, jax.random.key(0), temperature=0.0)
    full = causal_lm.generate(model, params, prompt, 8, jax.random.key(0), temperature=0.0,
                              use_cache=False)
    np.testing.assert_array_equal(cached, full)
    # And the rounding is at work: the logits differ from the unquantised model's.
    plain = dataclasses.replace(model.config, kv_cache="none", kv_cache_scales="none")
    logits = lambda m: m.apply({"params": params}, prompt, method=causal_lm.CausalLM.logits)
    assert not np.allclose(logits(model), logits(causal_lm.CausalLM(plain)))


def test_the_decode_step_compiles_once_and_never_sees_the_prompt():
    model = lm()
    params = lm_params(model)
    tree, prepare = compress.compress(params, compress.Compression(weights="int8"))
    prompt = jax.random.randint(jax.random.key(4), (1, 6), 0, V)
    before = causal_lm.decode_step._cache_size()
    causal_lm.generate(model, tree, prompt, 5, jax.random.key(0), temperature=0.0,
                       prepare=prepare)
    assert causal_lm.decode_step._cache_size() == before + 1  # 4 steps, one compilation
    causal_lm.generate(model, tree, prompt[:, :3], 9, jax.random.key(1), temperature=0.0,
                       prepare=prepare)
    assert causal_lm.decode_step._cache_size() == before + 1  # new lengths, no new one
    # The step's work does not grow with the prompt: it reads the prompt from the cache.
    kw = dict(model=model, prepare=prepare, temperature=0.0)
    cache = causal_lm.init_cache(model, 1)
    step_flops = causal_lm.decode_step.lower(
        tree, cache, prompt[:, 0], jnp.int32(6), jax.random.key(0), **kw
    ).compile().cost_analysis()["flops"]
    prefill_flops = causal_lm.prefill.lower(
        tree, cache, jnp.zeros((1, 16), jnp.int32), jax.random.key(0), **kw
    ).compile().cost_analysis()["flops"]
    assert step_flops < prefill_flops / 6


def test_quantised_weights_decode_like_their_dequantised_params():
    model = lm()
    params = lm_params(model)
    tree, prepare = compress.compress(params, compress.Compression(weights="fp8"))
    prompt = jax.random.randint(jax.random.key(5), (2, 4), 0, V)
    new = causal_lm.generate(model, tree, prompt, 6, jax.random.key(0), temperature=0.0,
                             prepare=prepare)
    ref = causal_lm.generate(model, compress.dequantise_params(tree), prompt, 6,
                             jax.random.key(0), temperature=0.0)
    np.testing.assert_array_equal(new, ref)


# ---------------------------------------------------------------- the flags


@pytest.mark.parametrize("kwargs,objective,message", [
    (dict(weights="fp4"), None, "--weights=fp4: use one of fp32, bf16, fp8, int8"),
    (dict(scales="per_channel"), None, "--scales=per_channel applies to 8-bit storage"),
    (dict(weights="bf16", scales="per_channel"), None, "add --weights fp8|int8"),
    (dict(kv_cache="int8"), "mlm_nsp", "an encoder with no KV cache"),
    (dict(rank_fraction=0.0), None, r"--rank_fraction=0.0: must be in \(0, 1\]"),
    (dict(rank_fraction=0.5, weights="int8"), None, "use one of the two at a time"),
    (dict(finetune_steps=10, weights="fp8"), None, "the fine-tune trains float weights"),
    (dict(finetune_steps=-1), None, "--finetune_steps=-1: must be >= 0"),
])
def test_bad_combinations_name_the_flag(kwargs, objective, message):
    with pytest.raises(ConfigError, match=message):
        compress.Compression(**kwargs).check(objective)
    with pytest.raises(ValueError, match="kv_cache_scales='per_channel' needs an 8-bit"):
        dataclasses.replace(lm().config, kv_cache="bf16", kv_cache_scales="per_channel")


def test_evaluate_a_trained_run_under_each_compression(tmp_path):
    from tests.helpers import run, tiny
    from unit_scaling.evaluate import Evaluator

    run(tiny("causal_lm", steps=2, checkpoint_every=2), tmp_path)
    evaluator = Evaluator(str(tmp_path), eval_batches=1)
    try:
        fp32 = evaluator(compress.Compression())
        int8 = evaluator(compress.Compression(weights="int8", scales="per_channel",
                                              kv_cache="int8"))
        low = evaluator(compress.Compression(rank_fraction=0.5, finetune_steps=2))
    finally:
        evaluator.close()
    assert int8["weight_bytes"] < fp32["weight_bytes"] / 3.5
    assert int8["kv_bytes_per_token"] < fp32["kv_bytes_per_token"] / 3
    assert abs(int8["loss"] - fp32["loss"]) < 0.05 * fp32["loss"]
    assert low["projection_params"] < fp32["projection_params"]
    assert len(low["finetune_losses"]) == 2 and np.isfinite(low["loss"])
