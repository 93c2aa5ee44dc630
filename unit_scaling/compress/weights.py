"""Weight-only post-training quantisation of a params tree.

`quantise_params(params, fmt, scaling)` stores every weight matrix (dense kernels,
the fused attention kernels, embedding tables, the readout) in `fmt` with
`formats.storage.store`, and leaves the rest (norm scales, biases: 1-D, a few
thousand numbers) as they are. `dequantise_params` gives back a params tree the
model runs (simulated quantisation: the values are those of the 8-bit format, the
compute dtype unchanged); `params_nbytes` counts the bytes of what is stored.

Channels (for `scaling="per_channel"`): a kernel's output features, so the absmax is
taken over its fan-in axes: `kernel [.., fan_in, fan_out]` over fan_in;
`qkv_kernel [.., d, heads, 3, head_dim]` over d; `out_kernel [.., heads, head_dim, d]`
over (heads, head_dim); an embedding table `[.., rows, d]` per row (per token: a
lookup reads one row; a tied readout makes each row an output channel). A leading
axis (`nn.scan`'s layers) gets its own scales. The u-μP and unit-scaling static
scales live in the ops, not the weights, so these are the raw parameters.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import numpy as np

from unit_scaling.formats.storage import Stored, store

__all__ = ["dequantise_params", "params_nbytes", "quantise_params", "reduce_axes"]

# Parameter name -> the axes (from the end) each per-channel absmax reduces over.
_REDUCE_AXES = {
    "kernel": (-2,),
    "qkv_kernel": (-4,),
    "out_kernel": (-3, -2),
    "embedding": (-1,),
}


def reduce_axes(path: tuple[str, ...], value: Any) -> tuple[int, ...] | None:
    """The per-channel reduce axes of the parameter at `path`, or None for a parameter
    that is not a weight matrix (ndim < 2). `ValueError` for a matrix of an unknown
    name, so that a new parameter is not silently left out of the quantisation."""
    if np.ndim(value) < 2:
        return None
    name = path[-1]
    if name not in _REDUCE_AXES:
        raise ValueError(f"parameter {'/'.join(path)} {np.shape(value)}: unknown weight "
                         f"name {name!r}; add its fan-in axes to _REDUCE_AXES")
    return _REDUCE_AXES[name]


def quantise_params(params: Any, fmt: str, scaling: str = "none") -> Any:
    """`params` (unboxed nested dicts) with each weight matrix a `Stored` in `fmt`
    ("bf16" | "fp8" | "int8") under `scaling` ("none" | "per_channel")."""
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
    out = {}
    for path, value in flat.items():
        axes = reduce_axes(path, value)
        out[path] = value if axes is None else store(value, fmt, scaling, axes)
    return flax.traverse_util.unflatten_dict(out)


def dequantise_params(tree: Any, dtype=np.float32) -> Any:
    """The params the model runs: each `Stored` read back in `dtype`. Jit-safe, so a
    decoder can keep the 8-bit tree and dequantise inside each step."""
    return jax.tree.map(lambda x: x.dequantise(dtype) if isinstance(x, Stored) else x, tree,
                        is_leaf=lambda x: isinstance(x, Stored))


def params_nbytes(tree: Any) -> int:
    """Bytes of `tree` as stored: 8-bit values and float32 scales of each `Stored`, the
    arrays' own bytes otherwise."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Stored))
    return sum(x.nbytes if isinstance(x, Stored) else
               int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves)
