"""Statistics of pretraining batches, and the throughput of a pipeline.

BERT (what google-research/bert's recipe should give):

    mask_fraction          predicted tokens / non-padding tokens          ~0.15
    mask_token_fraction    of the predicted: input is [MASK]              ~0.80
    random_token_fraction  of the predicted: input is another token       ~0.10
    kept_fraction          of the predicted: input is the original token  ~0.10
    nsp_positive_fraction  B really follows A (next_sentence_label 0)     ~0.5 (a bit
                           less: a one-sentence chunk always gets a random B)
    padding_fraction       padding / all positions

Causal LM:

    packing_efficiency     non-padding / all positions (= 1 - padding_fraction)
    segments_per_row       packed pieces per row
    eos_fraction           targets that are [SEP] (document ends) / non-padding

Throughput: `batches_per_s`, `examples_per_s` and `tokens_per_s` (non-padding input
tokens) over the measured batches; `first_batch_s` is the wait for the first one.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from unit_scaling.data.tokenizer import MASK_ID, SEP_ID


class BertStats:
    """Accumulates MLM/NSP statistics over batches (fields of bert_instances.py)."""

    def __init__(self):
        self.examples = self.positions = self.tokens = 0
        self.predicted = self.as_mask = self.kept = 0
        self.nsp_next = 0

    def update(self, batch: dict[str, np.ndarray]) -> None:
        weights = batch["masked_lm_weights"] > 0
        inputs_at = np.take_along_axis(batch["input_ids"], batch["masked_lm_positions"], axis=1)
        self.examples += batch["input_ids"].shape[0]
        self.positions += batch["input_ids"].size
        self.tokens += int(batch["input_mask"].sum())
        self.predicted += int(weights.sum())
        self.as_mask += int((weights & (inputs_at == MASK_ID)).sum())
        self.kept += int((weights & (inputs_at == batch["masked_lm_ids"])).sum())
        self.nsp_next += int((batch["next_sentence_label"] == 0).sum())

    def result(self) -> dict[str, float]:
        predicted = max(self.predicted, 1)
        return {
            "mask_fraction": self.predicted / max(self.tokens, 1),
            "mask_token_fraction": self.as_mask / predicted,
            "random_token_fraction": (self.predicted - self.as_mask - self.kept) / predicted,
            "kept_fraction": self.kept / predicted,
            "nsp_positive_fraction": self.nsp_next / max(self.examples, 1),
            "padding_fraction": 1.0 - self.tokens / max(self.positions, 1),
            "predictions_per_example": self.predicted / max(self.examples, 1),
        }


class CausalStats:
    """Accumulates packing statistics over batches (fields of causal_lm_packing.py)."""

    def __init__(self):
        self.examples = self.positions = self.tokens = self.segments = self.eos = 0

    def update(self, batch: dict[str, np.ndarray]) -> None:
        real = batch["weights"] > 0
        self.examples += batch["input_ids"].shape[0]
        self.positions += batch["input_ids"].size
        self.tokens += int(real.sum())
        self.segments += int(batch["segment_ids"].max(axis=1).sum())
        self.eos += int((real & (batch["targets"] == SEP_ID)).sum())

    def result(self) -> dict[str, float]:
        efficiency = self.tokens / max(self.positions, 1)
        return {
            "packing_efficiency": efficiency,
            "padding_fraction": 1.0 - efficiency,
            "segments_per_row": self.segments / max(self.examples, 1),
            "eos_fraction": self.eos / max(self.tokens, 1),
        }


def measure(
    iterator: Iterator[dict[str, np.ndarray]], objective: str, num_batches: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Pulls `num_batches` batches; returns (statistics and throughput, first batch).

    The clock starts before the first batch, so the throughput includes filling the
    shuffle window and the prefetch buffers once: it is a slight underestimate for
    short runs and converges when `num_batches * batch_size` is many shuffle windows.

    Args:
      iterator: a pretraining batch iterator.
      objective: "mlm_nsp" or "causal_lm" (which statistics to compute).
      num_batches: batches to pull.
    """
    if num_batches < 1:
        raise ValueError(f"--batches={num_batches} must be >= 1.")
    stats = BertStats() if objective == "mlm_nsp" else CausalStats()
    mask_key = "input_mask" if objective == "mlm_nsp" else "weights"
    examples = tokens = 0
    start = time.perf_counter()
    for i in range(num_batches):
        batch = next(iterator)
        if i == 0:
            first_batch_s = time.perf_counter() - start
            first = batch
        examples += batch["input_ids"].shape[0]
        tokens += int((batch[mask_key] > 0).sum())
        stats.update(batch)
    elapsed = time.perf_counter() - start
    out = stats.result()
    out.update(
        num_batches=num_batches,
        batch_size=int(batch["input_ids"].shape[0]),
        seq_len=int(batch["input_ids"].shape[1]),
        first_batch_s=first_batch_s,
        batches_per_s=num_batches / elapsed,
        examples_per_s=examples / elapsed,
        tokens_per_s=tokens / elapsed,
    )
    return out, first
