"""End to end: tiny BERT and causal LM train through `loop.run` (the code path of
train.py), one-step golden metrics per parametrization, checkpoints across meshes."""

import json
import os

import jax
import numpy as np
import pytest

from tests.test_data_helpers import small_bert_config, small_causal_config
import flax.linen as nn

from unit_scaling.train import checkpoint, loop, mesh as mesh_lib, metrics, optimizer, tasks

SMALL_MODEL = dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64)


def tiny(objective="mlm_nsp", param="umup", steps=20, **train):
    config = small_bert_config() if objective == "mlm_nsp" else small_causal_config()
    config.param = param
    config.model.update(SMALL_MODEL, dropout=0.0, attention_dropout=0.0)
    if objective == "mlm_nsp":
        config.model.max_len = 64
    config.train.update(dict(steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                             keep_checkpoints=2, lr={"sp": 3e-3, "unit": 3e-2, "umup": 1.0}[param],
                             grad_clip=1.0 if param == "sp" else 0.0), **train)
    return config


def run(config, workdir):
    loop.run(config, str(workdir), tasks.make_task)
    return metrics.read_metrics(str(workdir))


@pytest.mark.parametrize("objective", ["mlm_nsp", "causal_lm"])
def test_tiny_models_learn(objective, tmp_path):
    rows = run(tiny(objective, steps=30), tmp_path)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


# One step of each parametrization from the same seed and batch: loss and the RMS of
# the gradients, parameters and updates. Update these ONLY for an intended change of
# numerics (a new rule, init or op), and say why in the commit.
GOLDEN = {
    "sp": {"train/loss": 7.615165710449219, "train/grad_norm": 1.154326319694519,
           "train/param_rms": 0.0625564232468605, "train/update_rms": 0.0029812525026500225},
    "unit": {"train/loss": 7.633187770843506, "train/grad_norm": 252.54519653320312,
             "train/param_rms": 0.9836651086807251, "train/update_rms": 0.029989367350935936},
    "umup": {"train/loss": 7.633351802825928, "train/grad_norm": 251.44174194335938,
             "train/param_rms": 1.0015498399734497, "train/update_rms": 0.23218080401420593},
}


@pytest.mark.parametrize("param", ["sp", "unit", "umup"])
def test_one_step_golden_metrics(param, tmp_path):
    (row,) = run(tiny(param=param, steps=1), tmp_path)
    got = {k: row[k] for k in ("train/loss", "train/grad_norm", "train/param_rms", "train/update_rms")}
    print(param, json.dumps(got))
    for key, expected in GOLDEN[param].items():
        assert got[key] == pytest.approx(expected, rel=1e-4), (
            f"{param} {key}: {got[key]} != golden {expected}. If this change of numerics is "
            "intended, update GOLDEN in tests/test_train.py and say why in the commit.")


def test_checkpoint_from_8_devices_restores_on_4_and_1(tmp_path):
    config = tiny(steps=2, checkpoint_every=2)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    run(config, tmp_path)
    task = tasks.make_task(config)
    local = next(task.train_batches)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    loss_scale = optimizer.make_loss_scale(config.train)
    for devices in (4, 1):
        mesh = mesh_lib.make_mesh({"fsdp": -1}, devices=jax.devices()[:devices])
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            example = loop.global_batch(local, mesh_lib.batch_sharding(mesh))
            _, init, shardings = loop.plan_state(task, config.train, loss_scale, mesh, rules,
                                                 example, config.seed)
            abstract = jax.eval_shape(init, example)
        ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"),
                                       json.loads(config.to_json_best_effort()), every=0, keep=2)
        state, data_state, step = ckpt.restore(checkpoint.abstract_like(abstract, shardings))
        ckpt.close()
        assert step == 2 and data_state
        for path, leaf in jax.tree_util.tree_leaves_with_path(state):
            assert leaf.sharding.mesh.devices.size == devices, jax.tree_util.keystr(path)
    task.close()
