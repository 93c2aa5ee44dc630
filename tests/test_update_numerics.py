"""Update numerics: Adam moments stored in bfloat16 (`train.moment_dtype`) and updates
rounded into bfloat16 parameters to nearest or stochastically (`train.param_rounding`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import Toy, train_config
from unit_scaling.errors import ConfigError
from unit_scaling.train import optimizer, step as step_lib


def _grads(seed, shape=(64, 32)):
    return {"w": jax.random.normal(jax.random.key(seed), shape)}


def test_bf16_moments_are_stored_narrow_and_track_float32_adam():
    params = {"w": jnp.zeros((64, 32))}
    wide = optax.scale_by_adam()
    narrow = optimizer.state_in_dtype(optax.scale_by_adam(), jnp.bfloat16)
    s_wide, s_narrow = wide.init(params), narrow.init(params)
    for step in range(5):
        u_wide, s_wide = wide.update(_grads(step), s_wide)
        u_narrow, s_narrow = narrow.update(_grads(step), s_narrow)
    assert s_narrow.mu["w"].dtype == s_narrow.nu["w"].dtype == jnp.bfloat16
    assert s_narrow.count.dtype == jnp.int32  # non-float state untouched
    assert u_narrow["w"].dtype == jnp.float32  # so the parameters round only once
    # bf16 storage of both moments: the normalised update agrees to a few bf16 ulps
    np.testing.assert_allclose(u_narrow["w"], u_wide["w"], rtol=2e-2, atol=5e-3)
    assert not np.array_equal(u_narrow["w"], u_wide["w"])  # it did round


def test_stochastic_rounding_keeps_updates_nearest_loses():
    # 1 + 2^-9 is a quarter of bf16's spacing (2^-7) above 1: nearest drops it.
    params = {"w": jnp.ones((20000,), jnp.bfloat16)}
    updates = {"w": jnp.full((20000,), 2.0**-9, jnp.float32)}
    nearest = optimizer.apply_updates(params, updates)
    assert nearest["w"].dtype == jnp.bfloat16 and np.all(nearest["w"] == 1.0)
    rounded = optimizer.apply_updates(params, updates, "stochastic", jax.random.key(0))
    values = np.asarray(rounded["w"], np.float32)
    assert rounded["w"].dtype == jnp.bfloat16
    assert set(np.unique(values)) == {1.0, 1.0 + 2.0**-7}  # the two neighbours only
    np.testing.assert_allclose(values.mean(), 1.0 + 2.0**-9, rtol=0, atol=2e-4)  # unbiased
    # float32 parameters take the sum exactly, whatever the rounding
    exact = optimizer.apply_updates({"w": jnp.ones(3)}, {"w": jnp.full(3, 2.0**-9)},
                                    "stochastic", jax.random.key(0))
    np.testing.assert_array_equal(exact["w"], 1.0 + 2.0**-9)


def test_bad_update_numerics_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="moment_dtype"):
        optimizer.make_optimizer(train_config(moment_dtype="float16"))
    with pytest.raises(ConfigError, match="param_rounding"):
        optimizer.check_update_numerics(train_config(param_rounding="up"))
    with pytest.raises(ConfigError, match="param_dtype.*bfloat16"):
        optimizer.check_update_numerics(train_config(param_rounding="stochastic"), "float32")
    optimizer.check_update_numerics(train_config(param_rounding="stochastic"), "bfloat16")


def test_train_step_with_bf16_params_and_stochastic_rounding():
    cfg = train_config(warmup_steps=0, schedule="constant", lr=1e-2, moment_dtype="bfloat16")
    x = jax.random.normal(jax.random.key(0), (16, 4))
    batch = {"x": x, "y": jnp.sin(x.sum(-1)), "scale": jnp.ones((16,))}
    tx = optimizer.make_optimizer(cfg)
    state = step_lib.init_state(Toy(), tx, optimizer.make_loss_scale(cfg), batch, seed=0)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), state.params)
    state = state.replace(params=params, opt_state=tx.init(params))
    losses = {}
    for rounding in ("nearest", "stochastic"):
        train_step = jax.jit(step_lib.make_train_step(
            Toy(), tx, optimizer.learning_rate_schedule(cfg), rounding))
        s = state
        for _ in range(20):
            s, m = train_step(s, batch)
        assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(s.params))
        losses[rounding] = float(m["train/loss"])
    first = float(step_lib.make_train_step(Toy(), tx, optimizer.learning_rate_schedule(cfg))(
        state, batch)[1]["train/loss"])
    assert max(losses.values()) < 0.7 * first  # both train
    assert losses["nearest"] != losses["stochastic"]  # and the rounding differs
