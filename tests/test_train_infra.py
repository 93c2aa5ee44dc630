"""Mesh, optimizer, loss scaling, metrics and checkpoints of the training loop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers import train_config
from unit_scaling.train import checkpoint, mesh as mesh_lib, metrics, optimizer


# ------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize("sizes,expected", [
    ({"data": -1}, (8, 1, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, (1, 4, 2)),
])
def test_mesh_shape(sizes, expected):
    assert mesh_lib.mesh_shape(sizes, 8) == expected
    assert mesh_lib.make_mesh(sizes).devices.shape == expected


@pytest.mark.parametrize("sizes,match", [
    ({"data": 3}, "needs 3 devices but there are 8"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": -1, "tensor": 3}, "not divisible"),
    ({"model": 8}, "unknown axes"),
])
def test_mesh_errors_name_the_field(sizes, match):
    with pytest.raises(ValueError, match=match) as e:
        mesh_lib.mesh_shape(sizes, 8)
    assert "config.mesh" in str(e.value)


def test_batch_size_must_divide_batch_shards():
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh_lib.check_batch_size(8, mesh) == 8
    with pytest.raises(ValueError, match="global_batch_size=6 must be a positive multiple"):
        mesh_lib.check_batch_size(6, mesh)


# ------------------------------------------------------------------------- optimizer


def test_schedule_warmup_then_cosine():
    s = optimizer.learning_rate_schedule(train_config())
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(5e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(100)) == pytest.approx(1e-4, rel=1e-4)
    lin = optimizer.learning_rate_schedule(train_config(schedule="linear", warmup_steps=0))
    assert float(lin(50)) == pytest.approx(1e-3 - 0.5 * 0.9e-3)


@pytest.mark.parametrize("field,value,match", [
    ("schedule", "step", "config.train.schedule"),
    ("steps", -1, "config.train.steps"),
    ("warmup_steps", 500, "config.train.warmup_steps"),
    ("optimizer", "adagrad", "config.train.optimizer"),
    ("grad_accum", 0, "config.train.grad_accum"),
    ("loss_scale", "auto", "config.train.loss_scale"),
])
def test_bad_train_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        cfg = train_config(**{field: value})
        optimizer.make_optimizer(cfg)
        optimizer.make_loss_scale(cfg)


def test_adamw_equals_optax_adamw():
    """Without per-tensor factors the chain is exactly optax's AdamW (+ clipping)."""
    cfg = train_config(grad_clip=0.0)
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.ones(4)}
    grads = jax.tree.map(lambda p: jnp.cos(p * 3), params)
    ours = optimizer.make_optimizer(cfg)
    ref = optax.adamw(optimizer.learning_rate_schedule(cfg), b1=0.9, b2=0.98, eps=1e-8,
                      weight_decay=0.01)
    s1, s2 = ours.init(params), ref.init(params)
    for _ in range(12):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = ref.update(grads, s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_per_tensor_lr_multiplies_update_but_not_decay_transform():
    cfg = train_config(grad_clip=0.0, weight_decay=0.0, warmup_steps=0, schedule="constant")
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 0.5)}
    base = optimizer.make_optimizer(cfg)
    scaled = optimizer.make_optimizer(cfg, per_tensor_lr=optax.scale(0.25))
    u_base, _ = base.update(grads, base.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    np.testing.assert_allclose(u_scaled["w"], 0.25 * u_base["w"], rtol=1e-6)


def test_gradient_accumulation_averages_microbatches():
    cfg = train_config(grad_clip=0.0, weight_decay=0.0, grad_accum=2, optimizer="sgd",
                       momentum=0.0, warmup_steps=0, schedule="constant", lr=1.0)
    tx = optimizer.make_optimizer(cfg)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    u1, state = tx.update({"w": jnp.array([1.0, 2.0, 3.0])}, state, params)
    assert np.all(np.asarray(u1["w"]) == 0)  # no update in the middle of an accumulation
    u2, state = tx.update({"w": jnp.array([3.0, 2.0, 1.0])}, state, params)
    np.testing.assert_allclose(u2["w"], [-2.0, -2.0, -2.0])


def test_dynamic_loss_scale_halves_on_overflow():
    ls = optimizer.make_loss_scale(train_config(loss_scale="dynamic", loss_scale_value=1024.0))
    ls = ls.adjust(jnp.bool_(False))
    assert float(ls.loss_scale) == 512.0
    assert float(optimizer.make_loss_scale(train_config()).loss_scale) == 1.0


# --------------------------------------------------------------------------- metrics


def test_flops_match_hand_count():
    shape = metrics.TransformerShape(num_layers=2, d_model=8, num_heads=2, head_dim=4,
                                     mlp_dim=32, vocab_size=10, glu=False, causal=True)
    b, s = 3, 5
    tokens = b * s
    per_layer = 2 * tokens * (8 * 24 + 8 * 8) + 2 * tokens * 8 * 32 * 2 + 4 * b * s * s * 8 / 2
    expected = 3 * (2 * per_layer + 2 * tokens * 8 * 10)
    assert metrics.train_flops_per_step(shape, b, s) == pytest.approx(expected)


def test_peak_flops_table():
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_per_device("NVIDIA H100 80GB HBM3", fp8=True) == 2 * 989e12
    assert metrics.peak_flops_per_device("TPU v5 lite") == 197e12
    assert metrics.peak_flops_per_device("cpu") is None


def test_metric_writer(tmp_path):
    w = metrics.MetricWriter(str(tmp_path), enabled=True)
    w.write(1, {"train/loss": jnp.float32(2.5), "train/lr": 1e-3})
    w.write(2, {"train/loss": float("nan")})
    w.close()
    rows = metrics.read_metrics(str(tmp_path))
    assert rows == [{"step": 1, "train/loss": 2.5, "train/lr": 1e-3},
                    {"step": 2, "train/loss": "nan"}]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


# ----------------------------------------------------------------------- checkpoints


def make_state(mesh):
    spec = {"w": P("fsdp", "tensor"), "b": P(), "step": P()}
    state = {"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.ones(4, jnp.bfloat16),
             "step": jnp.int32(7)}
    shardings = {k: NamedSharding(mesh, s) for k, s in spec.items()}
    return jax.device_put(state, shardings), shardings


CONFIG = {"model": {"d_model": 8, "num_layers": 1}, "param": "umup", "data": {"vocab_size": 10}}


@pytest.mark.parametrize("restore_devices", [4, 1])
def test_checkpoint_restores_on_another_mesh(tmp_path, restore_devices):
    state, _ = make_state(mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    ckpt = checkpoint.Checkpointer(str(tmp_path), CONFIG, every=5, keep=2)
    assert not ckpt.save(3, state)  # not due
    for step in (5, 10, 15):
        assert ckpt.save(step, state, {"epoch": 1, "index": step})
    ckpt.close()
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [10, 15]

    small = mesh_lib.make_mesh({"fsdp": -1}, devices=jax.devices()[:restore_devices])
    _, shardings = make_state(small)
    ckpt = checkpoint.Checkpointer(str(tmp_path), CONFIG, every=5, keep=2)
    restored, data_state, step = ckpt.restore(checkpoint.abstract_like(state, shardings))
    ckpt.close()
    assert step == 15 and data_state == {"epoch": 1, "index": 15}
    for key in state:
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(state[key]))
        assert restored[key].dtype == state[key].dtype
    assert restored["w"].sharding.mesh.devices.size == restore_devices


def test_checkpoint_from_another_model_is_a_clear_error(tmp_path):
    state, shardings = make_state(mesh_lib.make_mesh({"data": -1}))
    ckpt = checkpoint.Checkpointer(str(tmp_path), CONFIG, every=1, keep=1)
    ckpt.save(1, state)
    ckpt.close()
    other = json.loads(json.dumps(CONFIG))
    other["model"]["d_model"] = 16
    ckpt = checkpoint.Checkpointer(str(tmp_path), other, every=1, keep=1)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"model.d_model: 8 -> 16"):
        ckpt.restore(checkpoint.abstract_like(state, shardings))
    ckpt.close()
