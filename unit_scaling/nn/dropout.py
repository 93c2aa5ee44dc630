"""Dropout with the parametrization's scaling (unit/umup: RMS-preserving)."""

from __future__ import annotations

import flax.linen as nn
import jax

from unit_scaling.nn.module import ScaledModule


class Dropout(ScaledModule):
    """Drops elements with probability `rate` unless `deterministic`.

    Uses the "dropout" PRNG collection. sp: inverted dropout (identity at eval);
    unit/umup: `U.dropout` (training output has the input's RMS; eval multiplies by
    (1-rate)^1/2, the training expectation).
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {self.rate}")
        if self.rate == 0.0:
            return x
        key = None if deterministic else self.make_rng("dropout")
        return self.ops.dropout(x, self.rate, key, deterministic)
