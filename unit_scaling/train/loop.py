"""The training loop: `run(config, workdir)`.

One process per host; every process runs the same program on its shard of the batch.

1. Check that the workdir (`RunDir`) is a writable directory and take its lock (one
   run per workdir). If it has a checkpoint, check that the config may resume it (same
   model; trajectory fields unchanged unless `train.allow_resume_changes`).
2. `trainer.build(config)`: mesh from `config.mesh`, model and data (`tasks.make_task`;
   the eval split is built once at start-up, so an empty one fails now), optimizer,
   the state's shardings and the jitted steps; errors name the field, before anything
   compiles. Only then write `config.json`.
3. The train state is created directly sharded (`trainer.init`), or, if
   `WORKDIR/checkpoints` has a checkpoint, restored (on this mesh, whatever mesh wrote
   it; into the abstract state, before anything compiles, so a corrupt step is reported
   at once) with the data iterator, so the run continues exactly where it stopped;
   `metrics.jsonl` rows after that step are dropped.
4. Loop: assemble the global batch from per-process batches
   (`jax.make_array_from_process_local_data`), run the jitted, donated step, log every
   `log_every`, checkpoint every `checkpoint_every`, then evaluate every `eval_every`
   (a step with both saves first). A failed save stops the run (`CheckpointSaveError`).
   SIGTERM or Ctrl-C saves (all hosts the same step) and raises `Preempted`; a
   non-finite loss stops the run with the names of the non-finite gradients and keeps
   the last good checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import tqdm

from unit_scaling.errors import ConfigError
from unit_scaling.train import checkpoint as checkpoint_lib
from unit_scaling.train import metrics as metrics_lib
from unit_scaling.train import optimizer as optimizer_lib
from unit_scaling.train import rundir as rundir_lib
from unit_scaling.train import step as step_lib
from unit_scaling.train import tasks
from unit_scaling.train import trainer as trainer_lib
from unit_scaling.train.preemption import EXIT_INTERRUPTED, EXIT_PREEMPTED, Preempted, Preemption

__all__ = ["run", "NonFiniteLossError", "Preempted", "EXIT_PREEMPTED", "EXIT_INTERRUPTED"]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf; the message names the tensors."""


def run(config, workdir: str, make_task: Callable[[Any], tasks.Task] = tasks.make_task) -> dict:
    """Trains `config` in `workdir`; returns the last logged metrics. `make_task`
    replaces `tasks.make_task` (e.g. a toy model in the tests).

    Raises `Preempted` after saving, on SIGTERM/SIGINT; `UserError`s (config, run
    directory, checkpoint) before anything compiles where possible."""
    trainer_lib.check_train_config(config.train)
    run_dir = rundir_lib.RunDir(workdir)
    run_dir.check_usable()  # before loading any data
    with run_dir.lock(enabled=jax.process_index() == 0):
        return _run(config, run_dir, make_task)


def _run(config, run_dir: rundir_lib.RunDir, make_task: Callable[[Any], tasks.Task]) -> dict:
    main = jax.process_index() == 0
    ckpt = checkpoint_lib.Checkpointer(
        run_dir.checkpoints, json.loads(config.to_json_best_effort()),
        every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
    )
    trainer = None
    try:
        resume = ckpt.resume_step()
        # The run's tokenizer is the one in its workdir from the first start on, so a
        # resume never retrains it (or picks up another cache entry). A new run (no
        # checkpoint) replaces a copy left by an earlier attempt.
        resumes_tokenizer = resume is not None and run_dir.tokenizer.exists()
        trainer = trainer_lib.build(rundir_lib.with_tokenizer(config, run_dir.tokenizer)
                                    if resumes_tokenizer else config, make_task)
        if main:
            run_dir.write_config(config)  # only once the resume and config checks passed
            run_dir.keep_tokenizer(trainer.task.tokenizer, replace=resume is None)
        _check_eval_split(trainer.task, config.train)
        return _train(config, run_dir, trainer, ckpt, resume)
    finally:
        ckpt.close()
        if trainer is not None:
            trainer.close()


def _train(config, run_dir, trainer: trainer_lib.Trainer, ckpt, resume: Optional[int]) -> dict:
    train, task = config.train, trainer.task
    dynamic = isinstance(trainer.loss_scale, optimizer_lib.DynamicLossScale)
    start = 0
    pending = [trainer.first]  # the batch already drawn, used first unless we restore
    writer = metrics_lib.MetricWriter(run_dir)
    if resume is not None:
        # Into the abstract state: nothing compiled before the restore.
        state, data_state, start = ckpt.restore(trainer.abstract_state(), resume)
        task.train_batches.set_state(data_state)
        pending = []
        ckpt.set_aside_after(start)
        dropped = writer.truncate(start)
        logging.info("resumed from %s at step %d%s", ckpt.directory, start,
                     f" (dropped {dropped} metrics rows logged after it)" if dropped else "")
    else:
        writer.truncate(0)  # rows of an earlier attempt that saved no checkpoint
        with trainer.context():
            state = trainer.init(trainer.global_batch(trainer.first))
        if task.init_params is not None:
            state = state.replace(params=jax.device_put(task.init_params(state.params),
                                                        trainer.shardings.params))

    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, fp8=task.fp8)
    last: dict = {}
    timer = (time.perf_counter(), start)  # (time, step) of the last log
    progress = tqdm.tqdm(total=train.steps, initial=start, disable=jax.process_index() != 0,
                         desc="train", unit="step", dynamic_ncols=True)
    stop, step = 0, start
    try:
        with Preemption(train.preemption_check_every) as preemption, trainer.context():
            for micro in range(start * train.grad_accum, train.steps * train.grad_accum):
                local = pending.pop() if pending else next(task.train_batches)
                state, step_metrics = trainer.train_step(state, trainer.global_batch(local))
                if (micro + 1) % train.grad_accum:
                    continue  # inside an accumulation: no update yet
                step = (micro + 1) // train.grad_accum
                progress.update(1)
                ckpt.check()  # a background save failed: stop before training past it
                stop = preemption.agreed(step)
                is_last = step == train.steps
                _maybe_profile(train, step, run_dir)
                if train.log_every and (step % train.log_every == 0 or is_last):
                    host = jax.device_get(step_metrics)
                    _check_finite(host, ckpt, dynamic)
                    now = time.perf_counter()
                    scalars = {k: float(v) for k, v in host.items() if not k.startswith("_")}
                    scalars.update(_perf((now - timer[0]) / (step - timer[1]), task, peak))
                    timer = (now, step)
                    if train.rms_every and step % train.rms_every == 0:
                        scalars.update(step_lib.flatten_rms(host["_rms"]))
                    writer.write(step, scalars, console=False)
                    last.update(scalars)
                    progress.set_postfix(loss=f"{scalars['train/loss']:.3f}")
                # Save before evaluating: an evaluation that fails or is preempted never
                # costs the step's checkpoint.
                if ckpt.should_save(step) or is_last or stop:
                    _check_finite(jax.device_get(step_metrics), ckpt, dynamic)  # never save NaNs
                    ckpt.save(step, state, task.train_batches.get_state(), force=True)
                if stop:
                    break
                if task.eval_batches and train.eval_every and (step % train.eval_every == 0 or is_last):
                    evaluated = trainer_lib.evaluate(trainer, state.params, train.eval_batches)
                    evaluated.update(task.eval_constants)
                    writer.write(step, evaluated)
                    last.update(evaluated)
            ckpt.wait()  # the last save must have succeeded before the run reports success
    finally:
        progress.close()
        writer.close()
    if stop:
        raise Preempted(stop, step, ckpt.directory)
    return last


def _check_eval_split(task: tasks.Task, train) -> None:
    """Builds the eval pipeline once at start-up: an empty eval split fails now, not at
    the first evaluation."""
    if not (task.eval_batches and train.eval_every):
        return
    iterator = task.eval_batches()
    try:
        first = next(iterator, None)
    finally:
        getattr(iterator, "close", lambda: None)()
    if first is None:
        raise ConfigError(
            "the eval split is empty: raise config.data.eval_fraction (or set "
            "config.data.eval_split), or turn evaluation off with config.train.eval_every=0")


def _maybe_profile(train, step: int, run_dir) -> None:
    """A profiler trace of `profile_steps` steps after step `profile_start` (0: off)."""
    if not train.profile_start:
        return
    if step == train.profile_start:
        jax.profiler.start_trace(str(run_dir.profile))
    elif step == train.profile_start + train.profile_steps:
        jax.profiler.stop_trace()


def _perf(step_s: float, task: tasks.Task, peak: Optional[float]) -> dict:
    perf = {"perf/step_s": step_s, "perf/tokens_per_s": task.tokens_per_batch / step_s}
    if task.flops_per_step:
        tflops = task.flops_per_step / step_s / 1e12
        perf["perf/tflops_per_s"] = tflops
        if peak:
            perf["perf/mfu"] = tflops * 1e12 / (peak * jax.device_count())
    return perf


def _check_finite(host_metrics: dict, ckpt, dynamic_loss_scale: bool) -> None:
    """Raises `NonFiniteLossError` naming the non-finite loss terms and gradients.

    Under a dynamic loss scale, overflowing gradients are expected: the step skips its
    update and halves the scale. Then only the losses must be finite, until the scale
    is down to 1."""
    scalars = {k: v for k, v in host_metrics.items() if k.startswith("train/")}
    grads_finite = bool(host_metrics["train/grads_finite"])
    if dynamic_loss_scale and host_metrics["train/loss_scale"] > 1:
        scalars = {k: v for k, v in scalars.items() if k.endswith("loss")}
        grads_finite = True
    bad_scalars = [k for k, v in scalars.items() if not np.isfinite(v)]
    if not bad_scalars and grads_finite:
        return
    ckpt.wait()
    raise NonFiniteLossError(
        f"non-finite values: {bad_scalars or 'none of the losses'}; first non-finite "
        f"gradients: {step_lib.non_finite_paths(host_metrics['_finite']) or 'none'}. The "
        f"last good checkpoint is step {ckpt.latest_step()} in {ckpt.directory} (nothing "
        "was saved after it). Lower config.train.lr, use a loss scale for SP in "
        "fp16/fp8, or use param=unit|umup."
    )
