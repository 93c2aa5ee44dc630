"""The optimizer from the config: optax AdamW / LAMB / SGD, warmup then linear or
cosine decay, global-norm clipping, gradient accumulation, and loss scaling for the
standard-parametrization baselines in FP16/FP8. `from_config(config, abstract_params)`
is the one place that builds the trainer's optimizer.

Update numerics: `train.moment_dtype` stores the Adam moments in bfloat16 or float32
(`state_in_dtype`), `train.param_rounding` rounds each update into bfloat16
parameters to nearest or stochastically (`apply_updates`, called by the train step).

The chain is `clip -> scale_by_{adam|lamb|sgd} -> per-tensor lr factors -> decoupled
decay -> [trust ratio] -> learning rate -> independent decay`: the u-μP per-tensor rule
(`unit_scaling.optim`) multiplies the normalised update before the global learning
rate, and u-μP's independent weight decay comes last, so that neither multiplies it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import jmp
import optax

from unit_scaling import formats, optim
from unit_scaling.errors import ConfigError
from unit_scaling.params import param_meta
from unit_scaling.precision import LossScaling

OPTIMIZERS = ("adamw", "lamb", "sgd")
SCHEDULES = ("cosine", "linear", "constant")
MOMENT_DTYPES = ("", "float32", "bfloat16")  # "": the parameters' dtype
PARAM_ROUNDINGS = ("nearest", "stochastic")


def learning_rate_schedule(train: Any) -> optax.Schedule:
    """Linear warmup from 0 to `train.lr` over `warmup_steps`, then `train.schedule`
    ("cosine" | "linear" to `lr * final_lr_fraction` at `steps`, or "constant")."""
    if train.steps <= 0:
        raise ConfigError(f"config.train.steps={train.steps} must be positive")
    if not 0 <= train.warmup_steps <= train.steps:
        raise ConfigError(
            f"config.train.warmup_steps={train.warmup_steps} must be in [0, "
            f"config.train.steps={train.steps}]"
        )
    if train.schedule not in SCHEDULES:
        raise ConfigError(f"config.train.schedule={train.schedule!r}: use one of {SCHEDULES}")
    if train.lr <= 0:
        raise ConfigError(f"config.train.lr={train.lr} must be positive")
    final = train.lr * train.get("final_lr_fraction", 0.0)
    decay_steps = max(train.steps - train.warmup_steps, 1)
    decay = {
        "cosine": lambda: optax.cosine_decay_schedule(train.lr, decay_steps, final / train.lr),
        "linear": lambda: optax.linear_schedule(train.lr, final, decay_steps),
        "constant": lambda: optax.constant_schedule(train.lr),
    }[train.schedule]()
    if train.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, train.lr, train.warmup_steps)
    return optax.join_schedules([warmup, decay], [train.warmup_steps])


def from_config(config: Any, abstract_params: Any) -> optax.GradientTransformation:
    """The trainer's optimizer for `config` (`train`, `param`) and the model's abstract
    boxed params (`jax.eval_shape` of its init): u-μP's per-tensor lr factors and
    independent weight decay; decoupled decay of weights, embeddings and readouts
    (not biases and norm gains) otherwise."""
    train = config.train
    per_tensor_lr = optim.scale_by_parametrization(
        abstract_params, config.param, "sgd" if train.optimizer == "sgd" else "adam")
    weight_decay = None
    if config.param == "umup" and train.weight_decay > 0:
        weight_decay = optim.add_independent_weight_decay(
            abstract_params, train.weight_decay, train.lr, learning_rate_schedule(train))
    return make_optimizer(train, per_tensor_lr, weight_decay,
                          decay_mask=lambda params: _decay_mask(abstract_params))


def _decay_mask(abstract_params: Any) -> Any:
    """True for weights, embeddings and readouts; False for biases and norm gains."""
    param_meta(abstract_params)  # raises, naming the path, on a parameter without a role
    return jax.tree.map(lambda box: box.role in optim.DECAYED_ROLES, abstract_params,
                        is_leaf=lambda x: hasattr(x, "role"))


def make_optimizer(
    train: Any,
    per_tensor_lr: Optional[optax.GradientTransformation] = None,
    weight_decay: Optional[optax.GradientTransformation] = None,
    decay_mask: Optional[Callable[[Any], Any]] = None,
) -> optax.GradientTransformation:
    """The optax transformation for `config.train`.

    Args:
      train: `config.train` with `optimizer, lr, schedule, warmup_steps, steps,
        weight_decay, grad_clip, grad_accum, b1, b2, eps, momentum`.
      per_tensor_lr: the parametrization's per-tensor lr factors (u-μP), or None.
      weight_decay: a transformation that adds the decay term itself after the
        learning rate (u-μP's independent decay); None uses decoupled decay
        `train.weight_decay * lr * p`.
      decay_mask: for decoupled decay, a function `params -> bool tree` (True where
        decayed: weights, not biases and norms).
    """
    if train.optimizer not in OPTIMIZERS:
        raise ConfigError(f"config.train.optimizer={train.optimizer!r}: use one of {OPTIMIZERS}")
    if train.grad_clip < 0 or train.weight_decay < 0:
        raise ConfigError("config.train.grad_clip and weight_decay must be >= 0 (0 = off)")
    if train.grad_accum < 1:
        raise ConfigError(f"config.train.grad_accum={train.grad_accum} must be >= 1")
    check_update_numerics(train)
    schedule = learning_rate_schedule(train)
    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    if train.optimizer == "sgd":
        parts.append(optax.trace(train.momentum) if train.momentum else optax.identity())
    else:
        adam = optax.scale_by_adam(b1=train.b1, b2=train.b2, eps=train.eps)
        moment_dtype = train.get("moment_dtype", "")
        parts.append(state_in_dtype(adam, moment_dtype) if moment_dtype else adam)
    if per_tensor_lr is not None:
        parts.append(per_tensor_lr)
    if weight_decay is None and train.weight_decay > 0:
        parts.append(optax.add_decayed_weights(train.weight_decay, mask=decay_mask))
    if train.optimizer == "lamb":
        parts.append(optax.scale_by_trust_ratio())
    parts.append(optax.scale_by_learning_rate(schedule))
    if weight_decay is not None:
        parts.append(weight_decay)
    tx = optax.chain(*parts)
    if train.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train.grad_accum)
    return tx


def check_update_numerics(train: Any, param_dtype: Optional[str] = None) -> None:
    """`train.moment_dtype` and `train.param_rounding` are known names; stochastic
    rounding needs bfloat16 parameters (`config.model.param_dtype`, where given)."""
    moment_dtype = train.get("moment_dtype", "")
    if moment_dtype not in MOMENT_DTYPES:
        raise ConfigError(f"config.train.moment_dtype={moment_dtype!r}: use one of "
                          f"{MOMENT_DTYPES} ('' = the parameters' dtype)")
    rounding = train.get("param_rounding", "nearest")
    if rounding not in PARAM_ROUNDINGS:
        raise ConfigError(f"config.train.param_rounding={rounding!r}: use one of {PARAM_ROUNDINGS}")
    if rounding == "stochastic" and param_dtype not in (None, "bfloat16"):
        raise ConfigError(
            f"config.train.param_rounding='stochastic' rounds updates into bfloat16 parameters; "
            f"config.model.param_dtype is {param_dtype!r}: set it to 'bfloat16' or use 'nearest'")


def state_in_dtype(inner: optax.GradientTransformation, dtype: Any) -> optax.GradientTransformation:
    """`inner` with its floating-point state stored in `dtype` (e.g. bfloat16 Adam
    moments, half the bytes of float32): each update reads the state and the incoming
    updates as float32, runs `inner` there, and rounds the new state to `dtype`
    (nearest). The arithmetic stays float32; only the storage narrows. The updates it
    returns are float32, so that `apply_updates` rounds once, into the parameters."""

    def cast(tree: Any, to: Any) -> Any:
        return jax.tree.map(
            lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params: Any) -> Any:
        return cast(inner.init(params), dtype)

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        updates, state = inner.update(cast(updates, jnp.float32), cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


_BF16_STOCHASTIC = dataclasses.replace(formats.BF16, rounding="stochastic")


def apply_updates(params: Any, updates: Any, rounding: str = "nearest",
                  key: Optional[jax.Array] = None) -> Any:
    """`params + updates`, each sum computed in float32 and rounded once to the
    parameter's dtype: to nearest (`optax.apply_updates`), or for bfloat16 parameters
    with `rounding="stochastic"` up or down with the probabilities that make it
    unbiased (`formats.quantise`, one key per tensor from `key`). An update smaller
    than half a bfloat16 spacing of its parameter (2^-9 relative) is lost under
    nearest rounding; stochastic rounding keeps it in expectation."""
    if rounding == "nearest":
        return optax.apply_updates(params, updates)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))

    def one(p: jax.Array, u: jax.Array, k: jax.Array) -> jax.Array:
        total = p.astype(jnp.float32) + u.astype(jnp.float32)
        if p.dtype != jnp.bfloat16:
            return total.astype(p.dtype)
        return formats.quantise(total, _BF16_STOCHASTIC, k).astype(p.dtype)

    return jax.tree.unflatten(treedef, [one(p, u, k) for p, u, k in
                                        zip(leaves, treedef.flatten_up_to(updates), keys)])


def make_loss_scale(train: Any) -> jmp.LossScale:
    """The `jmp` loss scale of `train.loss_scale` ("none" | "static" | "dynamic"),
    `loss_scale_value` and `loss_scale_period`: see `precision.LossScaling`, which
    validates them and holds their defaults."""
    try:
        scaling = LossScaling(kind=train.loss_scale, value=float(train.loss_scale_value),
                              period=int(train.loss_scale_period))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    import jax.numpy as jnp

    value = jnp.float32(scaling.value)
    if scaling.kind == "static":
        return jmp.StaticLossScale(value)
    if scaling.kind == "dynamic":
        return DynamicLossScale(value, period=scaling.period)
    return jmp.NoOpLossScale()


@jax.tree_util.register_pytree_node_class
class DynamicLossScale(jmp.DynamicLossScale):
    """`jmp.DynamicLossScale` as a pytree that may also hold shardings or partition
    specs (`trainer.state_shardings` maps the train state to them; jmp's float check on
    construction rejects those leaves), and that stays this class after `adjust`."""

    def __post_init__(self) -> None:
        pass

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        new = super().adjust(grads_finite)
        return DynamicLossScale(new.loss_scale, new.counter, new.period, new.factor,
                                new.min_loss_scale)
