r"""Evaluate a run after compressing it: `python -m unit_scaling.evaluate --workdir RUN`.

  python -m unit_scaling.evaluate --workdir runs/lm-tiny --weights int8 --scales none
  python -m unit_scaling.evaluate --workdir runs/lm-tiny --kv_cache fp8
  python -m unit_scaling.evaluate --workdir runs/bert-tiny --rank_fraction 0.25 \
      --finetune_steps 100

Restores the latest checkpoint of a BERT (MLM+NSP) or causal-LM run, applies the
compression of the flags (`unit_scaling.compress.Compression`: weight-only fp8/int8/bf16
with or without per-channel scales, an 8-bit KV cache, low-rank projections and an
optional fine-tune to recover), and prints one JSON line: the eval loss and accuracy
(MLM accuracy for BERT) over `--eval_batches` batches of the run's held-out split, the
bytes of the weights as stored, the parameter count and the KV cache's bytes per token.
Quantisation is simulated (the weights are read back into the compute dtype); the
bytes are those of the stored 8-bit tensors.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Optional

import jax
import numpy as np
from absl import app, flags

from unit_scaling import compress as compress_lib
from unit_scaling import errors, host_memory
from unit_scaling.compress import Compression
from unit_scaling.errors import ConfigError
from unit_scaling.models import bert, causal_lm
from unit_scaling.train import step as step_lib
from unit_scaling.train import tasks
from unit_scaling.train.rundir import RunDir, RunDirError, with_tokenizer


def restore(workdir: str, step: Optional[int] = None) -> tuple[Any, Any, int]:
    """`(config, params, step)` of checkpoint `step` (default: the latest) of a
    BERT or causal-LM pretraining run."""
    run = RunDir(workdir)
    config = run.read_config()  # RunDirError: missing, or not a train.py run
    if config.data.objective not in ("mlm_nsp", "causal_lm"):
        raise ConfigError(f"--workdir {workdir} trained {config.data.objective!r}; pass a "
                          "configs/bert.py or configs/causal_lm.py run")
    if not run.checkpoint_steps():
        raise RunDirError(f"--workdir {workdir} has no checkpoint yet in {run.checkpoints}; "
                          "let the run save one (checkpoint_every, or its last step)")
    if run.tokenizer.exists():  # the data pipelines reuse the run's tokenizer
        config = with_tokenizer(config, run.tokenizer)
    params, step = run.restore_params(step)
    return config, params, step


def build_model(config, c: Compression):
    """The run's model with the compression's model fields (the KV cache format)."""
    model_cfg = dataclasses.replace(tasks.model_config(config, config.data.vocab_size),
                                    **c.model_fields())
    if config.data.objective == "causal_lm":
        return causal_lm.CausalLM(model_cfg)
    return bert.BertForPreTraining(model_cfg)


class Evaluator:
    """One run, evaluated under many compressions with the same eval batches.

    `Evaluator(workdir, eval_batches)`; `evaluator(compression, finetune_lr)` -> dict
    with `loss`, `accuracy`, `weight_bytes`, `params`, `projection_params`,
    `kv_bytes_per_token` (causal LM), `finetune_losses` (first and last, when a
    fine-tune ran).
    """

    def __init__(self, workdir: str, eval_batches: Optional[int] = None,
                 step: Optional[int] = None):
        self.workdir = workdir
        self.config, self.params, self.step = restore(workdir, step)
        self.objective = self.config.data.objective
        self.task = tasks.make_task(self.config)
        n = eval_batches or self.config.train.eval_batches
        iterator = self.task.eval_batches()
        self.batches = [b for _, b in zip(range(n), iterator)]
        getattr(iterator, "close", lambda: None)()

    def close(self) -> None:
        self.task.close()

    def __call__(self, c: Compression, finetune_lr: float = 3e-3) -> dict:
        c.check(self.objective)
        model = build_model(self.config, c)
        tree, prepare = compress_lib.compress(self.params, c)
        run = prepare or (lambda p: p)
        out: dict = {}
        if c.finetune_steps:
            def loss_fn(tree, batch):
                return model.apply({"params": run(tree)}, batch, deterministic=True)[0]

            tree, losses = compress_lib.finetune(tree, loss_fn, self.task.train_batches,
                                                 c.finetune_steps, finetune_lr)
            out["finetune_losses"] = [losses[0], losses[-1]]
        eval_step = jax.jit(lambda tree, batch: step_lib.make_eval_step(model)(run(tree), batch))
        totals: dict = {}
        for batch in self.batches:
            for k, v in jax.device_get(eval_step(tree, batch)).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(self.batches)
        accuracy = "eval/accuracy" if self.objective == "causal_lm" else "eval/mlm_accuracy"
        out.update(
            loss=totals["eval/loss"], accuracy=totals[accuracy],
            weight_bytes=compress_lib.params_nbytes(tree),
            params=compress_lib.count_params(tree),
            projection_params=compress_lib.count_params(tree, projections_only=True))
        if self.objective == "causal_lm":
            cache = causal_lm.init_cache(model, 1)
            out["kv_bytes_per_token"] = compress_lib.params_nbytes(cache) // model.config.max_len
        return out


# ---------------------------------------------------------------- flags (also generate's)

def define_compression_flags(finetune: bool = True) -> None:
    """The `Compression` flags (`finetune`: also --finetune_steps / --finetune_lr)."""
    flags.DEFINE_enum("weights", "fp32", compress_lib.WEIGHTS,
                      "Weight storage: fp32 (as trained), bf16, fp8 (E4M3) or int8.")
    flags.DEFINE_enum("scales", "none", ("none", "per_channel"),
                      "8-bit weights / KV cache: a plain cast (int8: fixed scale 4/127) "
                      "or absmax scales per channel.")
    flags.DEFINE_enum("kv_cache", "none", compress_lib.KV_CACHES,
                      "KV cache storage (causal LM).")
    flags.DEFINE_float("rank_fraction", 1.0,
                       "Attention and MLP projections as rank round(F min(fan_in, fan_out)) "
                       "SVD factors; 1 = dense.")
    if finetune:
        flags.DEFINE_integer("finetune_steps", 0,
                             "Steps of fine-tuning (after --rank_fraction < 1, or of the dense "
                             "model as a control).")
        flags.DEFINE_float("finetune_lr", 3e-3, "Relative lr of the fine-tune.")


def compression_from_flags() -> Compression:
    f = flags.FLAGS
    return Compression(weights=f.weights, scales=f.scales, kv_cache=f.kv_cache,
                       rank_fraction=f.rank_fraction,
                       finetune_steps=getattr(f, "finetune_steps", 0)).check()


@errors.reported
def main(argv):
    del argv
    host_memory.keep_freed_memory()  # before JAX's CPU client exists: see host_memory.py
    f = flags.FLAGS
    c = compression_from_flags()  # bad combinations fail before anything loads
    start = time.perf_counter()
    evaluator = Evaluator(f.workdir, f.eval_batches, f.step)
    try:
        result = evaluator(c, f.finetune_lr)
    finally:
        evaluator.close()
    print(json.dumps(dict(workdir=f.workdir, step=evaluator.step, param=evaluator.config.param,
                          **dataclasses.asdict(c), **result,
                          seconds=round(time.perf_counter() - start, 1))))


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A BERT or causal-LM training run.", required=True)
    flags.DEFINE_integer("step", None, "The checkpoint (default: the latest).")
    flags.DEFINE_integer("eval_batches", None, "Eval batches (default: the run's).")
    define_compression_flags()
    app.run(main, flags_parser=errors.flags_parser)
