"""Parameter metadata: every parameter the library's Flax modules create is boxed in a
`ScaledParam`.

A `ScaledParam` is an `nn.LogicallyPartitioned` (the logical axis names) with four
more static fields: the u-μP **role** (`weight`, `bias`, `norm`, `output`,
`embedding`), the **depth** (the number of transformer layers for a parameter inside
the layer stack, else None), the u-μP **fan_in** and an extra **lr_mult**. The boxes
survive `nn.scan` (which adds the `layers` axis) and `jax.eval_shape`, so
`unit_scaling.optim` needs nothing but the (possibly abstract) params to build the
per-tensor learning rates.
"""

from __future__ import annotations

from unit_scaling._extras import require

require("flax", "unit_scaling.params", "flax")

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
from flax import struct

ROLES = ("weight", "bias", "norm", "output", "embedding")


class ScaledParam(nn.LogicallyPartitioned):
    """A parameter box: logical axis names (`names`) plus the u-μP `role` and `depth`.

    `role`: "weight" (hidden matmul kernels), "bias", "norm" (norm gains), "output"
    (readout kernels) or "embedding" (lookup tables; their u-μP "fan_in" is d_model).
    `depth`: number of transformer layers for a parameter inside the layer stack, None
    outside it. `fan_in`: the u-μP fan-in (set by the module that knows which dims
    are inputs, e.g. d_model for a fused `[d, heads, 3, head_dim]` QKV kernel); None
    means the default rule of `fan_in()`. `lr_mult`: a further u-μP lr factor set by
    the module that knows why (post-norm layers give their norms `tau_mlp`, see
    `Parametrization.norm_lr_mult`). All are static (not pytree leaves), so they survive
    `jax.eval_shape`, `nn.scan`'s `add_axis` (which prepends the `layers` name) and
    tree maps over boxes.
    """

    role: str = struct.field(default="weight", pytree_node=False)
    depth: Optional[int] = struct.field(default=None, pytree_node=False)
    fan_in: Optional[int] = struct.field(default=None, pytree_node=False)
    lr_mult: float = struct.field(default=1.0, pytree_node=False)


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


def param_meta(params: Any) -> list[tuple[str, ScaledParam]]:
    """Flattens boxed (or abstract) params into `[(path, ScaledParam), ...]`.

    Raises ValueError when a leaf is not a `ScaledParam` (a parameter created without
    a role), naming its path.
    """
    out = []
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    for path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if not isinstance(leaf, ScaledParam):
            raise ValueError(
                f"parameter {name!r} has no u-μP role: create every parameter with "
                "unit_scaling.nn's modules (or wrap it in unit_scaling.params.ScaledParam), "
                "and pass the *boxed* params (before nn.unbox)"
            )
        out.append((name, leaf))
    return out


def fan_in(meta: ScaledParam) -> int:
    """The u-μP fan_in of a parameter: the input dims of a kernel (all but the last,
    after dropping the scan `layers` axis), d_model for an embedding table `[V, d]`, the
    size of a vector. `meta.fan_in` overrides the rule."""
    if meta.fan_in is not None:
        return int(meta.fan_in)
    shape = tuple(meta.value.shape)
    names = tuple(meta.names)
    # Drop stacked (scanned) axes: the fan-in is that of one layer's tensor.
    shape = tuple(s for s, n in zip(shape, names) if n != "layers")
    if meta.role == "embedding":
        return int(shape[-1])
    if len(shape) == 1:
        return int(shape[0])
    return int(math.prod(shape[:-1]))
