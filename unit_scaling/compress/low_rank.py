"""Low-rank compression: each attention and MLP projection kernel replaced by a rank-r
SVD factorisation `W ~ A @ B`.

`factorise(params, rank_fraction)` returns a tree whose projection kernels are
`LowRank(a [.., fan_in, r], b [.., r, fan_out])` with `r = max(1,
round(rank_fraction * min(fan_in, fan_out)))`, the truncated SVD (the best rank-r
approximation in Frobenius norm), split evenly: `a = U_r S_r^1/2`,
`b = S_r^1/2 V_r^T`. `expand(tree)` multiplies the factors back into kernels of the
original shape, so the model code is unchanged and a fine-tune (`recover.finetune`)
trains `a` and `b`. The parameter count is that of the factors: a kernel costs
`r (fan_in + fan_out)` instead of `fan_in fan_out`, which saves only below
`r = fan_in fan_out / (fan_in + fan_out)` (half the rank for a square kernel).

Projections (matrix view `[fan_in, fan_out]`): `attention/qkv_kernel`
`[d, heads*3*head_dim]`, `attention/out_kernel` `[heads*head_dim, d]`, `mlp/{wi,wg,wo}/kernel`.
Embeddings, the readout, the BERT heads and norms stay dense. A leading axis
(`nn.scan`'s layers) is factorised per layer. Static u-μP scales act on the kernel's
product with x, which `A @ B` leaves unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.formats.storage import Stored

__all__ = ["LowRank", "count_params", "expand", "factorise", "is_projection"]

# Parameter name -> number of fan-in axes (the rest, after any leading axes, fan out).
_FAN_IN_AXES = {"qkv_kernel": 1, "out_kernel": 2, "kernel": 1}
_OUT_AXES = {"qkv_kernel": 3, "out_kernel": 1, "kernel": 1}


def is_projection(path: tuple[str, ...]) -> bool:
    """Whether `path` names an attention or MLP projection kernel."""
    return (path[-1] in ("qkv_kernel", "out_kernel") and "attention" in path) or (
        path[-1] == "kernel" and len(path) >= 3 and path[-3] == "mlp")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
    """A kernel of `shape` stored as `a [*lead, fan_in, r] @ b [*lead, r, fan_out]`."""

    a: jax.Array
    b: jax.Array
    shape: tuple = dataclasses.field(metadata=dict(static=True))

    def dense(self) -> jax.Array:
        """`a @ b` in the kernel's shape. Behind an optimization barrier: without it,
        XLA (jax 0.10.2, CPU, also at backend optimisation level 0) rewrites the model's
        `x @ reshape(a @ b)` into a program that computes something else (tiny BERT's
        MLM loss 4.95 instead of the 4.17 of the same kernels formed outside the jit or
        eagerly, on a trained sp run; not reproduced on random weights, so no test)."""
        return jax.lax.optimization_barrier(jnp.matmul(self.a, self.b).reshape(self.shape))


def _matrix_shape(name: str, shape: tuple) -> tuple[tuple, int, int]:
    lead = len(shape) - _FAN_IN_AXES[name] - _OUT_AXES[name]
    fan_in_end = lead + _FAN_IN_AXES[name]
    return (shape[:lead], int(np.prod(shape[lead:fan_in_end])),
            int(np.prod(shape[fan_in_end:])))


def factorise(params: Any, rank_fraction: float) -> Any:
    """`params` (unboxed) with every projection kernel a `LowRank` of rank
    `round(rank_fraction * min(fan_in, fan_out))` (at least 1); `rank_fraction` in
    (0, 1]. The SVD runs in float64 on the host."""
    if not 0.0 < rank_fraction <= 1.0:
        raise ValueError(f"rank_fraction={rank_fraction}: must be in (0, 1]")
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(params))
    out = {}
    for path, value in flat.items():
        if not is_projection(path):
            out[path] = value
            continue
        shape = tuple(np.shape(value))
        lead, fan_in, fan_out = _matrix_shape(path[-1], shape)
        rank = max(1, round(rank_fraction * min(fan_in, fan_out)))
        w = np.asarray(value, np.float64).reshape(*lead, fan_in, fan_out)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s[..., :rank])
        dtype = np.asarray(value).dtype
        out[path] = LowRank((u[..., :rank] * root[..., None, :]).astype(dtype),
                            (root[..., :, None] * vt[..., :rank, :]).astype(dtype), shape)
    return flax.traverse_util.unflatten_dict(out)


def expand(tree: Any) -> Any:
    """The params the model runs: each `LowRank` multiplied back into its kernel."""
    return jax.tree.map(lambda x: x.dense() if isinstance(x, LowRank) else x, tree,
                        is_leaf=lambda x: isinstance(x, LowRank))


def _numbers(value: Any) -> int:
    if isinstance(value, Stored):  # the weights, not their scales
        return int(np.prod(value.values.shape))
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(value))


def count_params(tree: Any, projections_only: bool = False) -> int:
    """Parameters in `tree` (a `LowRank` counts its two factors, a `Stored` weight its
    values); with `projections_only`, only the attention and MLP projections."""
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(tree))
    return sum(_numbers(value) for path, value in flat.items()
               if not projections_only or is_projection(path))
