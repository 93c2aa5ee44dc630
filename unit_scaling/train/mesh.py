"""The device mesh (`data`, `fsdp`, `tensor`) and the shardings built on it.

`config.mesh` gives the size of each axis; one of them may be -1 for "the remaining
devices". `data` and `fsdp` both split the batch; `fsdp` also shards parameters and
optimizer state along their `embed` axis; `tensor` shards heads, MLP and vocabulary
(the logical-axis rules that say so live with the modules, in
`unit_scaling.nn.partitioning`). On a multi-host slice `jax.devices()` spans every host,
so the same config describes one GPU or a TPU pod.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from unit_scaling.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves `{data, fsdp, tensor}` sizes (one may be -1) to a shape for `AXES`.

    Raises a ValueError naming `config.mesh` and the fix when the sizes do not
    multiply to `num_devices`.
    """
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; use {AXES}")
    shape = [int(sizes.get(axis, 1)) for axis in AXES]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ConfigError(
            f"config.mesh {dict(zip(AXES, shape))}: sizes must be positive, with at most "
            "one -1 (= the remaining devices)"
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(
                f"config.mesh {dict(zip(AXES, shape))}: {num_devices} devices are not "
                f"divisible by the fixed axes' product {known}"
            )
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(
            f"config.mesh {dict(zip(AXES, shape))} needs {math.prod(shape)} devices but "
            f"there are {num_devices}; set the sizes to multiply to {num_devices}, or "
            "set one of them to -1"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over `devices` (default: all, across hosts) with Auto (GSPMD) axes."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data` and `fsdp`; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "config.train.global_batch_size") -> int:
    """Returns the per-process batch size, or raises naming `field` and the fix."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch_size <= 0 or global_batch_size % shards:
        raise ConfigError(
            f"{field}={global_batch_size} must be a positive multiple of the batch "
            f"shards data*fsdp = {shards}"
        )
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ConfigError(
            f"{field}={global_batch_size} must be divisible by the {processes} processes"
        )
    return global_batch_size // processes
