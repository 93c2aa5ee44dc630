"""BERT MLM+NSP training instances, with google-research/bert semantics, in numpy.

`create_instances_from_document` follows `create_pretraining_data.py` of
google-research/bert for one tokenized document:

- Budget `seq_len - 3` tokens ([CLS] A [SEP] B [SEP]). With probability
  `short_seq_prob` the document's target length is drawn uniformly from
  [2, seq_len - 3] instead (once per document, as in the reference), to reduce the
  mismatch with short fine-tuning inputs.
- Sentences accumulate into a chunk until the target length (or the document's end);
  A is the first `a_end` sentences of the chunk, `a_end` uniform in [1, len(chunk)-1].
  With probability 0.5 (always when the chunk has one sentence) B is taken from a
  random other document, starting at a random sentence, up to the remaining budget,
  and the chunk's unused sentences are put back for the next instance; otherwise B is
  the rest of the chunk. The longer of A and B is trimmed one token at a time, from
  the front or the back with equal probability, until the pair fits.
- Masking: candidates are all tokens but [CLS]/[SEP];
  `num_to_predict = min(max_predictions_per_seq, max(1, round(len(tokens) *
  masked_lm_prob)))` positions (or whole words: a word-start piece and the
  continuation pieces after it) are chosen at random; each becomes [MASK] with
  probability 0.8, stays itself with 0.1, and becomes a random non-special token with
  0.1. Positions are sorted.

Deviations from the reference, on purpose: random replacement tokens never are one of
the five reserved tokens; whole-word groups never span a [SEP].

One instance is a dict of numpy arrays (L = seq_len, P = max_predictions_per_seq):

    input_ids            int32[L]   [CLS] A [SEP] B [SEP] then [PAD] (0); masked
    segment_ids          int32[L]   0 for [CLS], A and the first [SEP]; 1 for B and the
                                    second [SEP]; 0 on padding
    input_mask           int32[L]   1 on tokens, 0 on padding
    masked_lm_positions  int32[P]   sorted positions of the predicted tokens; 0-padded
    masked_lm_ids        int32[P]   the original tokens there; 0-padded
    masked_lm_weights    float32[P] 1.0 for a prediction, 0.0 for padding
    next_sentence_label  int32[]    0: B follows A in the document, 1: B is random

`MLM_NSP` is the objective ("mlm_nsp") of the pretraining pipeline: it makes these
instances from groups of documents with `BertInstances`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import grain
import numpy as np

from unit_scaling import batches
from unit_scaling.errors import ConfigError
from unit_scaling.data.objectives import (
    DocumentGroupExamples,
    Objective,
    PretrainingInputs,
    require,
)
from unit_scaling.data.tokenized_corpus import TokenizedCorpus
from unit_scaling.data.tokenizer import CLS_ID, MASK_ID, NUM_SPECIAL_TOKENS, SEP_ID

MIN_SEQ_LEN = 5  # [CLS] a [SEP] b [SEP]


@dataclasses.dataclass(frozen=True)
class BertInstanceConfig:
    """Settings of instance creation (the `config.data` fields of the same names).

    `vocab_size` is the tokenizer's number of pieces: random replacements are drawn
    from [5, vocab_size).
    """

    seq_len: int
    max_predictions_per_seq: int
    vocab_size: int
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_masking: bool = False

    def __post_init__(self):
        if self.seq_len < MIN_SEQ_LEN:
            raise ConfigError(
                f"data.seq_len={self.seq_len} is too small for [CLS] A [SEP] B [SEP]: BERT "
                f"instances need 3 special tokens and one token per segment, so "
                f"data.seq_len >= {MIN_SEQ_LEN} (128 is usual)."
            )
        if not 1 <= self.max_predictions_per_seq <= self.seq_len - 3:
            raise ConfigError(
                f"data.max_predictions_per_seq={self.max_predictions_per_seq} must be in "
                f"[1, seq_len - 3 = {self.seq_len - 3}]; about seq_len * masked_lm_prob "
                f"= {round(self.seq_len * self.masked_lm_prob)} is usual."
            )
        if not 0.0 < self.masked_lm_prob <= 1.0:
            raise ConfigError(
                f"data.masked_lm_prob={self.masked_lm_prob} must be in (0, 1]; 0.15 is usual."
            )
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ConfigError(
                f"data.short_seq_prob={self.short_seq_prob} must be in [0, 1]; 0.1 is usual."
            )
        if self.vocab_size <= NUM_SPECIAL_TOKENS:
            raise ConfigError(
                f"vocab_size={self.vocab_size} must exceed the {NUM_SPECIAL_TOKENS} reserved "
                "tokens."
            )


def create_instances_from_document(
    document: Sequence[np.ndarray],
    random_document: Callable[[np.random.Generator], Sequence[np.ndarray]],
    rng: np.random.Generator,
    config: BertInstanceConfig,
    word_start: np.ndarray | None = None,
) -> list[dict[str, np.ndarray]]:
    """All instances from one tokenized document (see the module docstring).

    Args:
      document: the document's sentences as int32 token arrays, each non-empty.
      random_document: returns the sentences of a random *other* non-empty document,
        drawing with the generator it is given.
      rng: the generator all choices are drawn from (the caller seeds it per document
        and epoch, so each epoch gets fresh segments and masks).
      config: the settings.
      word_start: bool[vocab_size], needed for whole-word masking.

    Returns:
      A list of instance dicts (fields and shapes in the module docstring).
    """
    max_num_tokens = config.seq_len - 3
    target_seq_length = max_num_tokens
    if rng.random() < config.short_seq_prob:
        target_seq_length = int(rng.integers(2, max_num_tokens + 1))

    instances = []
    chunk: list[np.ndarray] = []
    chunk_length = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_length += len(document[i])
        if i == len(document) - 1 or chunk_length >= target_seq_length:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            tokens_a = np.concatenate(chunk[:a_end])
            if len(chunk) == 1 or rng.random() < 0.5:
                is_random_next = True
                target_b_length = target_seq_length - len(tokens_a)
                other = random_document(rng)
                start = int(rng.integers(0, len(other)))
                pieces, length = [], 0
                for sentence in other[start:]:
                    pieces.append(sentence)
                    length += len(sentence)
                    if length >= target_b_length:
                        break
                tokens_b = np.concatenate(pieces)
                # Put back the chunk's sentences B did not use: the next instance starts there.
                i -= len(chunk) - a_end
            else:
                is_random_next = False
                tokens_b = np.concatenate(chunk[a_end:])
            tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            instances.append(
                _make_instance(tokens_a, tokens_b, is_random_next, rng, config, word_start)
            )
            chunk, chunk_length = [], 0
        i += 1
    return instances


def truncate_seq_pair(
    tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Trims the longer sequence one token at a time (front or back, p=0.5) until
    `len(a) + len(b) <= max_num_tokens`. Returns views of the inputs."""
    excess = len(tokens_a) + len(tokens_b) - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    # One draw per trimmed token, as in the reference, but drawn in one call.
    from_front = rng.random(excess) < 0.5
    bounds = [[0, len(tokens_a)], [0, len(tokens_b)]]
    for front in from_front.tolist():
        longer = (
            bounds[0] if bounds[0][1] - bounds[0][0] > bounds[1][1] - bounds[1][0] else bounds[1]
        )
        if front:
            longer[0] += 1
        else:
            longer[1] -= 1
    return tokens_a[bounds[0][0] : bounds[0][1]], tokens_b[bounds[1][0] : bounds[1][1]]


def _make_instance(tokens_a, tokens_b, is_random_next, rng, config, word_start):
    n_a, n_b = len(tokens_a), len(tokens_b)
    n = n_a + n_b + 3
    tokens = np.empty(n, dtype=np.int32)
    tokens[0] = CLS_ID
    tokens[1 : 1 + n_a] = tokens_a
    tokens[1 + n_a] = SEP_ID
    tokens[2 + n_a : 2 + n_a + n_b] = tokens_b
    tokens[n - 1] = SEP_ID

    masked_input, positions, labels = mask_tokens(tokens, rng, config, word_start)

    L, P = config.seq_len, config.max_predictions_per_seq
    input_ids = np.zeros(L, np.int32)
    input_ids[:n] = masked_input
    segment_ids = np.zeros(L, np.int32)
    segment_ids[2 + n_a : n] = 1
    input_mask = np.zeros(L, np.int32)
    input_mask[:n] = 1
    k = len(positions)
    masked_lm_positions = np.zeros(P, np.int32)
    masked_lm_positions[:k] = positions
    masked_lm_ids = np.zeros(P, np.int32)
    masked_lm_ids[:k] = labels
    masked_lm_weights = np.zeros(P, np.float32)
    masked_lm_weights[:k] = 1.0
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "input_mask": input_mask,
        "masked_lm_positions": masked_lm_positions,
        "masked_lm_ids": masked_lm_ids,
        "masked_lm_weights": masked_lm_weights,
        "next_sentence_label": np.int32(1 if is_random_next else 0),
    }


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    config: BertInstanceConfig,
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chooses and corrupts the MLM predictions of one `[CLS] A [SEP] B [SEP]` sequence.

    Args:
      tokens: int32[n] token ids with [CLS]/[SEP] in place.

    Returns:
      (masked tokens int32[n], sorted positions int32[k], original ids there int32[k]),
      k <= max_predictions_per_seq.
    """
    candidates = np.flatnonzero((tokens != CLS_ID) & (tokens != SEP_ID))
    num_to_predict = min(
        config.max_predictions_per_seq, max(1, int(round(len(tokens) * config.masked_lm_prob)))
    )
    if config.whole_word_masking:
        if word_start is None:
            raise ConfigError("data.whole_word_masking=True needs the tokenizer's word_start table.")
        chosen = _choose_whole_words(tokens, candidates, num_to_predict, rng, word_start)
    else:
        chosen = candidates[rng.permutation(len(candidates))[:num_to_predict]]
    positions = np.sort(chosen).astype(np.int32)
    labels = tokens[positions]

    k = len(positions)
    # One call for all three draws: [MASK] or not, keep or replace, which replacement.
    action, keep, pick = rng.random((3, k))
    random_ids = NUM_SPECIAL_TOKENS + (pick * (config.vocab_size - NUM_SPECIAL_TOKENS)).astype(
        np.int32
    )
    replacement = np.where(action < 0.8, MASK_ID, np.where(keep < 0.5, labels, random_ids))
    masked = tokens.copy()
    masked[positions] = replacement
    return masked, positions, labels


def _choose_whole_words(tokens, candidates, num_to_predict, rng, word_start):
    # A group starts at a word-start piece or after a gap (a [SEP]); continuation
    # pieces join the group before them.
    starts = word_start[tokens[candidates]]
    if len(candidates):
        starts[0] = True
        starts[1:] |= np.diff(candidates) != 1
    groups = np.split(candidates, np.flatnonzero(starts)[1:]) if len(candidates) else []
    chosen: list[int] = []
    for g in rng.permutation(len(groups)):
        if len(chosen) >= num_to_predict:
            break
        group = groups[g]
        # As in the reference: a word that would overshoot the budget is skipped, and a
        # shorter one later may still fit.
        if len(chosen) + len(group) > num_to_predict:
            continue
        chosen.extend(group.tolist())
    return np.asarray(chosen, dtype=np.int64)


class MlmNsp(Objective):
    """The "mlm_nsp" objective: BERT instances of groups of documents."""

    name = "mlm_nsp"
    fields = batches.MLM_NSP

    def validate(self, data) -> None:
        instance_config(data, int(data.vocab_size))

    def examples(self, groups: grain.IterDataset, inputs: PretrainingInputs) -> grain.IterDataset:
        config = instance_config(inputs.data, inputs.tokenized.tokenizer.vocab_size)
        return grain.experimental.FlatMapIterDataset(
            groups,
            BertInstances(inputs.tokenized, inputs.documents, config, inputs.seed("examples")),
        )


def instance_config(data, vocab_size: int) -> BertInstanceConfig:
    """The instance settings of `config.data`, random replacements below `vocab_size`."""
    return BertInstanceConfig(
        seq_len=int(require(data, "seq_len")),
        max_predictions_per_seq=int(require(data, "max_predictions_per_seq")),
        vocab_size=vocab_size,
        masked_lm_prob=float(require(data, "masked_lm_prob")),
        short_seq_prob=float(require(data, "short_seq_prob")),
        whole_word_masking=bool(data.get("whole_word_masking", False)),
    )


MLM_NSP = MlmNsp()
_RANDOM_DOC_TRIES = 10


class BertInstances(DocumentGroupExamples):
    """BERT MLM+NSP instances of a group of documents (`create_instances_from_document`)."""

    def __init__(
        self,
        tokenized: TokenizedCorpus,
        documents: np.ndarray,
        config: BertInstanceConfig,
        seed: int,
    ):
        super().__init__(seed)
        self.tokenized = tokenized
        self.documents = np.asarray(documents)
        self.config = config

    def document_examples(self, document, sentences, rng):
        return create_instances_from_document(
            sentences,
            functools.partial(self._random_other_document, document),
            rng,
            self.config,
            self.tokenized.tokenizer.word_start,
        )

    def _random_other_document(self, document: int, rng: np.random.Generator):
        # Another document of the same split (any process's shard), as in the reference:
        # up to 10 tries to avoid the current one; empty documents are skipped too.
        for _ in range(_RANDOM_DOC_TRIES):
            other = int(self.documents[rng.integers(len(self.documents))])
            if other != document:
                sentences = self.tokenized[other]
                if sentences:
                    return sentences
        return self.tokenized[document]
