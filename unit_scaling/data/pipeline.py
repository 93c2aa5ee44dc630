"""grain input pipelines for pretraining: BERT MLM+NSP and causal LM.

    iterator, info = make_pretraining_pipeline(config, split="train")
    batch = next(iterator)         # dict of numpy arrays, leading dim info.batch_size
    state = iterator.get_state()   # JSON-serialisable dict
    iterator.set_state(state)      # resumes at exactly the next batch

`config.data.objective` picks the example type: "mlm_nsp" (`bert_instances.MLM_NSP`)
or "causal_lm" (`causal_lm_packing.CAUSAL_LM`), objects that check their settings,
make the examples and give the batch fields (`objectives.py`). Every batch
has a leading per-process batch dimension B = `config.train.global_batch_size /
grad_accum / process_count` (one micro-step's; `grad_accum` of them make an update); the training loop assembles global arrays from the per-process
batches (`jax.make_array_from_process_local_data`).

What the pipeline does, per process:

1. documents of the split (`splits.py`: train, or the held-out eval documents, or a
   separate tfds split named by `data.eval_split`), then this process's shard;
2. shuffled (a new order each epoch) and repeated, each document tagged with its
   position in that stream, and grouped `data.shuffle_window` documents at a time;
3. tokenized (`tokenized_corpus.py`, a few threads through grain's ReadOptions);
4. turned into examples by the objective's flat map over each group
   (`objectives.DocumentGroupExamples`), seeded by (seed, process, stream position),
   so every epoch gets fresh NSP pairs and masks and a restored iterator recomputes
   exactly the same ones; the group's examples are shuffled together so that a batch
   mixes many documents; for the causal LM the examples are document pieces, then
   packed into rows;
5. batched with `drop_remainder`, prefetched by a background thread
   (`data.prefetch` batches) or by `data.num_workers` processes.

Everything is deterministic given `config.seed`, the process layout and
`data.num_workers` (worker processes each take a slice of the document stream). Eval
pipelines ignore `config.seed` (they use a fixed seed) so that every run evaluates on
the same batches; create a fresh eval iterator for each evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from unit_scaling.errors import ConfigError
from unit_scaling.data import corpora, splits
from unit_scaling.data.bert_instances import MLM_NSP
from unit_scaling.data.causal_lm_packing import CAUSAL_LM
from unit_scaling.data.objectives import Objective, PretrainingInputs, require
from unit_scaling.data.tokenized_corpus import TokenizedCorpus
from unit_scaling.data.tokenizer import Tokenizer, tokenizer_from_config

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (MLM_NSP, CAUSAL_LM)}
EVAL_SEED = 0
_READ_THREADS = 2
_READ_GROUPS = 2  # document groups tokenized ahead of the flat map


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """What the training loop needs to know about a pipeline.

    Attributes:
      objective: "mlm_nsp" or "causal_lm".
      tokenizer: the tokenizer (decode with `tokenizer.decode(ids)`).
      vocab_size: `config.data.vocab_size`, the size the model's embedding should have.
      tokenizer_vocab_size: pieces the tokenizer actually has (<= vocab_size; ids
        above it never occur).
      seq_len: L.
      batch_size: per-process batch size B (leading dimension of every field).
      global_batch_size: B * process_count, one micro-step's batch over all processes
        (`config.train.global_batch_size / grad_accum`).
      process_index, process_count: the shard this pipeline reads.
      num_documents: documents in the split (all processes together).
      element_spec: field name -> (shape, dtype) of one batch, as numpy dtypes.
      pad_id, cls_id, sep_id, mask_id, bos_id, eos_id: special token ids.
    """

    objective: str
    tokenizer: Tokenizer
    vocab_size: int
    tokenizer_vocab_size: int
    seq_len: int
    batch_size: int
    global_batch_size: int
    process_index: int
    process_count: int
    num_documents: int
    element_spec: dict[str, tuple[tuple[int, ...], np.dtype]]
    pad_id: int = Tokenizer.pad_id
    cls_id: int = Tokenizer.cls_id
    sep_id: int = Tokenizer.sep_id
    mask_id: int = Tokenizer.mask_id
    bos_id: int = Tokenizer.bos_id
    eos_id: int = Tokenizer.eos_id


def make_pretraining_pipeline(
    config,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> tuple[grain.DatasetIterator, DataInfo]:
    """The batched, prefetched pretraining iterator for this process.

    Args:
      config: a config with `seed`, `data` and `train.global_batch_size`
        (configs/bert.py, configs/causal_lm.py).
      split: "train" or "eval".
      process_index, process_count: default `jax.process_index()` /
        `jax.process_count()`.
      num_epochs: passes over this process's documents; None = forever.

    Returns:
      (iterator over batches with `get_state`/`set_state`, DataInfo). Batches are dicts
      of numpy arrays with leading dimension `info.batch_size`; field names, shapes and
      dtypes in `info.element_spec`.
    """
    dataset, info = make_pretraining_dataset(
        config,
        split,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
    )
    batched = dataset.batch(info.batch_size, drop_remainder=True)
    return iter(add_prefetch(batched, config.data)), info


def make_pretraining_dataset(
    config,
    split: str = "train",
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    num_epochs: int | None = None,
) -> tuple[grain.IterDataset, DataInfo]:
    """Unbatched examples of this process (arguments as `make_pretraining_pipeline`)."""
    data = config.data
    name = require(data, "objective")
    if name not in OBJECTIVES:
        raise ConfigError(f"config.data.objective={name!r}; use one of {tuple(OBJECTIVES)}.")
    objective = OBJECTIVES[name]
    process_index, process_count = resolve_processes(process_index, process_count)
    global_batch_size = int(require(config.train, "global_batch_size", "config.train"))
    # A batch is one micro-step's: `train.grad_accum` of them make the update's batch.
    grad_accum = int(config.train.get("grad_accum", 1))
    if grad_accum < 1 or global_batch_size % grad_accum:
        raise ConfigError(f"config.train.global_batch_size={global_batch_size} must be a "
                          f"multiple of config.train.grad_accum={grad_accum} (>= 1)")
    batch_size = per_process_batch_size(global_batch_size // grad_accum, process_count)
    seq_len = int(require(data, "seq_len"))
    objective.validate(data)  # before the corpus is read or a tokenizer trained: fail fast
    if split not in splits.SPLITS:
        raise ConfigError(f"split={split!r}; use one of {splits.SPLITS}.")

    tfds_data_dir = data.get("tfds_data_dir") or None
    train_corpus = corpora.load_corpus(require(data, "corpus"), tfds_data_dir=tfds_data_dir)
    tokenizer = tokenizer_from_config(data, train_corpus)
    corpus, documents = _split_corpus(data, train_corpus, split, tfds_data_dir)
    tokenized = TokenizedCorpus(corpus, tokenizer)
    shard = splits.shard_documents(documents, process_index, process_count)
    _check_has_text(tokenized, shard, split, process_index, process_count, len(documents))

    seed = EVAL_SEED if split == "eval" else int(config.get("seed", 0))
    docs = stream_documents(
        shard, seed=derive_seed(seed, process_index, "documents"), num_epochs=num_epochs
    )
    window = int(data.get("shuffle_window", 64))
    if window < 1:
        raise ConfigError(f"data.shuffle_window={window} must be >= 1 (1 = no mixing).")
    # Groups of `window` documents travel together: their examples are made and
    # shuffled as one list by the objective's flat map (objectives.DocumentGroupExamples).
    groups = docs.batch(window, batch_fn=tuple).map(functools.partial(_attach_tokens, tokenized))
    groups = groups.to_iter_dataset(
        grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_READ_GROUPS)
    )
    inputs = PretrainingInputs(
        data=data,
        tokenized=tokenized,
        documents=documents,
        batch_size=batch_size,
        seed=functools.partial(derive_seed, seed, process_index),
    )
    examples = objective.examples(groups, inputs)
    info = DataInfo(
        objective=name,
        tokenizer=tokenizer,
        vocab_size=int(data.vocab_size),
        tokenizer_vocab_size=tokenizer.vocab_size,
        seq_len=seq_len,
        batch_size=batch_size,
        global_batch_size=batch_size * process_count,
        process_index=process_index,
        process_count=process_count,
        num_documents=len(documents),
        element_spec=objective.element_spec(data, batch_size),
    )
    return examples, info


# ----------------------------------------------------------------------------- building blocks


def resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to JAX's."""
    if process_index is None or process_count is None:
        import jax  # only for the process layout; no model code

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(
            f"process_index={process_index}, process_count={process_count}: need "
            "0 <= process_index < process_count."
        )
    return int(process_index), int(process_count)


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    """global_batch_size / process_count, which must divide exactly."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ConfigError(
            f"config.train.global_batch_size={global_batch_size} must be a positive multiple "
            f"of the number of processes ({process_count}); each process loads "
            "global_batch_size / process_count examples."
        )
    return global_batch_size // process_count


def derive_seed(seed: int, *labels: Any) -> int:
    """A 32-bit seed for one stage, derived from the run seed and stage labels."""
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF]
    for label in labels:
        if isinstance(label, str):
            words.extend(label.encode())
        else:
            words.append(int(label) & 0xFFFFFFFF)
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def stream_documents(
    documents: np.ndarray, *, seed: int, num_epochs: int | None, shuffle: bool = True
) -> grain.MapDataset:
    """(stream position, document index) pairs: shuffled anew each epoch, repeated."""
    ds = grain.MapDataset.source(np.asarray(documents, dtype=np.int64))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        # repeat reseeds the shuffle above for every epoch.
        ds = ds.repeat(num_epochs)
    return ds.map_with_index(_tag_position)


def add_prefetch(ds: grain.IterDataset, data_config) -> grain.IterDataset:
    """Background prefetching: `data.num_workers` processes, else a thread."""
    num_workers = int(data_config.get("num_workers", 0))
    prefetch = int(data_config.get("prefetch", 2))
    if num_workers < 0 or prefetch < 0:
        raise ConfigError(
            f"data.num_workers={num_workers} and data.prefetch={prefetch} must be >= 0."
        )
    if num_workers > 0:
        return ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)
            )
        )
    if prefetch > 0:
        return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def _tag_position(position: int, document: Any) -> tuple[int, int]:
    return int(position), int(document)


def _attach_tokens(tokenized: TokenizedCorpus, group):
    return tuple((position, document, tokenized[document]) for position, document in group)


def _split_corpus(data, train_corpus, split, tfds_data_dir):
    """(corpus, document indices) of `split`."""
    eval_split = data.get("eval_split", "") or ""
    if eval_split:
        if not isinstance(train_corpus, corpora.TfdsCorpus):
            raise ConfigError(
                f"data.eval_split={eval_split!r} only applies to tfds corpora (data.corpus="
                f"{train_corpus.spec!r}); leave it empty and set data.eval_fraction."
            )
        if split == "eval":
            corpus = corpora.TfdsCorpus(f"{train_corpus.name}:{eval_split}", data_dir=tfds_data_dir)
            return corpus, np.arange(len(corpus))
        return train_corpus, np.arange(len(train_corpus))
    eval_fraction = float(data.get("eval_fraction", 0.0))
    documents = splits.split_documents(len(train_corpus), split, eval_fraction)
    if len(documents) == 0:
        raise ConfigError(
            f"the {split} split of data.corpus={train_corpus.spec!r} is empty "
            f"({len(train_corpus)} documents, data.eval_fraction={eval_fraction}); "
            + (
                "raise data.eval_fraction or use a larger corpus."
                if split == "eval"
                else "lower data.eval_fraction."
            )
        )
    return train_corpus, documents


def _check_has_text(tokenized, shard, split, process_index, process_count, num_documents):
    # An endless stream of empty documents would hang the first next(); fail instead.
    if len(shard) == 0:
        raise ConfigError(
            f"process {process_index} of {process_count} gets no {split} documents "
            f"(the split has {num_documents}); use fewer processes or a larger corpus "
            "(data.corpus) or data.eval_fraction."
        )
    for document in shard:
        if tokenized[int(document)]:
            return
    raise corpora.CorpusError(
        f"data.corpus={tokenized.corpus.spec!r}: the {len(shard)} {split} documents of "
        f"process {process_index} contain no text; point data.corpus at files with text."
    )

