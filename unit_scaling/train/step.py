"""The train state and the jitted train and eval steps.

A model is any Flax module whose `apply({"params": p}, batch, deterministic=...,
rngs={"dropout": key})` returns `(loss, metrics)` with scalar entries. The step computes
gradients of the (loss-scaled) loss, unscales them, applies the optax update, and
skips it when a dynamic loss scale saw non-finite gradients. It reports the loss and
metrics under `train/`, the gradient and update norms, the learning rate, and whether
every gradient was finite (the loop stops on a non-finite loss).
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax

from unit_scaling.train import optimizer as optimizer_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates done
    params: Any
    opt_state: Any
    loss_scale: jmp.LossScale
    rng: jax.Array  # raw uint32 key data, so that it checkpoints as a plain array


def init_variables(model, batch, seed: int) -> tuple[Any, jax.Array]:
    """`(variables, rng)`: the model's variables at init, still in their logical-axis
    boxes, and the train state's rng key, both from the run's `seed`. The one place
    that derives them: `init_state`, the trainer's abstract state and `python -m
    unit_scaling.analysis` (which thus sees a run's step 0)."""
    init_key, rng = jax.random.split(jax.random.key(seed))
    return model.init({"params": init_key}, batch, deterministic=True), rng


def init_state(model, tx, loss_scale, batch, seed: int, boxed: bool = False) -> TrainState:
    """Initialises a `TrainState` (call under `jax.jit(..., out_shardings=...)`).
    `boxed`: keep the parameters' logical-axis boxes (for the state's shardings)."""
    variables, rng = init_variables(model, batch, seed)
    params = flax.core.unfreeze(variables)["params"]
    if not boxed:
        params = flax.linen.meta.unbox(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        loss_scale=loss_scale,
        rng=jax.random.key_data(rng),
    )


def rms(tree: Any) -> jax.Array:
    """RMS over all elements of a pytree (float32)."""
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]
    total = sum(jnp.sum(jnp.square(x)) for x in leaves)
    return jnp.sqrt(total / max(sum(x.size for x in leaves), 1))


def make_train_step(model, tx: optax.GradientTransformation, schedule: Callable,
                    param_rounding: str = "nearest", per_tensor_rms: bool = True) -> Callable:
    """`train_step(state, batch) -> (state, metrics)`; jit it with shardings.

    `param_rounding`: how updates round into the parameters (`optimizer.apply_updates`).
    `per_tensor_rms`: also return `_rms`, the RMS of every parameter, gradient and
    update (three reductions per tensor, ~100 small kernels for a 4-layer model);
    the trainer asks for them only when `train.rms_every` logs them."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        keys = jax.random.split(jax.random.wrap_key_data(state.rng),
                                3 if param_rounding == "stochastic" else 2)
        rng, dropout_key = keys[0], keys[1]  # (nearest: the same keys as ever)

        def loss_fn(params):
            loss, metrics = model.apply(
                {"params": params}, batch, deterministic=False, rngs={"dropout": dropout_key}
            )
            return state.loss_scale.scale(loss), (loss, metrics)

        grads, (loss, model_metrics) = jax.grad(loss_fn, has_aux=True)(state.params)
        grads = state.loss_scale.unscale(grads)
        finite = jmp.all_finite(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optimizer_lib.apply_updates(state.params, updates, param_rounding, keys[-1])
        # A dynamic loss scale skips steps with overflowing gradients (and halves);
        # otherwise a non-finite gradient goes through and the loop stops the run.
        skip = jnp.logical_and(jnp.logical_not(finite), isinstance(state.loss_scale, jmp.DynamicLossScale))
        params, opt_state = jmp.select_tree(skip, (state.params, state.opt_state), (params, opt_state))
        new_state = state.replace(
            step=state.step + jnp.where(skip, 0, 1),
            params=params,
            opt_state=opt_state,
            loss_scale=state.loss_scale.adjust(finite),
            rng=jax.random.key_data(rng),
        )
        metrics = {f"train/{k}": v for k, v in model_metrics.items()}
        metrics.update({
            "train/loss": loss,
            "train/lr": schedule(state.step),
            "train/grad_norm": optax.tree.norm(grads),
            "train/update_rms": rms(updates),
            "train/param_rms": rms(params),
            "train/grads_finite": finite,
            "train/loss_scale": state.loss_scale.loss_scale,
        })
        # Per-tensor diagnostics (keys with "_" are not logged as scalars): which
        # gradients are finite (the same reductions as `all_finite`'s, which XLA shares),
        # and, when asked for, the RMS of every parameter, gradient and update.
        metrics["_finite"] = jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
        if per_tensor_rms:
            metrics["_rms"] = {
                name: jax.tree.map(rms, tree)
                for name, tree in (("params", params), ("grads", grads), ("updates", updates))
            }
        return new_state, metrics

    return train_step


def make_eval_step(model) -> Callable:
    """`eval_step(params, batch) -> metrics` (deterministic), under `eval/`."""

    def eval_step(params, batch):
        loss, metrics = model.apply({"params": params}, batch, deterministic=True)
        return {"eval/loss": loss, **{f"eval/{k}": v for k, v in metrics.items()}}

    return eval_step


def non_finite_paths(tree: Any, limit: int = 10) -> list[str]:
    """Key paths of the first `limit` leaves that hold a NaN or inf, or are False (a
    tree of "is finite" flags)."""
    bad = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        if not (leaf.all() if leaf.dtype == bool else np.isfinite(leaf).all()):
            bad.append(jax.tree_util.keystr(path))
            if len(bad) == limit:
                break
    return bad


def flatten_rms(rms_trees: dict) -> dict[str, float]:
    """`{"rms/grads/encoder/layer_0/...": value}` from the step's `_rms` trees."""
    flat = {}
    for name, tree in rms_trees.items():
        for path, value in jax.tree_util.tree_leaves_with_path(tree):
            keys = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            flat[f"rms/{name}/{keys}"] = float(value)
    return flat
