"""Held-out documents and per-process shards: which documents each pipeline reads.

- `split_documents`: a document is held out for evaluation when a hash of its index
  falls below `eval_fraction`. The hash is fixed (it does not depend on the training
  seed), so the held-out set is the same in every run over the same corpus, and the
  train and eval sets are disjoint by construction.
- `shard_documents`: process p of P reads documents p, p + P, p + 2P, ... of its
  split, so the shards are disjoint and together cover the split.
"""

from __future__ import annotations

import numpy as np

from unit_scaling.errors import ConfigError

SPLITS = ("train", "eval")
_SALT = np.uint64(0x5EED_0F_DA7A)


def hash_unit_interval(indices: np.ndarray) -> np.ndarray:
    """splitmix64 of each index, as float64 in [0, 1): a fixed, well-mixed hash."""
    with np.errstate(over="ignore"):
        z = np.asarray(indices, dtype=np.uint64) + _SALT
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def split_documents(num_documents: int, split: str, eval_fraction: float) -> np.ndarray:
    """Indices (int64, ascending) of the documents of `split` ("train" | "eval").

    Raises:
      ValueError: an unknown split, or `eval_fraction` outside [0, 1).
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}; use one of {SPLITS}.")
    if not 0.0 <= eval_fraction < 1.0:
        raise ConfigError(
            f"data.eval_fraction={eval_fraction} must be in [0, 1); 0.02 holds out 2% of "
            "the documents."
        )
    held_out = hash_unit_interval(np.arange(num_documents)) < eval_fraction
    return np.flatnonzero(held_out if split == "eval" else ~held_out)


def shard_documents(documents: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """The documents process `process_index` of `process_count` reads (round robin)."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(
            f"process_index={process_index}, process_count={process_count}: need "
            "0 <= process_index < process_count."
        )
    return np.asarray(documents)[process_index::process_count]
