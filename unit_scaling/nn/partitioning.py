"""Logical axis names and the default logical->mesh rules.

Parameters use the logical names `embed, mlp, heads, kv, vocab` (and `layers`, which
`nn.scan` adds in front of stacked layer parameters); activations use `batch, length,
embed, mlp, heads, kv, vocab`. `DEFAULT_RULES` maps them onto a `data, fsdp, tensor`
mesh; `configs/common.py` copies it into `config.mesh.rules`, which the trainer uses
(one place to change the sharding of the whole model).

Parameter shardings: `nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params),
mesh, DEFAULT_RULES)`. Activation constraints take effect when the model runs under
`with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):` (no-ops otherwise).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax

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


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """`nn.with_logical_constraint(x, names)`: a no-op without a mesh and rules."""
    return nn.with_logical_constraint(x, tuple(names))
