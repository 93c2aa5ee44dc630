"""Every preset of every config file loads, builds its model config, and bad input fails
early with the field's name."""

import pytest

from configs.common import load_config
from unit_scaling.train import tasks, trainer

PRESETS = [f"configs/bert.py:{s}" for s in ("tiny", "mini", "small", "medium", "base", "large")] + [
    f"configs/causal_lm.py:{s}" for s in ("tiny", "125m", "350m", "760m", "1.3b")]


@pytest.mark.parametrize("spec", PRESETS)
@pytest.mark.parametrize("param", ["sp", "unit", "umup"])
def test_every_preset_loads(spec, param):
    config = load_config(f"{spec},param={param},precision=bf16")
    assert (config.param, config.precision) == (param, "bf16")
    tasks.validate(config)
    trainer.check_train_config(config.train)
    model = tasks.model_config(config, config.data.vocab_size)
    assert model.d_model % model.num_heads == 0 and model.param == param
    for field in ("steps", "global_batch_size", "lr", "warmup_steps", "schedule", "optimizer",
                  "weight_decay", "grad_clip", "grad_accum", "log_every", "eval_every",
                  "checkpoint_every", "keep_checkpoints"):
        assert field in config.train, field
    assert {"data", "fsdp", "tensor", "rules"} <= set(config.mesh)


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
        trainer.check_train_config(config.train)
        tasks.model_config(config, 128)
