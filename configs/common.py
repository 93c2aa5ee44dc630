"""Helpers of the config files: loading one, parsing its `get_config(arg)` string, and
building the sections from the values a config file gives (`data`, `model`, `train`)
plus the settings no recipe changes (the bookkeeping tables below), and the mesh.

A config is chosen on the command line as `--config configs/bert.py:ARG`, where ARG
is a comma list such as `tiny` or `base,param=umup,precision=fp8` (big_vision style);
single fields are then overridden with `--config.train.lr=0.01`.

Top-level fields: `seed`, `param` ("sp" | "unit" | "umup"), `precision` ("fp32" |
"bf16" | "fp16" | "fp8"), `size` (the preset), `init_from` (fine-tuning).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any, Mapping

import ml_collections

from unit_scaling.precision import LossScaling

_LOSS_SCALING = LossScaling()

# Fields of a model's dataclass that live elsewhere in the config: `param` and
# `precision` at the top, `vocab_size` in `data`.
_NOT_IN_MODEL_SECTION = ("param", "precision", "vocab_size")

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


REPO = pathlib.Path(__file__).resolve().parent.parent


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file given as "configs/bert.py:ARG" (relative to
    the repository or absolute), as `--config` loads it, for scripts and tests."""
    path, _, arg = path_and_arg.partition(":")
    spec = importlib.util.spec_from_file_location(
        f"_config_{abs(hash(path))}", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses "preset,key=value,flag,..." into a ConfigDict of `defaults`' keys.

    - `key=value` sets `key`, converted to the type of its default (bool accepts
      true/false/yes/no/1/0/on/off).
    - a bare `key` whose default is a bool sets it to True;
    - any other bare word is the value of the first key (the preset), at most once.

    Args:
      arg: the string after ":" in `--config file.py:arg`; None or "" = all defaults.
      **defaults: every accepted key with its default value (order matters: the first
        key takes the bare word).

    Returns:
      ConfigDict with exactly the keys of `defaults`.

    Raises:
      ValueError: an unknown key (the message lists the valid ones), a value that does
        not convert, or two bare words.
    """
    if not defaults:
        raise ValueError("parse_arg needs at least one default (the first one is the preset).")
    values = dict(defaults)
    first = next(iter(defaults))
    positional_seen = False
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if sep:
            if key not in defaults:
                raise ValueError(
                    f"config argument {item!r}: unknown key {key!r}; valid keys: "
                    f"{', '.join(defaults)}."
                )
            values[key] = convert(key, raw.strip(), defaults[key])
        elif isinstance(defaults.get(key), bool):
            values[key] = True
        else:
            if positional_seen:
                raise ValueError(
                    f"config argument {arg!r}: more than one bare word ({item!r}); only the "
                    f"first ({first}) may be given without 'key='. Valid keys: "
                    f"{', '.join(defaults)}."
                )
            positional_seen = True
            values[first] = convert(first, item, defaults[first])
    return ml_collections.ConfigDict(values)


def select_preset(presets: Mapping[str, Any], name: str, field: str = "size") -> Any:
    """`presets[name]`, or a ValueError that lists the valid names."""
    if name not in presets:
        raise ValueError(f"{field}={name!r} is not a preset; choose one of: {', '.join(presets)}.")
    return presets[name]


def convert(key: str, raw: str, default: Any) -> Any:
    """`raw` (a command-line string) as the type of `default` (bool, int, float; else
    the string), or a ValueError naming `key`."""
    try:
        if isinstance(default, bool):
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ValueError(
            f"config argument {key}={raw!r}: expected a {type(default).__name__} like the "
            f"default {default!r}."
        ) from None
    return raw


# The data pipeline's plumbing, the same for every pretraining config (a config file
# gives objective, corpus, tokenizer, vocab_size and seq_len).
DATA_PLUMBING = dict(
    tfds_data_dir="",  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    tokenizer_path="",  # "" = train on the corpus once and cache
    tokenizer_sample_size=1_000_000,  # sentences the tokenizer is trained on
    eval_fraction=0.02,  # documents held out for eval (by a fixed hash)
    eval_split="",  # tfds corpora: a separate split for eval instead
    shuffle_window=64,  # documents whose examples are shuffled together
    num_workers=0,  # > 0: grain worker processes
    prefetch=2,  # batches prepared ahead by a background thread
)

# What a config file must give for `train`: its recipe.
TRAIN_RECIPE = ("steps", "global_batch_size", "optimizer", "lr", "schedule", "weight_decay",
                "grad_clip", "b1", "b2")
# The trainer's other settings, the same for every config (0 turns an `*_every` off).
TRAIN_BOOKKEEPING = dict(
    final_lr_fraction=0.0,  # of lr, reached at the last step ("linear" | "cosine")
    grad_accum=1,  # micro-batches per update (global_batch_size is the update's)
    eps=1e-8,
    momentum=0.9,  # sgd
    # "none" | "static" | "dynamic" (the SP fp16/fp8 baselines); the defaults are
    # `unit_scaling.precision.LossScaling`'s: none, 2^15, 2000.
    loss_scale=_LOSS_SCALING.kind,
    loss_scale_value=_LOSS_SCALING.value,
    loss_scale_period=_LOSS_SCALING.period,
    # Storage of the Adam moments: "" = the parameters' dtype (optax's default),
    # "float32" | "bfloat16" (the update math stays float32); see train/optimizer.py.
    moment_dtype="",
    # How an update is rounded into bfloat16 parameters (`model.param_dtype`):
    # "nearest" | "stochastic" (unbiased; formats.quantise with a per-step key).
    param_rounding="nearest",
    log_every=50,
    eval_every=500,
    eval_batches=20,
    checkpoint_every=500,
    keep_checkpoints=2,
    # With several processes: steps between agreeing on a SIGTERM / Ctrl-C (an
    # all-gather that waits for the step, so not every step). One process: every step.
    preemption_check_every=10,
    rms_every=0,  # per-tensor RMS of params, grads and updates every N steps
    profile_start=0,  # a profiler trace of profile_steps steps from this step
    profile_steps=5,
    # Resuming with a changed trajectory field (steps, lr, schedule, batch, seed,
    # corpus, ...) is refused unless this is true; the changes are then printed.
    allow_resume_changes=False,
    restore_step=0,  # resume from this checkpoint step (0: the latest); later ones are set aside
)


def data_section(objective: str, corpus: str, tokenizer: str, vocab_size: int,
                 seq_len: int) -> ml_collections.ConfigDict:
    """`config.data`: the given fields and `DATA_PLUMBING`. `corpus`: "kjv" |
    "kjv:BOOK+BOOK" | "text:GLOB" | "tfds:NAME[/CONFIG][:SPLIT]"; `tokenizer`:
    "unigram" | "bpe" (sentencepiece)."""
    return ml_collections.ConfigDict(dict(
        objective=objective, corpus=corpus, tokenizer=tokenizer, vocab_size=vocab_size,
        seq_len=seq_len, **DATA_PLUMBING))


def model_section(model_cls: type, **fields: Any) -> ml_collections.ConfigDict:
    """`config.model`: every field of the model's config dataclass (so that any can be
    overridden on the command line): the given `fields`, the others at the dataclass's
    defaults; without `param`, `precision` (top level) and `vocab_size` (`data`)."""
    model = ml_collections.ConfigDict()
    for f in dataclasses.fields(model_cls):
        if f.name not in _NOT_IN_MODEL_SECTION:
            model[f.name] = fields.pop(f.name, f.default)
    if fields:
        raise ValueError(f"{model_cls.__name__} has no fields {sorted(fields)}")
    return model


def train_section(**recipe: Any) -> ml_collections.ConfigDict:
    """`config.train`: the config file's `recipe` (every field of `TRAIN_RECIPE`),
    `TRAIN_BOOKKEEPING`, and a linear warmup over the first tenth of the steps."""
    missing = [f for f in TRAIN_RECIPE if f not in recipe]
    unknown = sorted(set(recipe) - set(TRAIN_RECIPE))
    if missing or unknown:
        raise ValueError(f"train_section: missing {missing}, unknown {unknown}; set exactly "
                         f"{', '.join(TRAIN_RECIPE)}")
    train = ml_collections.ConfigDict({**recipe, **TRAIN_BOOKKEEPING})
    train.warmup_steps = train.get_ref("steps") // 10  # follows --config.train.steps
    return train


def mesh_section() -> ml_collections.ConfigDict:
    """`config.mesh`: axis sizes (one may be -1: the remaining devices) and the
    logical-axis rules that map parameter and activation axes onto them."""
    from unit_scaling.nn.partitioning import DEFAULT_RULES

    return ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, tensor=1,
        rules=[[name, list(axes) if isinstance(axes, tuple) else axes]
               for name, axes in DEFAULT_RULES],
    ))
