"""The training loop: `run(config, workdir)`.

One process per host; every process runs the same program on its shard of the batch.

1. Validate the config (errors name the field, before anything compiles); check that
   the workdir (`RunDir`) is a writable directory and take its lock (one run per
   workdir). If it has a checkpoint, check that the config may resume it (same model;
   trajectory fields unchanged unless `train.allow_resume_changes`); only then write
   `config.json`.
2. Mesh from `config.mesh`; data pipeline for this process (the eval split is built
   once at start-up, so an empty one fails now); model and optimizer.
3. The train state is created directly sharded: `jax.jit(init, out_shardings=...)`
   with shardings from the parameters' logical axes and `config.mesh.rules`.
4. If `WORKDIR/checkpoints` has a checkpoint, restore the state (on this mesh, whatever
   mesh wrote it; into the abstract state, before anything compiles, so a corrupt step
   is reported at once) and the data iterator, so the run continues exactly where it stopped;
   `metrics.jsonl` rows after that step are dropped.
5. Loop: assemble the global batch from per-process batches
   (`jax.make_array_from_process_local_data`), run the jitted, donated step, log every
   `log_every`, checkpoint every `checkpoint_every`, then evaluate every `eval_every`
   (a step with both saves first). A failed save stops the run (`CheckpointSaveError`).
   SIGTERM or Ctrl-C saves (all hosts the same step) and raises `Preempted`; a
   non-finite loss stops the run with the names of the non-finite gradients and keeps
   the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from unit_scaling.errors import ConfigError
from unit_scaling.train import checkpoint as checkpoint_lib
from unit_scaling.train import mesh as mesh_lib
from unit_scaling.train import metrics as metrics_lib
from unit_scaling.train import optimizer as optimizer_lib
from unit_scaling.train import rundir as rundir_lib
from unit_scaling.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or inf; the message names the tensors."""


@dataclasses.dataclass
class Task:
    """What the loop needs from a model family (built by `tasks.make_task`).

    model: Flax module, `apply(vars, batch, deterministic, rngs) -> (loss, metrics)`.
    train_batches / eval_batches: per-process iterators of numpy batch dicts
      (`eval_batches` is a factory: a fresh iterator for each evaluation).
    data_state: (get_state, set_state) of the train iterator, for checkpoints.
    optimizer_parts: abstract boxed params -> kwargs for `optimizer.make_optimizer`
      (u-μP lr factors, decay).
    flops_per_step: model FLOPs of one optimizer step, or None.
    tokens_per_batch: tokens in one global batch (for tokens/s).
    fp8: the matmuls run in real FP8 (for the peak FLOP/s of MFU).
    init_params: params -> params, applied to a new run (not a resumed one), e.g. to
      load a pretrained encoder.
    tokenizer: the data's tokenizer (with `model_proto`), kept in the workdir.
    close: releases the data iterators.
    eval_constants: logged with every evaluation (e.g. a majority-class baseline).
    """

    model: nn.Module
    train_batches: Iterator[dict]
    eval_batches: Optional[Callable[[], Iterator[dict]]]
    get_data_state: Callable[[], Any]
    set_data_state: Callable[[Any], None]
    optimizer_parts: Callable[[Any], dict]
    flops_per_step: Optional[float]
    tokens_per_batch: int
    fp8: bool = False
    init_params: Optional[Callable[[Any], Any]] = None
    tokenizer: Any = None
    close: Callable[[], None] = lambda: None
    eval_constants: dict = dataclasses.field(default_factory=dict)


def state_shardings(abstract_boxed_state: Any, mesh, rules) -> Any:
    """NamedShardings for every leaf of the (unboxed) state, from logical axes."""
    specs = nn.get_partition_spec(abstract_boxed_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def global_batch(local: dict, sharding) -> dict:
    """Global arrays sharded over the batch axes, from this process's batch."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


# Exit statuses of a preempted run (128 + the signal, as shells report a killed job), so
# a job scheduler sees a stop that is neither success nor a crash: rerun to resume.
EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT after saving a checkpoint at `step`.
    `exit_code` is `EXIT_PREEMPTED` (SIGTERM) or `EXIT_INTERRUPTED` (Ctrl-C)."""

    def __init__(self, signum: int, step: int, directory):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        super().__init__(
            f"preempted by {signal.Signals(signum).name}: saved step {step} in {directory}; "
            "rerun the same command to resume")


class _Preemption:
    """Turns SIGTERM and SIGINT into a flag the loop checks between steps. A second
    Ctrl-C interrupts at once (KeyboardInterrupt), without waiting for the save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("%s: saving a checkpoint and exiting after this step",
                        signal.Signals(signum).name)
        self.signum = signum

    def agreed(self) -> int:
        """The signal to stop on (0: none), the same on every process: a signal seen by
        any host stops all of them at the same step, so all save the same step."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def check_train_config(train) -> None:
    """The loop's own settings, checked before any data is loaded."""
    if train.grad_accum < 1:
        raise ConfigError(f"config.train.grad_accum={train.grad_accum} must be >= 1 "
                          "(1 = no accumulation)")
    if train.global_batch_size % train.grad_accum:
        raise ConfigError(
            f"config.train.global_batch_size={train.global_batch_size} must be a "
            f"multiple of config.train.grad_accum={train.grad_accum}")


def run(config, workdir: str, make_task: Callable[[Any], Task]) -> dict:
    """Trains `config` in `workdir`; returns the last logged metrics.

    Raises `Preempted` after saving, on SIGTERM/SIGINT; `UserError`s (config, run
    directory, checkpoint) before anything compiles where possible."""
    check_train_config(config.train)
    run_dir = rundir_lib.RunDir(workdir)
    run_dir.check_usable()  # before loading any data
    with run_dir.lock(enabled=jax.process_index() == 0):
        return _run(config, run_dir, make_task)


def _run(config, run_dir: rundir_lib.RunDir, make_task: Callable[[Any], Task]) -> dict:
    train = config.train
    main = jax.process_index() == 0
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.AXES})
    rules = tuple(tuple(r) for r in config.mesh.rules)
    micro_batch = train.global_batch_size // train.grad_accum
    mesh_lib.check_batch_size(micro_batch, mesh, "config.train.global_batch_size / grad_accum")
    ckpt = checkpoint_lib.Checkpointer(
        run_dir.checkpoints, json.loads(config.to_json_best_effort()),
        every=train.checkpoint_every, keep=train.keep_checkpoints,
    )
    task = None
    try:
        resume = _resume_step(ckpt, config)
        if main:
            run_dir.write_config(config)  # only once the resume checks passed
        # The run's tokenizer is the one in its workdir from the first start on, so a
        # resume never retrains it (or picks up another cache entry). A new run (no
        # checkpoint) replaces a copy left by an earlier attempt.
        resumes_tokenizer = resume is not None and run_dir.tokenizer.exists()
        task = make_task(rundir_lib.with_tokenizer(config, run_dir.tokenizer)
                         if resumes_tokenizer else config)
        if main:
            run_dir.keep_tokenizer(task.tokenizer, replace=resume is None)
        _check_eval_split(task, train)
        return _train(config, run_dir, task, ckpt, resume, mesh, rules)
    finally:
        ckpt.close()
        if task is not None:
            task.close()


def _train(config, run_dir, task: Task, ckpt, resume: Optional[int], mesh, rules) -> dict:
    train = config.train
    schedule = optimizer_lib.learning_rate_schedule(train)
    loss_scale = optimizer_lib.make_loss_scale(train)
    dynamic = isinstance(loss_scale, optimizer_lib.DynamicLossScale)
    batch_sharding = mesh_lib.batch_sharding(mesh)

    first = next(task.train_batches)
    example = global_batch(first, batch_sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx, init, shardings = plan_state(task, train, loss_scale, mesh, rules, example, config.seed)
        if resume is None:
            state = jax.jit(init, out_shardings=shardings)(example)
        else:  # restored below: only the shapes, nothing compiled before the restore
            state = checkpoint_lib.abstract_like(jax.eval_shape(init, example), shardings)
        train_step = jax.jit(
            step_lib.make_train_step(task.model, tx, schedule),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_step = jax.jit(step_lib.make_eval_step(task.model), in_shardings=(shardings.params, batch_sharding))

    start = 0
    pending = [first]  # the batch already drawn, used first unless we restore
    writer = metrics_lib.MetricWriter(run_dir)
    if resume is not None:
        state, data_state, start = ckpt.restore(state, resume)
        task.set_data_state(data_state)
        pending = []
        _set_aside_later_steps(ckpt, run_dir, start)
        dropped = writer.truncate(start)
        logging.info("resumed from %s at step %d%s", ckpt.directory, start,
                     f" (dropped {dropped} metrics rows logged after it)" if dropped else "")
    else:
        writer.truncate(0)  # rows of an earlier attempt that saved no checkpoint
        if task.init_params is not None:
            state = state.replace(params=jax.device_put(task.init_params(state.params), shardings.params))

    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, fp8=task.fp8)
    last: dict = {}
    timer = (time.perf_counter(), start)  # (time, step) of the last log
    progress = tqdm.tqdm(total=train.steps, initial=start, disable=jax.process_index() != 0,
                         desc="train", unit="step", dynamic_ncols=True)
    stop, step = 0, start
    try:
        with _Preemption() as preemption, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for micro in range(start * train.grad_accum, train.steps * train.grad_accum):
                local = pending.pop() if pending else next(task.train_batches)
                state, step_metrics = train_step(state, global_batch(local, batch_sharding))
                if (micro + 1) % train.grad_accum:
                    continue  # inside an accumulation: no update yet
                step = (micro + 1) // train.grad_accum
                progress.update(1)
                ckpt.check()  # a background save failed: stop before training past it
                stop = preemption.agreed()
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
                    ckpt.save(step, state, task.get_data_state(), force=True)
                if stop:
                    break
                if task.eval_batches and train.eval_every and (step % train.eval_every == 0 or is_last):
                    evaluated = _evaluate(eval_step, state.params, task, batch_sharding, train)
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


def _resume_step(ckpt, config) -> Optional[int]:
    """The checkpoint step to resume from (None: a new run), after checking that the
    config may resume it: the model must match; trajectory fields must match unless
    `train.allow_resume_changes`; the data-iterator fields must match."""
    steps = ckpt.finished_steps()
    wanted = config.train.get("restore_step", 0)
    if wanted and wanted not in steps:
        raise ConfigError(f"config.train.restore_step={wanted}: no checkpoint at that step in "
                          f"{ckpt.directory} (steps there: {steps or 'none'})")
    if not steps:
        return None
    step = wanted or steps[-1]
    stored = ckpt.stored_config(step)
    current = json.loads(config.to_json_best_effort())
    ckpt.check_model(stored, step)
    frozen = checkpoint_lib.config_differences(stored, current, checkpoint_lib.DATA_STATE_FIELDS, skip_missing=True)
    if frozen:
        raise ConfigError(
            f"cannot resume {ckpt.directory} step {step} with {'; '.join(frozen)}: the saved "
            "data-iterator state needs the same setting. Set it back (the checkpoint's value "
            "is on the left), or use another --workdir.")
    changes = checkpoint_lib.config_differences(stored, current, checkpoint_lib.TRAJECTORY_FIELDS, skip_missing=True)
    if changes and not config.train.get("allow_resume_changes", False):
        raise ConfigError(
            f"resuming {ckpt.directory} at step {step} with a different training config: "
            f"{'; '.join(changes)} (checkpoint -> now). Restore these, use another --workdir, "
            "or pass --config.train.allow_resume_changes=true to resume with them anyway.")
    for change in changes if jax.process_index() == 0 else ():
        print(f"resuming with a changed config: {change}", file=sys.stderr)
    return step


def _set_aside_later_steps(ckpt, run_dir, step: int) -> None:
    """After restoring an earlier step (`train.restore_step`), moves the later steps out
    of the way (to `skipped_checkpoints/`), so the resumed run can save them anew."""
    later = [s for s in ckpt.finished_steps() if s > step]
    if not later:
        return
    if jax.process_index() == 0:
        for s in later:
            logging.warning("restored step %d: moved checkpoint step %d to %s", step, s,
                            run_dir.set_aside(s))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("set_aside_later_steps")
    ckpt.manager.reload()


def _check_eval_split(task: Task, train) -> None:
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


def plan_state(task: Task, train, loss_scale, mesh, rules, example: dict, seed: int):
    """`(tx, init, shardings)`: the optimizer (its u-μP parts need the abstract
    params), `init(batch) -> TrainState`, and the state's shardings on `mesh` from the
    parameters' logical axes. Call under `jax.set_mesh(mesh)` and the rules."""
    abstract_params = jax.eval_shape(
        lambda b: task.model.init({"params": jax.random.key(0)}, b, deterministic=True)["params"],
        example)
    tx = optimizer_lib.make_optimizer(train, **task.optimizer_parts(abstract_params))
    check_divisible(abstract_params, mesh, rules)
    abstract = jax.eval_shape(functools.partial(_init_boxed, task.model, tx, loss_scale, seed), example)
    init = functools.partial(step_lib.init_state, task.model, tx, loss_scale, seed=seed)
    return tx, init, state_shardings(abstract, mesh, rules)


# The config field behind each logical parameter axis, for the error messages.
_AXIS_FIELDS = {"embed": "config.model.d_model", "mlp": "config.model.mlp_dim",
                "heads": "config.model.num_heads", "kv": "config.model.head_dim",
                "vocab": "config.data.vocab_size", "layers": "config.model.num_layers"}


def check_divisible(abstract_boxed_params: Any, mesh, rules) -> None:
    """`ConfigError` naming the field, its size and the mesh axes, when a parameter
    dimension does not divide over the mesh axes its logical axis maps to (XLA would
    otherwise fail while compiling, with a message about a jit output)."""
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    for path, box in jax.tree_util.tree_leaves_with_path(abstract_boxed_params, is_leaf=is_box):
        if not is_box(box):
            continue
        for dim, logical in zip(box.value.shape, tuple(nn.get_partition_spec(box))):
            axes = nn.logical_to_mesh_axes((logical,), rules)[0] if logical else None
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
            if dim % size:
                sizes = " x ".join(f"config.mesh.{a}={mesh.shape[a]}" for a in axes)
                raise ConfigError(
                    f"{_AXIS_FIELDS.get(logical, logical)}={dim} does not divide over {sizes} "
                    f"(parameter {jax.tree_util.keystr(path)}, axis {logical!r}); choose mesh "
                    f"sizes that divide {dim}, or a {_AXIS_FIELDS.get(logical, logical)} divisible by "
                    f"{size}")


def _init_boxed(model, tx, loss_scale, seed, batch):
    """Like `init_state` but keeps the logical-axis boxes (for shardings)."""
    init_key, rng = jax.random.split(jax.random.key(seed))
    params = model.init({"params": init_key}, batch, deterministic=True)["params"]
    return step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        loss_scale=loss_scale, rng=jax.random.key_data(rng),
    )


def _perf(step_s: float, task: Task, peak: Optional[float]) -> dict:
    perf = {"perf/step_s": step_s, "perf/tokens_per_s": task.tokens_per_batch / step_s}
    if task.flops_per_step:
        tflops = task.flops_per_step / step_s / 1e12
        perf["perf/tflops_per_s"] = tflops
        if peak:
            perf["perf/mfu"] = tflops * 1e12 / (peak * jax.device_count())
    return perf


def _evaluate(eval_step, params, task: Task, sharding, train) -> dict:
    """Means of the eval metrics over `train.eval_batches` batches (or one pass)."""
    totals: dict = {}
    batches = 0
    iterator = task.eval_batches()
    for local in iterator:
        if batches == train.eval_batches:
            break
        for k, v in jax.device_get(eval_step(params, global_batch(local, sharding))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        batches += 1
    getattr(iterator, "close", lambda: None)()
    return {k: v / max(batches, 1) for k, v in totals.items()}


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
