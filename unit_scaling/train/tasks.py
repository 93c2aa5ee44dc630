"""From a config to what the loop trains: the model and its data (`Task`).

`config.data.objective` picks the task: "mlm_nsp" (`BertForPreTraining`),
"causal_lm" (`CausalLM`) or "classification" (`BertForSequenceClassification` on a
fine-tuning task, optionally initialised from a pretraining run's encoder).
Everything that can be wrong with the config is checked here, before compilation.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import numpy as np

from unit_scaling.errors import ConfigError
from unit_scaling import data as data_lib
from unit_scaling.data import finetune
from unit_scaling.data.tokenizer import Tokenizer
from unit_scaling.models import bert, causal_lm
from unit_scaling.parametrization import PARAMETRIZATIONS
from unit_scaling.precision import PRECISIONS
from unit_scaling.train import metrics as metrics_lib
from unit_scaling.train.rundir import RunDir, with_tokenizer

# The pretraining objectives of the data pipeline, and fine-tuning's classification.
OBJECTIVES = (*data_lib.pipeline.OBJECTIVES, finetune.CLASSIFICATION.name)


@dataclasses.dataclass
class Task:
    """A model and its data: what the loop trains (the optimizer comes from the config,
    `optimizer.from_config`).

    model: Flax module, `apply(vars, batch, deterministic, rngs) -> (loss, metrics)`.
    train_batches: per-process iterator of numpy batch dicts, with grain-style
      `get_state()` / `set_state(state)` (checkpointed with the train state).
    eval_batches: a factory of fresh eval iterators (one per evaluation), or None.
    flops_per_step: model FLOPs of one optimizer step, or None.
    tokens_per_batch: tokens in one global batch (for tokens/s).
    fp8: the matmuls run in real FP8 (for the peak FLOP/s of MFU).
    init_params: params -> params, applied to a new run (not a resumed one), e.g. to
      load a pretrained encoder.
    tokenizer: the data's tokenizer (with `model_proto`), kept in the workdir.
    eval_constants: logged with every evaluation (e.g. a majority-class baseline).
    """

    model: nn.Module
    train_batches: Iterator[dict]
    eval_batches: Optional[Callable[[], Iterator[dict]]]
    flops_per_step: Optional[float]
    tokens_per_batch: int
    fp8: bool = False
    init_params: Optional[Callable[[Any], Any]] = None
    tokenizer: Any = None
    eval_constants: dict = dataclasses.field(default_factory=dict)

    def close(self) -> None:
        """Releases the train iterator (its worker processes and prefetch thread)."""
        close = getattr(self.train_batches, "close", None)
        if close is not None:
            close()


def validate(config) -> None:
    """Fails early, naming the field, on the task's settings (`param`, `precision`, the
    objective); the loop's own (`config.train`) are `trainer.check_train_config`'s."""
    if config.param not in PARAMETRIZATIONS:
        raise ConfigError(f"config.param={config.param!r}: use one of {PARAMETRIZATIONS}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"config.precision={config.precision!r}: use one of {PRECISIONS}")
    if config.data.objective not in OBJECTIVES:
        raise ConfigError(f"config.data.objective={config.data.objective!r}: use one of {OBJECTIVES}")


def model_config(config, vocab_size: int):
    """The model's config dataclass from `config.model`, `param`, `precision`."""
    cls = causal_lm.CausalLMConfig if config.data.objective == "causal_lm" else bert.BertConfig
    fields = dict(config.model.to_dict(), param=config.param, precision=config.precision,
                  vocab_size=vocab_size)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.model: {e}") from e


def make_task(config, pipeline: Optional[Callable] = None) -> Task:
    """The `Task` for `config` (see the module docstring). `pipeline(config, split) ->
    (iterator, DataInfo)` replaces `data.make_pretraining_pipeline` for the
    pretraining objectives (e.g. synthetic batches for benchmarks)."""
    validate(config)
    objective = config.data.objective
    if objective == "classification":
        return _classification_task(config)
    pipeline = pipeline or data_lib.make_pretraining_pipeline
    train_iter, info = pipeline(config, "train")
    model_cfg = model_config(config, info.vocab_size)
    if objective == "causal_lm":
        model = causal_lm.CausalLM(model_cfg)
        readout_tokens, extra = None, 0.0
    else:
        model = bert.BertForPreTraining(model_cfg)
        predictions = config.train.global_batch_size * config.data.max_predictions_per_seq
        readout_tokens = predictions
        d = model_cfg.d_model
        # MLM dense layer on the gathered positions; pooler and NSP on [CLS].
        extra = 2 * predictions * d * d + 2 * config.train.global_batch_size * (d * d + 2 * d)
    shape = metrics_lib.TransformerShape(
        num_layers=model_cfg.num_layers, d_model=model_cfg.d_model,
        num_heads=model_cfg.num_heads, head_dim=model_cfg.head_dim,
        mlp_dim=model_cfg.mlp_dim, vocab_size=info.vocab_size,
        glu=model_cfg.activation == "swiglu", causal=objective == "causal_lm",
    )
    flops = metrics_lib.train_flops_per_step(
        shape, config.train.global_batch_size, info.seq_len, readout_tokens, extra)
    return Task(
        model=model,
        train_batches=train_iter,
        eval_batches=lambda: pipeline(config, "eval")[0],
        flops_per_step=flops,
        tokens_per_batch=config.train.global_batch_size * info.seq_len,
        fp8=config.precision == "fp8" and model_cfg.real_fp8,
        tokenizer=info.tokenizer,
    )


def _classification_task(config) -> Task:
    if config.get("init_from"):
        check_init_from(config)
        config = _init_from_tokenizer(config)
    train_iter, info = data_lib.make_finetune_pipeline(config, config.data.task, "train")
    model_cfg = model_config(config, config.data.vocab_size)
    model = bert.BertForSequenceClassification(model_cfg, num_classes=info.num_classes)
    examples, _ = finetune.load_task(config.data.task, "eval",
                                     tfds_data_dir=config.data.tfds_data_dir or None)
    counts = finetune.class_counts(examples, info.num_classes)
    baseline = float(counts.max() / counts.sum())
    logging.info("%s: %d classes, %d eval examples, majority baseline %.3f", info.task,
                 info.num_classes, int(counts.sum()), baseline)
    return Task(
        model=model,
        train_batches=train_iter,
        eval_batches=lambda: data_lib.make_finetune_pipeline(config, config.data.task, "eval")[0],
        flops_per_step=None,
        tokens_per_batch=config.train.global_batch_size * info.seq_len,
        init_params=(lambda params: load_encoder(config.init_from, params))
        if config.get("init_from") else None,
        tokenizer=info.tokenizer,
        eval_constants={"eval/majority_baseline": baseline},
    )


def check_init_from(config) -> None:
    """`config.init_from` must be a finished pretraining run with a BERT encoder: checked
    when the task is built, before anything compiles."""
    run = RunDir(config.init_from)
    stored = run.read_config()  # RunDirError: missing, or not a train.py run
    if stored.data.objective != "mlm_nsp":
        raise ConfigError(
            f"config.init_from={config.init_from!r} trained {stored.data.objective!r}; "
            "fine-tuning initialises a BERT encoder from an 'mlm_nsp' pretraining run")
    if not run.checkpoint_steps():
        raise ConfigError(
            f"config.init_from={config.init_from!r} has no checkpoint in {run.checkpoints}; "
            "pass the --workdir of a pretraining run that saved one (checkpoint_every or its "
            "last step)")


def _init_from_tokenizer(config):
    """Fine-tuning uses the tokenizer of the `init_from` run (its `tokenizer.model`) by
    default; an explicit `data.tokenizer_path` must be the same model."""
    pretrained = RunDir(config.init_from).tokenizer
    if not pretrained.exists():
        return config  # a run from before workdirs kept their tokenizer
    given = config.data.get("tokenizer_path")
    if not given:
        return with_tokenizer(config, pretrained)
    if Tokenizer.load(given).model_proto != Tokenizer.load(pretrained).model_proto:
        raise ConfigError(
            f"config.data.tokenizer_path={given!r} is not the tokenizer of "
            f"config.init_from={config.init_from!r} ({pretrained}); the encoder only "
            "understands its own pieces. Leave data.tokenizer_path empty to use it.")
    return config


def load_encoder(run_dir: str, params: dict) -> dict:
    """`params` with the `encoder` (and `pooler`) of the latest checkpoint in the
    pretraining run `run_dir` (its model must have the same shapes)."""
    run = RunDir(run_dir)
    if not run.checkpoint_steps():
        raise ConfigError(
            f"config.init_from={run_dir!r} has no checkpoint in {run.checkpoints}; pass the "
            "--workdir of a finished pretraining run")
    pretrained, step = run.restore_params()
    new = dict(params)
    for name in ("encoder", "pooler"):
        if name not in pretrained:
            raise ConfigError(f"config.init_from={run_dir!r}: its params have no {name!r}")
        ref = jax.tree.map(np.shape, params[name])
        got = jax.tree.map(np.shape, pretrained[name])
        if ref != got:
            raise ConfigError(
                f"config.init_from={run_dir!r}: the {name} shapes differ from this model's; "
                "use the same model size (config.model) as the pretraining run"
            )
        new[name] = jax.tree.map(lambda p, v: np.asarray(v, p.dtype), params[name], pretrained[name])
    logging.info("initialised the encoder from %s step %d", run_dir, step)
    return new
