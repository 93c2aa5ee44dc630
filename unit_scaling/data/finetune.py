"""Fine-tuning (sequence classification) data: tasks made from the KJV, and GLUE.

Tasks (`FINETUNE_TASKS`):

- `kjv_books`: which of five books a verse comes from: Genesis (narrative), Psalms
  (poetry), Proverbs (wisdom sayings), Isaiah (prophecy), Matthew (gospel). 7,272
  verses; class balance over all of them 21.1% / 33.8% / 12.6% / 17.8% / 14.7%
  (Psalms is the majority class, so always answering "Psalms" scores about 34%).
  Train 6,658 verses (1424 / 2277 / 769 / 1159 / 1029), eval 614 (109 / 184 / 146 /
  133 / 42; majority baseline 30.0%).
- `kjv_testament`: whether a verse is from the Old (label 0) or New (label 1)
  Testament. 31,102 verses, 74.4% / 25.6%; train 28,020 (20980 / 7040), eval 3,082
  (2165 / 917; majority baseline 70.2%).
- `glue/sst2` (sentence -> negative/positive) and `glue/mnli` (premise, hypothesis ->
  entailment/neutral/contradiction), read from a prepared tfds `glue` dataset
  (`data.tfds_data_dir`); eval uses `validation` / `validation_matched`.

The KJV tasks hold out whole chapters, not single verses (verses of one chapter share
names and wording, which would leak): a chapter is in the eval split when the same
fixed hash as `splits.py` puts it below `KJV_EVAL_FRACTION` (10%). The chapters held
out for pretraining eval (`data.eval_fraction` = 2%) are among them.

A batch (B = per-process batch size, L = `config.data.seq_len`):

    input_ids    int32[B, L]   [CLS] A [SEP] (B [SEP]) then [PAD]; the longer text is
                               cut at its end until the pair fits
    segment_ids  int32[B, L]   0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding
    input_mask   int32[B, L]   1 on tokens, 0 on padding
    label        int32[B]      the class
    weight       float32[B]    1.0, or 0.0 on rows that only pad the last eval batch

Train pipelines shuffle (anew each epoch) and repeat; eval pipelines make one pass in
order, each process over its shard, padded with weight-0 rows to the same number of
batches (`info.num_batches`) on every process. `CLASSIFICATION` is the objective: it
encodes the examples at those indices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import grain
import numpy as np

from unit_scaling import batches
from unit_scaling.errors import ConfigError
from unit_scaling.data import corpora, pipeline, splits
from unit_scaling.data.objectives import Objective, require
from unit_scaling.data.tokenizer import CLS_ID, SEP_ID, Tokenizer, tokenizer_from_config

KJV_BOOKS = ("Genesis", "Psalms", "Proverbs", "Isaiah", "Matthew")
KJV_EVAL_FRACTION = 0.1
_GLUE = {
    "glue/sst2": dict(
        text=("sentence", None), eval_split="validation", labels=("negative", "positive")
    ),
    "glue/mnli": dict(
        text=("premise", "hypothesis"),
        eval_split="validation_matched",
        labels=("entailment", "neutral", "contradiction"),
    ),
}
FINETUNE_TASKS = ("kjv_books", "kjv_testament", *_GLUE)


@dataclasses.dataclass(frozen=True)
class FinetuneInfo:
    """Metadata of a fine-tuning pipeline.

    Attributes:
      task: the task name; label_names: class names, index = label.
      num_examples: examples in the split (all processes together).
      num_batches: batches per process of an eval pass (None for train: endless).
      element_spec: field name -> (shape, dtype) of one batch.
    """

    task: str
    label_names: tuple[str, ...]
    tokenizer: Tokenizer
    seq_len: int
    batch_size: int
    global_batch_size: int
    num_examples: int
    num_batches: int | None
    element_spec: dict[str, tuple[tuple[int, ...], np.dtype]]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def load_task(task: str, split: str, *, tfds_data_dir: str | None = None):
    """(examples, label names) of `task`'s `split` ("train" | "eval").

    `examples` is a random-access sequence of (text_a, text_b or None, label).
    """
    if split not in splits.SPLITS:
        raise ConfigError(f"split={split!r}; use one of {splits.SPLITS}.")
    if task == "kjv_books":
        return _kjv_examples(split, by_book=True), KJV_BOOKS
    if task == "kjv_testament":
        return _kjv_examples(split, by_book=False), ("OT", "NT")
    if task in _GLUE:
        spec = _GLUE[task]
        tfds_split = spec["eval_split"] if split == "eval" else "train"
        # glue's builder is not among those tfds registers on import without TensorFlow.
        import tensorflow_datasets.text.glue  # noqa: F401

        source, _ = corpora.open_tfds_source(task, tfds_split, tfds_data_dir, field="task")
        return _TfdsPairs(source, *spec["text"]), spec["labels"]
    raise ConfigError(f"fine-tuning task {task!r} is unknown; choose one of {FINETUNE_TASKS}.")


def encode_example(
    tokenizer: Tokenizer, text_a: str, text_b: str | None, seq_len: int
) -> dict[str, np.ndarray]:
    """[CLS] A [SEP] (B [SEP]) padded to `seq_len`: input_ids, segment_ids, input_mask."""
    _check_seq_len(seq_len, pair=text_b is not None)
    specials = 3 if text_b is not None else 2
    a = tokenizer.encode(text_a)
    b = tokenizer.encode(text_b) if text_b is not None else np.zeros(0, np.int32)
    budget = seq_len - specials
    # As in google-research/bert run_classifier: drop tokens from the end of the longer.
    n_a, n_b = len(a), len(b)
    while n_a + n_b > budget:
        if n_a > n_b:
            n_a -= 1
        else:
            n_b -= 1
    input_ids = np.zeros(seq_len, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    input_ids[0] = CLS_ID
    input_ids[1 : 1 + n_a] = a[:n_a]
    input_ids[1 + n_a] = SEP_ID
    n = 2 + n_a
    if text_b is not None:
        input_ids[n : n + n_b] = b[:n_b]
        input_ids[n + n_b] = SEP_ID
        segment_ids[n : n + n_b + 1] = 1
        n += n_b + 1
    input_mask = np.zeros(seq_len, np.int32)
    input_mask[:n] = 1
    return {"input_ids": input_ids, "segment_ids": segment_ids, "input_mask": input_mask}


def _check_seq_len(seq_len: int, pair: bool) -> None:
    if seq_len < (5 if pair else 3):
        raise ConfigError(
            f"data.seq_len={seq_len} is too small for [CLS] A [SEP]"
            f"{' B [SEP]' if pair else ''} with at least one token per text."
        )


class Classification(Objective):
    """The "classification" objective: encoded (text_a, text_b, label) examples."""

    name = "classification"
    fields = batches.CLASSIFICATION

    def validate(self, data) -> None:
        # Pairs need two more positions; whether a task has pairs shows when encoding.
        _check_seq_len(int(require(data, "seq_len")), pair=False)

    def examples(self, indices: grain.MapDataset, inputs: ClassificationInputs) -> grain.MapDataset:
        """The rows of the examples at `indices` (-1: a weight-0 padding row)."""
        return indices.map(functools.partial(_encode_row, *inputs))


class ClassificationInputs(NamedTuple):
    """What classification rows are made from: (text_a, text_b or None, label)
    `examples` (as `load_task` gives), the tokenizer, the row length."""

    examples: Sequence
    tokenizer: Tokenizer
    seq_len: int


CLASSIFICATION = Classification()


def make_finetune_pipeline(
    config,
    task: str,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> tuple[grain.DatasetIterator, FinetuneInfo]:
    """Batches of `task` for this process (fields in the module docstring).

    Args:
      config: a config with `seed`, `data` (seq_len, tokenizer settings, corpus for
        training the tokenizer, tfds_data_dir) and `train.global_batch_size`.
      task: one of FINETUNE_TASKS.
      split: "train" (shuffled, endless) or "eval" (one padded pass).
      process_index, process_count: default to JAX's.
    """
    data = config.data
    process_index, process_count = pipeline.resolve_processes(process_index, process_count)
    global_batch_size = int(config.train.global_batch_size)
    batch_size = pipeline.per_process_batch_size(global_batch_size, process_count)
    CLASSIFICATION.validate(data)
    seq_len = int(data.seq_len)
    tfds_data_dir = data.get("tfds_data_dir") or None
    examples, label_names = load_task(task, split, tfds_data_dir=tfds_data_dir)
    if len(examples) == 0:
        raise ConfigError(f"fine-tuning task {task!r} has no {split} examples.")
    tokenizer = tokenizer_from_config(
        data,
        None
        if data.get("tokenizer_path")
        else corpora.load_corpus(data.corpus, tfds_data_dir=tfds_data_dir),
    )
    shard = splits.shard_documents(np.arange(len(examples)), process_index, process_count)
    inputs = ClassificationInputs(examples, tokenizer, seq_len)
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size)

    if split == "train":
        seed = pipeline.derive_seed(int(config.get("seed", 0)), process_index, "finetune", task)
        ds = grain.MapDataset.source(shard).shuffle(seed=seed).repeat(None)
        num_batches = None
    else:
        # Every process makes the same number of batches (multi-host steps stay in
        # lock step); rows past the shard's end are weight-0 padding.
        num_batches = math.ceil(math.ceil(len(examples) / process_count) / batch_size)
        padded = np.full(num_batches * batch_size, -1, np.int64)
        padded[: len(shard)] = shard
        ds = grain.MapDataset.source(padded)
    ds = CLASSIFICATION.examples(ds, inputs)
    batched = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=True)
    info = FinetuneInfo(
        task=task,
        label_names=tuple(label_names),
        tokenizer=tokenizer,
        seq_len=seq_len,
        batch_size=batch_size,
        global_batch_size=global_batch_size,
        num_examples=len(examples),
        num_batches=num_batches,
        element_spec=CLASSIFICATION.element_spec(data, batch_size),
    )
    return iter(pipeline.add_prefetch(batched, data)), info


def class_counts(examples: Sequence, num_classes: int) -> np.ndarray:
    """int64[num_classes]: how many examples have each label."""
    labels = np.array([label for _, _, label in examples], dtype=np.int64)
    return np.bincount(labels, minlength=num_classes)


def _encode_row(examples, tokenizer, seq_len, index):
    index = int(index)
    if index < 0:
        row = {k: np.zeros(seq_len, np.int32) for k in ("input_ids", "segment_ids", "input_mask")}
        row["label"] = np.int32(0)
        row["weight"] = np.float32(0.0)
        return row
    text_a, text_b, label = examples[index]
    row = encode_example(tokenizer, text_a, text_b, seq_len)
    row["label"] = np.int32(label)
    row["weight"] = np.float32(1.0)
    return row


@functools.lru_cache(maxsize=4)
def _kjv_examples(split: str, by_book: bool) -> tuple[tuple[str, None, int], ...]:
    corpus = corpora.KJVCorpus()
    held_out = splits.hash_unit_interval(np.arange(len(corpus))) < KJV_EVAL_FRACTION
    out = []
    for chapter, document in enumerate(corpus):
        if bool(held_out[chapter]) != (split == "eval"):
            continue
        if by_book:
            if document.metadata["book"] not in KJV_BOOKS:
                continue
            label = KJV_BOOKS.index(document.metadata["book"])
        else:
            label = 0 if document.metadata["testament"] == "OT" else 1
        out.extend((verse, None, label) for verse in document.sentences)
    return tuple(out)


class _TfdsPairs:
    """A tfds data source seen as (text_a, text_b or None, label) examples."""

    def __init__(self, source, feature_a: str, feature_b: str | None):
        self._source, self._a, self._b = source, feature_a, feature_b

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int):
        example = self._source[int(index)]
        text_b = corpora.decode_text(example[self._b]) if self._b else None
        return corpora.decode_text(example[self._a]), text_b, int(example["label"])
