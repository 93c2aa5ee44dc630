r"""Inspect the data pipelines; build or prepare tfds datasets.

  python -m unit_scaling.data --config configs/bert.py:tiny --stats --batches 50
  python -m unit_scaling.data --config configs/causal_lm.py:tiny --stats
  python -m unit_scaling.data --config configs/bert.py:tiny --finetune_task=kjv_books --stats
  python -m unit_scaling.data --config configs/bert.py:tiny --build_tfds=kjv --tfds_data_dir=DIR
  python -m unit_scaling.data --prepare_tfds=lm1b --tfds_data_dir=DIR   (downloads)

Prints `--show` examples of the first batch decoded to text. With `--stats`, then
pulls `--batches` more and prints, as the last line of stdout, one JSON object with
the statistics of `unit_scaling.data.stats` (mask_fraction, mask_token_fraction,
random_token_fraction, kept_fraction, nsp_positive_fraction, padding_fraction for
BERT; packing_efficiency, padding_fraction, segments_per_row for the causal LM;
label_fractions for fine-tuning) and the throughput: batches_per_s, examples_per_s,
tokens_per_s over the measured batches (the first one included, so the initial
shuffle-window fill is paid; use a few hundred batches for a steady-state number),
first_batch_s, and setup_s (pipeline creation: corpus, tokenizer). Fields of the config
can be overridden as usual: `--config.data.seq_len=64`.
"""

from __future__ import annotations

import gc
import json
import sys
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from unit_scaling import errors
from unit_scaling.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and argument, e.g. configs/bert.py:tiny.", lock_config=True
)
_STATS = flags.DEFINE_bool("stats", False, "Measure statistics and throughput; print JSON last.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Batches measured by --stats.")
_SHOW = flags.DEFINE_integer("show", 3, "Examples of the first batch to print decoded.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which split to read.")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", None, "Default: jax.process_index().")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None, "Default: jax.process_count().")
_FINETUNE_TASK = flags.DEFINE_string("finetune_task", "", "Inspect a fine-tuning task instead.")
_BUILD_TFDS = flags.DEFINE_string(
    "build_tfds", "", "Build unit_scaling_text/NAME from config.data.corpus and exit."
)
_PREPARE_TFDS = flags.DEFINE_string(
    "prepare_tfds", "", "download_and_prepare this tfds dataset as array_record and exit."
)
_TFDS_DATA_DIR = flags.DEFINE_string(
    "tfds_data_dir", "", "tfds data dir (overrides config.data.tfds_data_dir)."
)


def main(argv) -> None:
    from unit_scaling.data.corpora import CorpusError
    from unit_scaling.data.tokenizer import TokenizerError

    try:
        _main(argv)
    except (CorpusError, TokenizerError, ValueError, UserError) as e:
        # Configuration and data errors carry their own fix: show it without a
        # traceback, exit status 2 (UNIT_SCALING_VERBOSE=1 for the traceback).
        if errors.verbose():
            raise
        errors.fail(str(e))


def _main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _PREPARE_TFDS.value:
        _prepare_tfds(_PREPARE_TFDS.value, _TFDS_DATA_DIR.value or None)
        return
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/bert.py:tiny")
    if _TFDS_DATA_DIR.value:
        with config.unlocked():
            config.data.tfds_data_dir = _TFDS_DATA_DIR.value
    if _BUILD_TFDS.value:
        from unit_scaling.data import tfds_builder

        spec = tfds_builder.build_tfds_corpus(
            config.data.corpus, name=_BUILD_TFDS.value, data_dir=config.data.tfds_data_dir or None
        )
        print(
            f"Built. Use: --config.data.corpus={spec} "
            f"--config.data.tfds_data_dir={config.data.tfds_data_dir or '<tfds default>'}"
        )
        return

    from unit_scaling.data import finetune, pipeline, stats

    start = time.perf_counter()
    if _FINETUNE_TASK.value:
        iterator, info = finetune.make_finetune_pipeline(
            config,
            _FINETUNE_TASK.value,
            _SPLIT.value,
            process_index=_PROCESS_INDEX.value,
            process_count=_PROCESS_COUNT.value,
        )
        objective = "finetune"
    else:
        iterator, info = pipeline.make_pretraining_pipeline(
            config,
            _SPLIT.value,
            process_index=_PROCESS_INDEX.value,
            process_count=_PROCESS_COUNT.value,
        )
        objective = info.objective
    setup_s = time.perf_counter() - start

    result = None
    if _STATS.value:
        if objective == "finetune":
            result, first = _finetune_stats(iterator, info, _BATCHES.value)
        else:
            result, first = stats.measure(iterator, objective, _BATCHES.value)
    else:
        first = next(iterator)

    show = {"mlm_nsp": _show_bert, "causal_lm": _show_causal, "finetune": _show_finetune}
    for i in range(min(_SHOW.value, len(first["input_ids"]))):
        print(show[objective](first, i, info))
        print()

    if result is not None:
        result.update(
            setup_s=setup_s,
            objective=objective,
            split=_SPLIT.value,
            corpus=config.data.corpus,
            tokenizer_pieces=int(info.tokenizer.vocab_size),
        )
        sys.stdout.flush()
        print(json.dumps({k: _round(v) for k, v in result.items()}, sort_keys=True))
    # Stop the prefetch threads while the interpreter is intact (quiet shutdown).
    iterator.close()
    del iterator
    gc.collect()


def _show_bert(batch, i, info) -> str:
    tok = info.tokenizer
    ids, seg, mask = batch["input_ids"][i], batch["segment_ids"][i], batch["input_mask"][i]
    n = int(mask.sum())
    a = ids[1:n][seg[1:n] == 0][:-1]  # drop the [SEP] closing A
    b = ids[:n][seg[:n] == 1][:-1]
    label = int(batch["next_sentence_label"][i])
    weights = batch["masked_lm_weights"][i] > 0
    preds = []
    for pos, orig in zip(
        batch["masked_lm_positions"][i][weights], batch["masked_lm_ids"][i][weights]
    ):
        shown = ids[pos]
        kind = (
            "MASK"
            if shown == info.mask_id
            else ("kept" if shown == orig else f"random {tok.piece(shown)!r}")
        )
        preds.append(f"{pos}:{tok.piece(orig)!r}({kind})")
    return "\n".join(
        [
            f"--- example {i}: {n} tokens, next_sentence_label={label} "
            f"({'random B' if label else 'B follows A'})",
            f"A: {tok.decode(a)}",
            f"B: {tok.decode(b)}",
            f"predict: {' '.join(preds)}",
        ]
    )


def _show_causal(batch, i, info) -> str:
    tok = info.tokenizer
    seg = batch["segment_ids"][i]
    lines = [f"--- row {i}: {int((seg > 0).sum())}/{len(seg)} tokens, {int(seg.max())} segments"]
    for s in range(1, int(seg.max()) + 1):
        where = seg == s
        text = tok.decode(batch["input_ids"][i][where])
        last_target = tok.piece(batch["targets"][i][where][-1])
        lines.append(
            f"[{s}] {text[:300]}{' ...' if len(text) > 300 else ''}  (last target {last_target!r})"
        )
    return "\n".join(lines)


def _show_finetune(batch, i, info) -> str:
    n = int(batch["input_mask"][i].sum())
    label = int(batch["label"][i])
    return (
        f"--- example {i}: label={label} ({info.label_names[label]}), "
        f"weight={float(batch['weight'][i])}\n{info.tokenizer.decode(batch['input_ids'][i][:n])}"
    )


def _finetune_stats(iterator, info, num_batches):
    counts = np.zeros(info.num_classes, np.int64)
    examples = tokens = padding_rows = 0
    start = time.perf_counter()
    done = 0
    first = None
    for batch in iterator:
        first = batch if first is None else first
        real = batch["weight"] > 0
        counts += np.bincount(batch["label"][real], minlength=info.num_classes)
        examples += len(real)
        padding_rows += int((~real).sum())
        tokens += int(batch["input_mask"].sum())
        done += 1
        if done >= num_batches:
            break
    elapsed = time.perf_counter() - start
    return {
        "task": info.task,
        "label_fractions": dict(zip(info.label_names, (counts / max(counts.sum(), 1)).tolist())),
        "padding_fraction": 1.0 - tokens / max(examples * info.seq_len, 1),
        "num_batches": done,
        "num_examples_in_split": info.num_examples,
        "batches_per_s": done / elapsed,
        "examples_per_s": (examples - padding_rows) / elapsed,
    }, first


def _prepare_tfds(name: str, data_dir: str | None) -> None:
    import tensorflow_datasets as tfds

    if name.startswith("glue"):
        import tensorflow_datasets.text.glue  # noqa: F401  (not registered without TF)
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    print(
        f"Prepared {builder.info.full_name} in {builder.data_dir}. Use: "
        f"--config.data.corpus=tfds:{name}"
        + (f" --config.data.tfds_data_dir={data_dir}" if data_dir else "")
    )


def _round(value):
    if isinstance(value, float):
        return round(value, 5)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


if __name__ == "__main__":
    app.run(main, flags_parser=errors.flags_parser)
