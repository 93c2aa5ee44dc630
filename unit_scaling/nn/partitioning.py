"""Logical axis names, the default logical->mesh rules, and boxed parameter creation.

Parameters use the logical names `embed, mlp, heads, kv, vocab` (and `layers`, which
`nn.scan` adds in front of stacked layer parameters); activations use `batch, length,
embed, mlp, heads, kv, vocab`. `DEFAULT_RULES` maps them onto a `data, fsdp, tensor`
mesh; the trainer imports it (one place to change the sharding of the whole model).

Parameter shardings: `nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params),
mesh, DEFAULT_RULES)`. Activation constraints take effect when the model runs under
`with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):` (no-ops otherwise).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax

from unit_scaling.parametrization import ROLES, ScaledParam

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),
)
"""Logical axis -> mesh axes: batch over data x fsdp; parameters' embed over fsdp (ZeRO-3
style); mlp / heads / vocab over tensor (Megatron); head_dim, length, layers replicated."""

LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "layers")


def make_param(
    module: nn.Module,
    name: str,
    init: Callable[..., jax.Array],
    shape: Sequence[int],
    names: Sequence[Optional[str]],
    role: str,
    depth: Optional[int],
    param_dtype: Any,
    fan_in: Optional[int] = None,
    lr_mult: float = 1.0,
) -> jax.Array:
    """Creates `module.param(name)` boxed as a `ScaledParam` and returns its value.

    Args:
      init: `init(key, shape, dtype)`.
      names: one logical axis name (or None) per dim of `shape`.
      role: the u-μP role ("weight", "bias", "norm", "output", "embedding").
      depth: number of transformer layers when inside the stack, else None.
      fan_in: the u-μP fan-in when it is not the product of all but the last dim
        (e.g. a fused QKV kernel `[d, heads, 3, head_dim]` has fan_in d).
      lr_mult: a further u-μP lr factor (`ScaledParam.lr_mult`).
    """
    if len(names) != len(shape):
        raise ValueError(f"param {name}: names {names} do not match shape {shape}")
    if role not in ROLES:
        raise ValueError(f"param {name}: role {role!r} not in {ROLES}")

    def boxed_init(key, shape, dtype):
        return ScaledParam(init(key, shape, dtype), names=tuple(names), role=role,
                           depth=depth, fan_in=fan_in, lr_mult=lr_mult)

    return module.param(name, boxed_init, tuple(shape), param_dtype)


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """`nn.with_logical_constraint(x, names)`: a no-op without a mesh and rules."""
    return nn.with_logical_constraint(x, tuple(names))
