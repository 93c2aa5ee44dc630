"""Every preset of every config file loads, builds its model config, and bad input fails
early with the field's name."""

import pytest

from tests.test_data_helpers import load_config
from tests.test_models import _count, bert_batch, lm_batch
from unit_scaling.models import bert, causal_lm
from unit_scaling.train import tasks

PRESETS = [f"configs/bert.py:{s}" for s in ("tiny", "mini", "small", "medium", "base", "large")] + [
    f"configs/causal_lm.py:{s}" for s in ("tiny", "125m", "350m", "760m", "1.3b")]


@pytest.mark.parametrize("spec", PRESETS)
@pytest.mark.parametrize("param", ["sp", "unit", "umup"])
def test_every_preset_loads(spec, param):
    config = load_config(f"{spec},param={param},precision=bf16")
    assert (config.param, config.precision) == (param, "bf16")
    tasks.validate(config)
    model = tasks.model_config(config, config.data.vocab_size)
    assert model.d_model % model.num_heads == 0 and model.param == param
    for field in ("steps", "global_batch_size", "lr", "warmup_steps", "schedule", "optimizer",
                  "weight_decay", "grad_clip", "grad_accum", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints"):
        assert field in config.train, field
    assert {"data", "fsdp", "tensor", "rules"} <= set(config.mesh)


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


def test_warmup_follows_steps():
    config = load_config("configs/bert.py:tiny")
    config.train.steps = 40
    assert config.train.warmup_steps == 4


@pytest.mark.parametrize("field,value,match", [
    ("param", "mup", "config.param='mup'"),
    ("precision", "fp4", "config.precision='fp4'"),
    ("train.steps", -5, "config.train.steps=-5"),
    ("model.num_heads", 3, "num_heads=3 does not divide d_model=128"),
])
def test_bad_config_fields(field, value, match):
    config = load_config("configs/bert.py:tiny")
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(ValueError, match=match):
        tasks.validate(config)
        tasks.model_config(config, 128)
