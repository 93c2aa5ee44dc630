"""Token/segment/position embedding tables, with an optional tied readout (`attend`)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unit_scaling.formats import FormatPolicy
from unit_scaling.nn.linear import DEFAULT_PARAMETRIZATION
from unit_scaling.nn.partitioning import make_param
from unit_scaling.parametrization import Parametrization
from unit_scaling.scale import scale_bwd


class Embedding(nn.Module):
    """Lookup table `[num_embeddings, features]` (logical `axes`, role "embedding").

    `__call__(ids [...]) -> [..., features]` (compute dtype). Init: N(0,1) (unit/umup),
    N(0, init_std^2) (sp). unit/umup scale the table gradient by (V/ids.size)^1/2.

    `attend(x [..., features], bias) -> [..., V]` is the tied readout
    `x @ table^T (+ bias)` (`Parametrization.readout(tied=True)`: forward fan_in^-1
    under umup, fan_in^-1/2 under unit, see there why). When the table is `tied`, it receives two unit-scaled gradients (lookup
    and readout), roughly independent, whose sum has RMS 2^1/2: each use scales the
    table's gradient by 2^-1/2 so that the total stays unit-scaled.
    """

    num_embeddings: int
    features: int
    axes: tuple[Optional[str], Optional[str]] = ("vocab", "embed")
    tied: bool = False
    parametrization: Parametrization = DEFAULT_PARAMETRIZATION
    formats: Optional[FormatPolicy] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = make_param(
            self, "embedding", self.parametrization.embedding_init(),
            (self.num_embeddings, self.features), self.axes, "embedding", None,
            self.param_dtype,
        )

    def _table(self) -> jax.Array:
        table = self.embedding.astype(self.dtype)
        if self.tied and self.parametrization.unit_scaled:
            table = scale_bwd(table, 2**-0.5)
        return table

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.parametrization.embed(ids, self._table())

    def attend(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
        return self.parametrization.readout(
            x.astype(self.dtype), self._table().T, bias, self.formats, tied=True
        )
