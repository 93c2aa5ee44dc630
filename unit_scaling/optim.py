"""optax transforms for u-μP: per-tensor learning-rate factors and independent weight
decay, computed from the params' `ScaledParam` metadata (role, depth, shape).

u-μP lr factor of a tensor (Adam family; the u-μP paper and the reference's
`lr_scale_func_adam`):

| role | factor |
|---|---|
| weight (hidden kernel), embedding | fan_in^-1/2 (an embedding's fan_in is d_model) |
| bias, norm, output (readout) | 1 |

times depth^-1/2 for every tensor inside the transformer stack (depth = number of
layers). `sp` and `unit` use factor 1 everywhere (the transform is the identity).

SGD: with a readout whose constraint is None (ours, `U.linear_readout`) the gradients
are unit-scaled and so are SGD's updates: the Adam rule applies unchanged. With a
"to_output_scale" readout constraint the reference's SGD rule is: weight/embedding
fan_in^1/2, bias/norm their size, output 1 (times depth^-1/2).

Use (the chain is over *unboxed* params; the factors are computed once, at
construction, from the boxed or abstract params `jax.eval_shape(model.init, ...)`):

    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=0.0),          # or lamb, sgd, ...
        scale_by_parametrization(boxed_params, "umup"),
        add_independent_weight_decay(boxed_params, 1e-4, peak_lr, schedule),
    )

`boxed_params` is the "params" collection (`variables["params"]`), not the whole
variables dict; `tx.update(grads, state, params)` must receive the params (optax's
usual third argument) for the weight decay. For `sp`/`unit` the DESIGN's decoupled
decay is optax.adamw's own `weight_decay` (with a `mask` if biases should be spared).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from unit_scaling.parametrization import (
    PARAMETRIZATIONS,
    Parametrization,
    ScaledParam,
    fan_in,
    param_meta,
)

OPTIMIZERS = ("adam", "sgd")
DECAYED_ROLES = ("weight", "embedding", "output")


def _name(parametrization: Union[str, Parametrization]) -> str:
    name = parametrization.name if isinstance(parametrization, Parametrization) else parametrization
    if name not in PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization={name!r} is unknown; use one of {PARAMETRIZATIONS}"
        )
    return name


def lr_factor(
    meta: ScaledParam,
    parametrization: Union[str, Parametrization] = "umup",
    optimizer: str = "adam",
    readout_constraint: Optional[str] = None,
) -> float:
    """The learning-rate factor of one parameter (see the module docstring)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; use one of {OPTIMIZERS}")
    if _name(parametrization) != "umup":
        return 1.0
    depth = (1.0 if meta.depth is None else meta.depth**-0.5) * meta.lr_mult
    role = meta.role
    if optimizer == "adam" or readout_constraint is None:
        if role in ("weight", "embedding"):
            return depth * fan_in(meta) ** -0.5
        return depth
    if readout_constraint != "to_output_scale":
        raise ValueError(
            f"readout_constraint={readout_constraint!r}: use None or 'to_output_scale'"
        )
    if role in ("bias", "norm"):
        return depth * fan_in(meta)
    if role in ("weight", "embedding"):
        return depth * fan_in(meta) ** 0.5
    return depth


def lr_table(
    params: Any,
    parametrization: Union[str, Parametrization] = "umup",
    optimizer: str = "adam",
    readout_constraint: Optional[str] = None,
) -> dict[str, float]:
    """`{"path/to/param": lr factor}` for boxed (or abstract boxed) params."""
    return {
        path: lr_factor(meta, parametrization, optimizer, readout_constraint)
        for path, meta in param_meta(params)
    }


def _factor_tree(params: Any, fn: Callable[[ScaledParam], float]) -> Any:
    """A tree with the *unboxed* params' structure holding `fn(box)` per parameter."""
    param_meta(params)  # raises, naming the path, on a parameter without a role
    return jax.tree.map(fn, params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _apply(factors: Any, tree: Any, fn: Callable[[Any, Any], Any]) -> Any:
    """Maps `fn(factor, leaf)` over a tree that may be boxed or unboxed."""

    def one(f, u):
        if isinstance(u, nn.Partitioned):
            return u.replace_boxed(fn(f, u.unbox(apply_constraint=False)))
        return fn(f, u)

    return jax.tree.map(one, factors, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def scale_by_parametrization(
    params: Any,
    parametrization: Union[str, Parametrization] = "umup",
    optimizer: str = "adam",
    readout_constraint: Optional[str] = None,
) -> optax.GradientTransformation:
    """Multiplies each tensor's update by its lr factor (`lr_table`).

    Stateless and linear, so it may sit anywhere after the optimizer's normalisation
    (after `optax.adamw`/`lamb`/`sgd`, or before `scale_by_learning_rate`). Identity for
    `sp` and `unit`. `params`: boxed params (concrete or from `jax.eval_shape`); the
    updates it sees may be boxed or unboxed.
    """
    if _name(parametrization) != "umup":
        return optax.identity()
    factors = _factor_tree(
        params, lambda m: lr_factor(m, parametrization, optimizer, readout_constraint)
    )

    def init_fn(_):
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return _apply(factors, updates, lambda f, u: (u * f).astype(u.dtype)), state

    return optax.GradientTransformation(init_fn, update_fn)


class IndependentWeightDecayState(NamedTuple):
    count: jax.Array


def add_independent_weight_decay(
    params: Any,
    weight_decay: float,
    peak_lr: float,
    schedule: Optional[Union[float, Callable[[jax.Array], jax.Array]]] = None,
    roles: tuple[str, ...] = DECAYED_ROLES,
) -> optax.GradientTransformation:
    """Adds `-(schedule(t) / peak_lr) * weight_decay * p` to the update of every tensor
    whose role is in `roles` (weights, embeddings, readouts; not biases or norm gains).

    Put it **last** in the chain (after the learning rate has been applied): the decay
    per step is then independent of the peak lr and of the tensor's u-μP lr factor and
    only follows the schedule's shape (the u-μP paper's "independent" weight decay:
    the reference divides the decay by the tensor's lr, which is the same thing).
    `schedule`: an optax schedule (step -> lr), a constant, or None (= peak_lr: a
    constant decay of `weight_decay * p` per step). Works on unboxed updates; `params`
    are the boxed (or abstract) params, for the roles. Needs `params` in `update`.
    """
    if peak_lr <= 0:
        raise ValueError(f"peak_lr must be positive, got {peak_lr}")
    mask = _factor_tree(params, lambda m: 1.0 if m.role in roles else 0.0)
    if schedule is None:
        schedule = peak_lr
    sched = schedule if callable(schedule) else (lambda _: schedule)

    def init_fn(_):
        return IndependentWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_independent_weight_decay needs params in update()")
        coeff = -weight_decay * sched(state.count) / peak_lr
        new = _add_decay(updates, mask, params, coeff)
        return new, IndependentWeightDecayState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _add_decay(updates: Any, mask: Any, params: Any, coeff: jax.Array) -> Any:
    """`updates + coeff * params` where `mask` is 1 (boxed or unboxed trees)."""

    def one(m, u, p):
        return u if m == 0.0 else u + (coeff * p).astype(u.dtype)

    params = nn.unbox(params) if any(map(_is_box, jax.tree.leaves(params, is_leaf=_is_box))) else params
    if any(map(_is_box, jax.tree.leaves(updates, is_leaf=_is_box))):
        out = jax.tree.map(one, mask, nn.unbox(updates), params)
        return jax.tree.map(lambda box, v: box.replace_boxed(v), updates, out, is_leaf=_is_box)
    return jax.tree.map(one, mask, updates, params)
