"""Causal-LM examples: documents cut into pieces and packed into rows of `seq_len`.

A document with tokens t_1..t_n becomes the pair

    input_ids = [CLS] t_1 ... t_n        ([CLS] = beginning of document)
    targets   = t_1  ... t_n [SEP]       ([SEP] = end of document, EOS)

cut into consecutive pieces of at most `seq_len` positions (a long document gives
several). The document's tokens are its sentences' tokens in order (sentencepiece
starts each sentence with a word boundary, so words stay apart; paragraph breaks are
not kept). Every target belongs to the same document as its input, so nothing is ever
predicted across a document boundary, and the last token of every document is
trained to predict EOS (weight 1). Pieces are packed first-fit into rows
(`grain.experimental.FirstFitPackIterDataset`); within a row each piece gets its own
segment id (1, 2, ...) and positions restarting at 0, so attention restricted to
equal segment ids (plus the causal mask) never crosses documents or pieces.

A packed row (L = seq_len):

    input_ids    int32[L]    tokens; 0 ([PAD]) on padding
    targets      int32[L]    next token of the same document, [SEP] after its last
                             token; 0 on padding
    segment_ids  int32[L]    1, 2, ... one per packed piece; 0 on padding
    positions    int32[L]    position inside the piece, from 0; 0 on padding
    weights      float32[L]  1.0 on tokens, 0.0 on padding (the loss mask)

`CAUSAL_LM` is the objective ("causal_lm") of the pretraining pipeline: pieces of
groups of documents (`CausalPieces`), packed.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from unit_scaling import batches
from unit_scaling.errors import ConfigError
from unit_scaling.data.objectives import DocumentGroupExamples, Objective, PretrainingInputs
from unit_scaling.data.tokenizer import CLS_ID, SEP_ID

MIN_SEQ_LEN = 2


def check_seq_len(seq_len: int) -> None:
    """Raises ValueError unless `seq_len` fits [CLS] and at least one token."""
    if seq_len < MIN_SEQ_LEN:
        raise ConfigError(
            f"data.seq_len={seq_len} is too small: a causal-LM row needs the [CLS] "
            f"(beginning-of-document) token and at least one text token, so "
            f"data.seq_len >= {MIN_SEQ_LEN} (128 or more is usual)."
        )


def document_pieces(
    sentences: Sequence[np.ndarray], seq_len: int, bos_id: int = CLS_ID, eos_id: int = SEP_ID
) -> list[dict[str, np.ndarray]]:
    """The (input_ids, targets) pieces of one document, each int32[<= seq_len].

    Args:
      sentences: the document's sentences as int32 token arrays.
      seq_len: the most positions a piece may have.

    Returns:
      [] for a document without tokens; otherwise ceil((n + 1) / seq_len) pieces.
    """
    tokens = np.concatenate(sentences) if len(sentences) else np.zeros(0, np.int32)
    if tokens.size == 0:
        return []
    inputs = np.concatenate([np.array([bos_id], np.int32), tokens.astype(np.int32)])
    targets = np.concatenate([tokens.astype(np.int32), np.array([eos_id], np.int32)])
    return [
        {"input_ids": inputs[s : s + seq_len], "targets": targets[s : s + seq_len]}
        for s in range(0, len(inputs), seq_len)
    ]


def pack(
    pieces: grain.IterDataset, seq_len: int, *, num_packing_bins: int, seed: int
) -> grain.IterDataset:
    """Packs a dataset of pieces into rows with the fields of the module docstring."""
    packed = grain.experimental.FirstFitPackIterDataset(
        pieces,
        length_struct={"input_ids": seq_len, "targets": seq_len},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=True,
    )
    return packed.map(finalize_packed_row)


def finalize_packed_row(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames grain's packing output to the documented fields and adds `weights`."""
    segment_ids = row["input_ids_segment_ids"].astype(np.int32)
    return {
        "input_ids": row["input_ids"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "segment_ids": segment_ids,
        "positions": row["input_ids_positions"].astype(np.int32),
        "weights": (segment_ids > 0).astype(np.float32),
    }


class CausalLM(Objective):
    """The "causal_lm" objective: packed rows of document pieces."""

    name = "causal_lm"
    fields = batches.CAUSAL_LM

    def validate(self, data) -> None:
        check_seq_len(int(data.seq_len))

    def examples(self, groups: grain.IterDataset, inputs: PretrainingInputs) -> grain.IterDataset:
        seq_len = int(inputs.data.seq_len)
        pieces = grain.experimental.FlatMapIterDataset(
            groups, CausalPieces(seq_len, inputs.seed("examples"))
        )
        return pack(
            pieces,
            seq_len,
            num_packing_bins=int(inputs.data.get("num_packing_bins", max(inputs.batch_size, 32))),
            seed=inputs.seed("packing"),
        )


CAUSAL_LM = CausalLM()


class CausalPieces(DocumentGroupExamples):
    """(input_ids, targets) pieces of a group of documents (`document_pieces`)."""

    def __init__(self, seq_len: int, seed: int):
        super().__init__(seed)
        self.seq_len = seq_len

    def document_examples(self, document, sentences, rng):
        del document, rng  # cutting a document into pieces involves no randomness
        return document_pieces(sentences, self.seq_len)
