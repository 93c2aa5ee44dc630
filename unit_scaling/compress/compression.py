"""`Compression`: what to do to a trained model (the flags of `unit_scaling.evaluate`
and `unit_scaling.generate`), checked before anything loads, and `compress`, which
applies it to a params tree.

Flags and meaning:
  --weights fp32|bf16|fp8|int8   weight-only quantisation (`weights.quantise_params`)
  --scales none|per_channel      for the 8-bit --weights and --kv_cache: a plain cast
                                 (int8: the fixed scale `PLAIN_INT8_SCALE`) or absmax
                                 scales per output channel (weights) / per token and
                                 head (KV cache)
  --kv_cache none|bf16|fp8|int8  the KV cache's storage (causal LMs only)
  --rank_fraction F              projections as rank round(F min(fan_in, fan_out))
                                 SVD factors (`low_rank`), F in (0, 1]
  --finetune_steps N             N steps of `recover.finetune` (the low-rank factors,
                                 or at rank 1 the dense model: the control that says
                                 what the extra steps alone give)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from unit_scaling.compress import low_rank, weights
from unit_scaling.errors import ConfigError
from unit_scaling.formats.storage import SCALINGS, STORAGE_FORMATS

__all__ = ["KV_CACHES", "WEIGHTS", "Compression", "compress"]

WEIGHTS = ("fp32", *STORAGE_FORMATS)
KV_CACHES = ("none", *STORAGE_FORMATS)
_EIGHT_BIT = ("fp8", "int8")


@dataclasses.dataclass(frozen=True)
class Compression:
    """One choice of the flags above (defaults: the model as trained)."""

    weights: str = "fp32"
    scales: str = "none"
    kv_cache: str = "none"
    rank_fraction: float = 1.0
    finetune_steps: int = 0

    def check(self, objective: Optional[str] = None) -> "Compression":
        """Itself, or `ConfigError` naming the flag and the fix. `objective`: the run's
        `config.data.objective` (the KV cache needs "causal_lm")."""
        for flag, value, allowed in (("weights", self.weights, WEIGHTS),
                                     ("scales", self.scales, SCALINGS),
                                     ("kv_cache", self.kv_cache, KV_CACHES)):
            if value not in allowed:
                raise ConfigError(f"--{flag}={value}: use one of {', '.join(allowed)}")
        if self.scales != "none" and not (self.weights in _EIGHT_BIT
                                          or self.kv_cache in _EIGHT_BIT):
            raise ConfigError(f"--scales={self.scales} applies to 8-bit storage: add "
                              "--weights fp8|int8 or --kv_cache fp8|int8, or drop --scales")
        if self.kv_cache != "none" and objective not in (None, "causal_lm"):
            raise ConfigError(f"--kv_cache={self.kv_cache}: this run trains {objective!r}, "
                              "an encoder with no KV cache (nothing is decoded); drop "
                              "--kv_cache or pass a configs/causal_lm.py run")
        if not 0.0 < self.rank_fraction <= 1.0:
            raise ConfigError(f"--rank_fraction={self.rank_fraction}: must be in (0, 1] "
                              "(1 keeps the full rank)")
        if self.rank_fraction < 1.0 and self.weights != "fp32":
            raise ConfigError(f"--rank_fraction={self.rank_fraction} with --weights="
                              f"{self.weights}: the quantiser stores dense kernels, not "
                              "low-rank factors; use one of the two at a time")
        if self.finetune_steps < 0:
            raise ConfigError(f"--finetune_steps={self.finetune_steps}: must be >= 0")
        if self.finetune_steps and self.weights != "fp32":
            raise ConfigError(f"--finetune_steps={self.finetune_steps} with --weights="
                              f"{self.weights}: the fine-tune trains float weights (or "
                              "--rank_fraction factors); quantise a fine-tuned run instead")
        return self

    @property
    def kv_cache_scales(self) -> str:
        """The model's `kv_cache_scales`: --scales when the cache is 8-bit."""
        return self.scales if self.kv_cache in _EIGHT_BIT else "none"

    def model_fields(self) -> dict:
        """The model-config fields this compression sets (`dataclasses.replace`)."""
        return dict(kv_cache=self.kv_cache, kv_cache_scales=self.kv_cache_scales)


def compress(params: Any, c: Compression) -> tuple[Any, Optional[Callable[[Any], Any]]]:
    """`(tree, prepare)`: `tree` what is stored (8-bit `Stored` weights, or `LowRank`
    factors, or `params` as is), `prepare(tree)` the params the model runs (None:
    `tree` is already them). `prepare` is a module-level function, so it can be a
    static argument of the jitted decode steps. The fine-tune is the caller's (it
    needs data)."""
    if c.rank_fraction < 1.0:
        return low_rank.factorise(params, c.rank_fraction), low_rank.expand
    if c.weights != "fp32":
        return weights.quantise_params(params, c.weights, c.scales), weights.dequantise_params
    return params, None
