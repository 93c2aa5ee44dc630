"""Token/segment/position embedding tables, with an optional tied readout (`attend`)."""

from __future__ import annotations

from typing import Optional

import jax

from unit_scaling.nn.module import ScaledModule


class Embedding(ScaledModule):
    """Lookup table `[num_embeddings, features]` (logical `axes`, role "embedding").

    `__call__(ids [...]) -> [..., features]` (compute dtype). Init: N(0,1) (unit/umup),
    N(0, init_std^2) (sp). unit/umup scale the table gradient by (V/ids.size)^1/2.

    `attend(x [..., features], bias) -> [..., V]` is the tied readout
    `x @ table^T (+ bias)` (`ops.readout(tied=True)`: forward fan_in^-1 under umup,
    fan_in^-1/2 under unit, see `unit_scaling.ops.UnitScaledOps.readout` why). When the table is `tied`, it receives two unit-scaled gradients (lookup
    and readout), roughly independent, whose sum has RMS 2^1/2: each use scales the
    table's gradient by 2^-1/2 so that the total stays unit-scaled.
    """

    num_embeddings: int
    features: int
    axes: tuple[Optional[str], Optional[str]] = ("vocab", "embed")
    tied: bool = False

    def setup(self):
        self.embedding = self.scaled_param(
            "embedding", self.parametrization.embedding_init(),
            (self.num_embeddings, self.features), self.axes, "embedding",
        )

    def _table(self) -> jax.Array:
        table = self.embedding.astype(self.precision.dtype)
        return self.ops.shared(table, 2) if self.tied else table

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.ops.embed(ids, self._table())

    def attend(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
        return self.ops.readout(
            x.astype(self.precision.dtype), self._table().T, bias, self.precision.formats,
            tied=True,
        )
