"""`unit_scaling.export` checked by the real client: each export is loaded by the
`transformers` library's Flax classes (`FlaxBertForPreTraining`,
`FlaxLlamaForCausalLM`, reading the PyTorch-layout safetensors) and its logits must
equal this project's (`export.reference_logits`) to 1e-4 of their largest magnitude,
in float32, for sp, unit and umup. The models are built here with non-trivial random
weights (norm gains and biases included), dropout on (its eval-mode scales), and
u-μP mults away from 1; nothing is downloaded."""

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: never the hub

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import run, tiny
from unit_scaling import export
from unit_scaling.generate import load_run
from unit_scaling.models import bert, causal_lm
from unit_scaling.train import tasks
from unit_scaling.train.rundir import RunDir

transformers = pytest.importorskip("transformers")

UMUP_MULTS = dict(act_mult=1.7, attn_mult=0.6, residual_mult=1.3, residual_attn_ratio=0.8,
                  loss_mult=1.9)
SHAPE = dict(vocab_size=96, d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_len=16)
LENGTH = 12  # BERT's export length (the padded length of its inputs)


def _mults(param):
    return UMUP_MULTS if param == "umup" else {}


def _perturbed(params, seed):
    """Every leaf moved off its init: gains off 1, biases off 0, weights reshuffled."""
    leaves, tree = jax.tree.flatten(nn.unbox(params))
    keys = jax.random.split(jax.random.key(seed), 2 * len(leaves))
    out = []
    for i, x in enumerate(leaves):
        rms = float(jnp.sqrt(jnp.mean(jnp.square(x))))
        noise = rms if rms > 0 and x.ndim > 1 else 0.3
        out.append(x * (1 + 0.2 * jax.random.normal(keys[2 * i], x.shape))
                   + noise * 0.5 * jax.random.normal(keys[2 * i + 1], x.shape))
    return jax.tree.unflatten(tree, out)


def _bert(param, seed=0, **fields):
    cfg = bert.BertConfig(**SHAPE, param=param, dropout=0.1, attention_dropout=0.2,
                          **{**_mults(param), **fields})
    b, p = 2, 3
    batch = dict(input_ids=jnp.ones((b, LENGTH), jnp.int32),
                 segment_ids=jnp.zeros((b, LENGTH), jnp.int32),
                 input_mask=jnp.ones((b, LENGTH), jnp.int32),
                 masked_lm_positions=jnp.zeros((b, p), jnp.int32),
                 masked_lm_ids=jnp.zeros((b, p), jnp.int32),
                 masked_lm_weights=jnp.ones((b, p)), next_sentence_label=jnp.zeros((b,), jnp.int32))
    params = bert.BertForPreTraining(cfg).init(jax.random.key(seed), batch,
                                               deterministic=True)["params"]
    return cfg, _perturbed(params, seed + 1)


def _causal(param, seed=0, **fields):
    # max_len >= 2 head_dim: FlaxLlamaForCausalLM's rotary table is cut to
    # max_position_embeddings columns (transformers 4.57).
    cfg = causal_lm.CausalLMConfig(**{**SHAPE, "max_len": 32}, param=param, dropout=0.1,
                                   attention_dropout=0.2,
                                   **{**_mults(param), **fields})
    params = causal_lm.CausalLM(cfg).init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32),
                                          method=causal_lm.CausalLM.logits)["params"]
    return cfg, _perturbed(params, seed + 1)


def _close(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 1e-4, f"relative error {err:.2e}"
    return err


def _hf(cls, out, *args, **kwargs):
    """The Hugging Face model of the export at `out` applied to the inputs (its Flax code
    relies on NumPy rank promotion, which this suite otherwise raises on)."""
    with jax.numpy_rank_promotion("allow"):
        return cls.from_pretrained(out)(*args, **kwargs)


def _bert_inputs(vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (3, LENGTH)).astype(np.int32)
    segments = np.zeros_like(ids)
    segments[:, LENGTH // 2:] = 1
    mask = np.ones_like(ids)
    mask[1, -3:] = 0  # padding
    ids[1, -3:] = 0
    segments[1, -3:] = 0
    return ids, segments, mask


def _check_bert(cfg, params, tmp_path):
    out = export.write(export.checkpoint(cfg, params, seq_len=LENGTH), tmp_path / "bert")
    ids, segments, mask = _bert_inputs(cfg.vocab_size)
    got = _hf(transformers.FlaxBertForPreTraining, out, ids, attention_mask=mask,
              token_type_ids=segments)
    want = export.reference_logits(cfg, params, ids, segments, mask)
    _close(got.prediction_logits, want["mlm"])
    _close(got.seq_relationship_logits, want["nsp"])
    return out


def _check_causal(cfg, params, tmp_path):
    out = export.write(export.checkpoint(cfg, params), tmp_path / "llama")
    ids = np.random.default_rng(0).integers(5, cfg.vocab_size, (2, 10)).astype(np.int32)
    want = export.reference_logits(cfg, params, ids)["logits"]
    _close(_hf(transformers.FlaxLlamaForCausalLM, out, ids).logits, want)
    return out


@pytest.mark.parametrize("param", ["sp", "unit", "umup"])
def test_bert_export_loads_as_bert_for_pretraining(param, tmp_path):
    cfg, params = _bert(param)
    out = _check_bert(cfg, params, tmp_path)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["BertForPreTraining"]
    assert config["tie_word_embeddings"] and config["unit_scaling"]["seq_len"] == LENGTH


@pytest.mark.parametrize("param", ["sp", "unit", "umup"])
def test_causal_export_loads_as_llama(param, tmp_path):
    cfg, params = _causal(param)
    _check_causal(cfg, params, tmp_path)


def test_bert_variants_untied_no_bias_sinusoidal_scanned(tmp_path):
    cfg, params = _bert("umup", seed=3, tie_embeddings=False, use_bias=False,
                        position="sinusoidal", scan_layers=True)
    _check_bert(cfg, params, tmp_path)


def test_causal_variants_tied_scanned_linear_temperature(tmp_path):
    cfg, params = _causal("unit", seed=4, tie_embeddings=True, scan_layers=True,
                          unit_attn_temperature="linear")
    _check_causal(cfg, params, tmp_path)


@pytest.mark.parametrize("model, field, value", [
    ("bert", "norm_position", "pre"), ("bert", "norm", "rms_norm"),
    ("bert", "activation", "swiglu"), ("bert", "position", "rope"),
    ("causal", "norm_position", "post"), ("causal", "norm", "layer_norm"),
    ("causal", "activation", "gelu"), ("causal", "position", "learned"),
    ("causal", "use_bias", True),
])
def test_refuses_what_the_target_class_cannot_express(model, field, value):
    cls = bert.BertConfig if model == "bert" else causal_lm.CausalLMConfig
    cfg = cls(**SHAPE, param="umup", **{field: value})
    with pytest.raises(export.ExportError, match=f"{field}={value!r} cannot be exported"):
        export.check_exportable(cfg)


def test_export_a_causal_run_from_the_command_line(tmp_path):
    workdir = tmp_path / "run"
    run(tiny("causal_lm", param="umup", steps=2, checkpoint_every=2), workdir)
    out = tmp_path / "export"
    done = subprocess.run(
        [sys.executable, "-m", "unit_scaling.export", f"--workdir={workdir}", f"--out={out}"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert "LlamaForCausalLM (umup, step 2)" in done.stdout
    assert (out / "tokenizer.model").read_bytes() == (workdir / "tokenizer.model").read_bytes()
    model, params, tokenizer, _ = load_run(str(workdir))
    text = "In the beginning God created"
    ids = np.concatenate([[2], tokenizer.encode(text)]).astype(np.int32)[None]
    want = export.reference_logits(model.config, params, ids)["logits"]
    _close(_hf(transformers.FlaxLlamaForCausalLM, out, ids).logits, want)
    # The run's tokenizer, read by Hugging Face's: [CLS] (2) starts a document.
    assert transformers.LlamaTokenizer.from_pretrained(out)(text)["input_ids"] == ids[0].tolist()


def test_export_a_bert_run_at_its_sequence_length(tmp_path):
    config = tiny("mlm_nsp", param="unit", steps=2, checkpoint_every=2)
    run(config, tmp_path / "run")
    out = export.export_run(str(tmp_path / "run"), str(tmp_path / "export"))
    with open(os.path.join(out, "config.json")) as f:
        meta = json.load(f)["unit_scaling"]
    assert meta["seq_len"] == config.data.seq_len and meta["step"] == 2
    cfg = tasks.model_config(config, config.data.vocab_size)
    params, _ = RunDir(tmp_path / "run").restore_params()
    ids = np.random.default_rng(1).integers(5, cfg.vocab_size, (2, config.data.seq_len))
    got = _hf(transformers.FlaxBertForPreTraining, out, ids.astype(np.int32))
    want = export.reference_logits(cfg, params, ids)
    _close(got.prediction_logits, want["mlm"])
    _close(got.seq_relationship_logits, want["nsp"])
