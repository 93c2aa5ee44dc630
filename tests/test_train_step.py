"""The train state and step on a toy model: loss falls, loss scaling, non-finite
handling; and sharded equals single-device, for the toy model and tiny BERT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.helpers import Toy, tiny, train_config
from unit_scaling.train import mesh as mesh_lib, optimizer, step as step_lib, trainer as trainer_lib


def batch(n=16, scale=1.0):
    x = jax.random.normal(jax.random.key(0), (n, 4))
    return {"x": x, "y": jnp.sin(x.sum(-1)), "scale": jnp.full((n,), scale)}


def setup(**overrides):
    cfg = train_config(warmup_steps=0, schedule="constant", lr=1e-2, **overrides)
    tx = optimizer.make_optimizer(cfg)
    state = step_lib.init_state(Toy(), tx, optimizer.make_loss_scale(cfg), batch(), seed=0)
    return state, step_lib.make_train_step(Toy(), tx, optimizer.learning_rate_schedule(cfg))


def test_loss_falls_and_metrics_reported():
    state, train_step = setup()
    train_step = jax.jit(train_step, donate_argnums=0)
    losses = []
    for _ in range(30):
        state, m = train_step(state, batch())
        losses.append(float(m["train/loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30
    assert {"train/mse", "train/lr", "train/grad_norm", "train/grads_finite"} <= set(m)


def test_dynamic_loss_scale_skips_overflow():
    state, train_step = setup(loss_scale="dynamic", loss_scale_value=2.0**10)
    before = state.params
    state, m = jax.jit(train_step)(state, batch(scale=np.inf))
    assert not bool(m["train/grads_finite"])
    assert int(state.step) == 0 and float(state.loss_scale.loss_scale) == 2.0**9
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert step_lib.non_finite_paths({"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan])}) == ["['b']"]


def test_sharded_step_matches_one_device():
    """A train step sharded over the 8 devices equals the same step on one device, in
    both ways the step is sharded:

    - the toy model (one Adam step), its state replicated and the batch split over
      data x fsdp = 4 x 2: data parallelism alone, equal to float32 rounding;
    - tiny BERT (two steps), the trainer's state shardings (`trainer.build`) over data x
      fsdp x tensor = 2x2x2. SGD, not Adam: the key bias has a gradient that is exactly
      zero in theory (softmax ignores a constant shift), and Adam would turn its float
      noise, which differs between layouts, into full-size updates."""
    # The toy, data x fsdp = 4 x 2, its state replicated.
    state, train_step = setup()
    ref_state, ref_metrics = jax.jit(train_step)(state, batch())
    mesh = mesh_lib.make_mesh({"data": 4, "fsdp": 2})
    replicated = jax.tree.map(lambda _: NamedSharding(mesh, P()), state)
    data = jax.device_put(batch(), mesh_lib.batch_sharding(mesh))
    sharded = jax.jit(train_step, in_shardings=(replicated, mesh_lib.batch_sharding(mesh)),
                      out_shardings=(replicated, None))
    new_state, metrics = sharded(jax.device_put(state, replicated), data)
    np.testing.assert_allclose(metrics["train/loss"], ref_metrics["train/loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # Tiny BERT, 2x2x2 (data x fsdp x tensor), the trainer's shardings.
    config = tiny(steps=2, optimizer="sgd", lr=0.1)
    results = {}
    for name, sizes, devices in (("one", {"data": 1}, jax.devices()[:1]),
                                 ("2x2x2", {"data": 2, "fsdp": 2, "tensor": 2}, None)):
        config.mesh.update(data=1, fsdp=1, tensor=1)
        config.mesh.update(sizes)
        trainer = trainer_lib.build(config, devices=devices)
        local = [trainer.first, next(trainer.task.train_batches)]
        trainer.close()
        with trainer.context():
            state = trainer.init(trainer.global_batch(local[0]))
            for b in local:
                state, m = trainer.train_step(state, trainer.global_batch(b))
            results[name] = (float(m["train/loss"]), jax.device_get(state.params))
    assert results["2x2x2"][0] == pytest.approx(results["one"][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(results["2x2x2"][1]), jax.tree.leaves(results["one"][1])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
