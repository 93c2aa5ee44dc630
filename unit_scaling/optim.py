"""optax transforms for u-μP: per-tensor learning-rate factors and independent weight
decay, computed from each tensor's u-μP role, fan_in and depth.

Any pytree of arrays works: give `spec`, a tree of the params' structure holding a
`ParamSpec(role, fan_in, depth)` (or a `(role, fan_in, depth)` tuple) per tensor, or a
function `(path, leaf) -> ParamSpec`. Flax params boxed in `ScaledParam` (what
`unit_scaling.nn` creates) carry their spec, so they need none: `flax_spec(params)` is
the spec they give, and the transforms are the same in both cases. This module imports
only jax and optax; Flax is imported only when boxed params are passed.

    spec = {"w1": ("weight", None, None), "b1": ("bias", None, None),
            "out": ("output", None, None)}            # fan_in None: from the shape
    tx = optax.chain(optax.adam(lr), scale_by_parametrization(params, "umup", spec=spec))

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

Use with Flax (the chain is over *unboxed* params; the factors are computed once, at
construction, from the boxed or abstract params `jax.eval_shape(model.init, ...)`):

    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=0.0),          # or lamb, sgd, ...
        scale_by_parametrization(boxed_params, "umup"),
        add_independent_weight_decay(boxed_params, 1e-4, peak_lr, schedule),
    )

`boxed_params` is the "params" collection (`variables["params"]`), not the whole
variables dict; `tx.update(grads, state, params)` must receive the params (optax's
usual third argument) for the weight decay. `sp`/`unit` take the usual decoupled decay
(AdamW's: `lr(t) * weight_decay * p` per step, following the lr), which is
optax.adamw's own `weight_decay` (with a `mask` if biases should be spared).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "DECAYED_ROLES",
    "IndependentWeightDecayState",
    "OPTIMIZERS",
    "ROLES",
    "ParamSpec",
    "add_independent_weight_decay",
    "default_fan_in",
    "flax_spec",
    "lr_factor",
    "lr_table",
    "param_specs",
    "scale_by_parametrization",
]


def __dir__() -> list[str]:
    """`dir(module)` lists the public API, not the imported jax/numpy modules."""
    return sorted(__all__)

OPTIMIZERS = ("adam", "sgd")
DECAYED_ROLES = ("weight", "embedding", "output")
# The same names as `unit_scaling.params` and `unit_scaling.parametrization` (which need
# Flax); a test checks it.
ROLES = ("weight", "bias", "norm", "output", "embedding")
_PARAMETRIZATIONS = ("sp", "unit", "umup")

Spec = Union["ParamSpec", tuple]
SpecTree = Union[Any, Callable[[tuple, Any], Spec]]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """The u-μP description of one tensor.

    role: "weight" (hidden matmul kernels), "bias", "norm" (norm gains), "output"
      (readout kernels) or "embedding" (lookup tables).
    fan_in: the u-μP fan-in; None: from the shape (`default_fan_in`).
    depth: the number of transformer layers for a tensor inside the layer stack, None
      outside it.
    lr_mult: a further lr factor (post-norm norms: `Parametrization.norm_lr_mult`).
    """

    role: str
    fan_in: Optional[int] = None
    depth: Optional[int] = None
    lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"u-μP role {self.role!r} is unknown; use one of {ROLES}")


def default_fan_in(role: str, shape: tuple[int, ...]) -> int:
    """d_model (the last dim) of an embedding table `[V, d]`, the size of a vector, the
    product of all but the last dim of a kernel `[..., fan_out]`."""
    if role == "embedding":
        return int(shape[-1])
    if len(shape) == 1:
        return int(shape[0])
    return int(math.prod(shape[:-1]))


def _is_spec(x: Any) -> bool:
    return isinstance(x, ParamSpec) or (
        isinstance(x, tuple) and len(x) in (3, 4) and isinstance(x[0], str)
    )


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _resolve(spec: Spec, leaf: Any, path: tuple) -> ParamSpec:
    if not _is_spec(spec):
        raise ValueError(
            f"parameter {_path_str(path)!r}: spec {spec!r} is not a ParamSpec or a "
            "(role, fan_in, depth[, lr_mult]) tuple"
        )
    spec = spec if isinstance(spec, ParamSpec) else ParamSpec(*spec)
    if spec.fan_in is None:
        spec = dataclasses.replace(spec, fan_in=default_fan_in(spec.role, tuple(jnp.shape(leaf))))
    return spec


def _box_type() -> Optional[type]:
    """Flax's `Partitioned` when Flax is loaded (boxed params cannot exist otherwise)."""
    meta = sys.modules.get("flax.core.meta")
    return None if meta is None else meta.Partitioned


def _is_box(x: Any) -> bool:
    box = _box_type()
    return box is not None and isinstance(x, box)


def _has_boxes(tree: Any) -> bool:
    return any(map(_is_box, jax.tree.leaves(tree, is_leaf=_is_box)))


def flax_spec(params: Any) -> Any:
    """The spec of Flax params boxed in `ScaledParam` (concrete or from
    `jax.eval_shape`): a tree of the *unboxed* params' structure holding each tensor's
    `ParamSpec` (fan_in from `unit_scaling.params.fan_in`, which drops the `nn.scan` axis).

    Raises ValueError, naming the path, for a leaf without a u-μP role.
    """
    from unit_scaling.params import fan_in, param_meta

    param_meta(params)  # raises, naming the path, on a parameter without a role
    return jax.tree.map(
        lambda m: ParamSpec(m.role, fan_in(m), m.depth, m.lr_mult), params, is_leaf=_is_box
    )


def param_specs(params: Any, spec: Optional[SpecTree] = None) -> Any:
    """A tree of the (unboxed) params' structure holding each tensor's `ParamSpec`, with
    every fan_in filled in.

    Args:
      params: any pytree of arrays (or `jax.ShapeDtypeStruct`s), or Flax params boxed in
        `ScaledParam`.
      spec: a tree of the params' structure with a `ParamSpec` or `(role, fan_in,
        depth)` per tensor, or a function `(path, leaf) -> spec`; None for boxed params.
    """
    if spec is None:
        if _has_boxes(params):
            return flax_spec(params)
        path, _ = jax.tree_util.tree_flatten_with_path(params)[0][0]
        raise ValueError(
            f"parameter {_path_str(path)!r} has no u-μP role: pass `spec=` (a tree of "
            "ParamSpec(role, fan_in, depth) of the params' structure, or a function "
            "(path, leaf) -> ParamSpec), or Flax params boxed by unit_scaling.nn "
            "(before nn.unbox)"
        )
    spec_leaves = jax.tree.leaves(spec, is_leaf=_is_spec)
    if callable(spec) and len(spec_leaves) == 1 and spec_leaves[0] is spec:
        # A function (a callable pytree such as an Equinox module is a spec tree).
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: _resolve(spec(path, leaf), leaf, path), params
        )
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    specs = spec_leaves
    if len(specs) != len(leaves):
        raise ValueError(
            f"spec has {len(specs)} entries for {len(leaves)} parameters: it must have "
            "the params' structure, one (role, fan_in, depth) per tensor"
        )
    return jax.tree.unflatten(
        jax.tree.structure(params),
        [_resolve(s, leaf, path) for s, (path, leaf) in zip(specs, leaves)],
    )


def _name(parametrization: Any) -> str:
    name = getattr(parametrization, "name", parametrization)
    if name not in _PARAMETRIZATIONS:
        raise ValueError(
            f"parametrization={name!r} is unknown; use one of {_PARAMETRIZATIONS}"
        )
    return name


def lr_factor(
    meta: Any,
    parametrization: Any = "umup",
    optimizer: str = "adam",
    readout_constraint: Optional[str] = None,
) -> float:
    """The learning-rate factor of one parameter (see the module docstring). `meta`: a
    `ParamSpec` (fan_in filled in, see `param_specs`) or a Flax `ScaledParam` box."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is unknown; use one of {OPTIMIZERS}")
    if _name(parametrization) != "umup":
        return 1.0
    if not isinstance(meta, ParamSpec):
        meta = jax.tree.leaves(flax_spec(meta), is_leaf=_is_spec)[0]
    depth = (1.0 if meta.depth is None else meta.depth**-0.5) * meta.lr_mult
    role, fan_in = meta.role, meta.fan_in
    if optimizer == "adam" or readout_constraint is None:
        if role in ("weight", "embedding"):
            return depth * fan_in**-0.5
        return depth
    if readout_constraint != "to_output_scale":
        raise ValueError(
            f"readout_constraint={readout_constraint!r}: use None or 'to_output_scale'"
        )
    if role in ("bias", "norm"):
        return depth * fan_in
    if role in ("weight", "embedding"):
        return depth * fan_in**0.5
    return depth


def lr_table(
    params: Any,
    parametrization: Any = "umup",
    optimizer: str = "adam",
    readout_constraint: Optional[str] = None,
    spec: Optional[SpecTree] = None,
) -> dict[str, float]:
    """`{"path/to/param": lr factor}` for params with a spec (or boxed params)."""
    specs = jax.tree_util.tree_flatten_with_path(param_specs(params, spec), is_leaf=_is_spec)[0]
    return {
        _path_str(path): lr_factor(m, parametrization, optimizer, readout_constraint)
        for path, m in specs
    }


def _factor_tree(params: Any, spec: Optional[SpecTree], fn: Callable[[ParamSpec], float]) -> Any:
    """A tree with the *unboxed* params' structure holding `fn(spec)` per parameter."""
    return jax.tree.map(fn, param_specs(params, spec), is_leaf=_is_spec)


def _apply(factors: Any, tree: Any, fn: Callable[[Any, Any], Any]) -> Any:
    """Maps `fn(factor, leaf)` over a tree that may be boxed or unboxed."""

    def one(f, u):
        if _is_box(u):
            return u.replace_boxed(fn(f, u.unbox(apply_constraint=False)))
        return fn(f, u)

    return jax.tree.map(one, factors, tree, is_leaf=_is_box)


def scale_by_parametrization(
    params: Any,
    parametrization: Any = "umup",
    optimizer: str = "adam",
    readout_constraint: Optional[str] = None,
    spec: Optional[SpecTree] = None,
) -> optax.GradientTransformation:
    """Multiplies each tensor's update by its lr factor (`lr_table`).

    Stateless and linear, so it may sit anywhere after the optimizer's normalisation
    (after `optax.adamw`/`lamb`/`sgd`, or before `scale_by_learning_rate`). Identity for
    `sp` and `unit`. `params`: any pytree of arrays with `spec` (see `param_specs`), or
    boxed Flax params (concrete or from `jax.eval_shape`); the updates it sees may be
    boxed or unboxed.
    """
    if _name(parametrization) != "umup":
        return optax.identity()
    factors = _factor_tree(
        params, spec, lambda m: lr_factor(m, parametrization, optimizer, readout_constraint)
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
    spec: Optional[SpecTree] = None,
) -> optax.GradientTransformation:
    """Adds `-(schedule(t) / peak_lr) * weight_decay * p` to the update of every tensor
    whose role is in `roles` (weights, embeddings, readouts; not biases or norm gains).

    Put it **last** in the chain (after the learning rate has been applied): the decay
    per step is then independent of the peak lr and of the tensor's u-μP lr factor and
    only follows the schedule's shape (the u-μP paper's "independent" weight decay:
    the reference divides the decay by the tensor's lr, which is the same thing).
    `schedule`: an optax schedule (step -> lr), a constant, or None (= peak_lr: a
    constant decay of `weight_decay * p` per step). Works on unboxed updates; `params`
    and `spec` give the roles as in `scale_by_parametrization`. Needs `params` in
    `update`.
    """
    if peak_lr <= 0:
        raise ValueError(f"peak_lr must be positive, got {peak_lr}")
    mask = _factor_tree(params, spec, lambda m: 1.0 if m.role in roles else 0.0)
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


def _add_decay(updates: Any, mask: Any, params: Any, coeff: jax.Array) -> Any:
    """`updates + coeff * params` where `mask` is 1 (boxed or unboxed trees)."""

    def one(m, u, p):
        return u if m == 0.0 else u + (coeff * p).astype(u.dtype)

    if _has_boxes(params) or _has_boxes(updates):
        import flax.linen as nn

        params = nn.unbox(params) if _has_boxes(params) else params
        if _has_boxes(updates):
            out = jax.tree.map(one, mask, nn.unbox(updates), params)
            return jax.tree.map(lambda box, v: box.replace_boxed(v), updates, out, is_leaf=_is_box)
    return jax.tree.map(one, mask, updates, params)
