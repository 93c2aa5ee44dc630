"""The training loop: `run(config, workdir)`.

One process per host; every process runs the same program on its shard of the batch.

1. Validate the config (errors name the field, before anything compiles).
2. Mesh from `config.mesh`; data pipeline for this process; model and optimizer.
3. The train state is created directly sharded: `jax.jit(init, out_shardings=...)`
   with shardings from the parameters' logical axes and `config.mesh.rules`.
4. If `WORKDIR/checkpoints` has a checkpoint, restore the state (on this mesh, whatever
   mesh wrote it) and the data iterator, so the run continues exactly where it stopped.
5. Loop: assemble the global batch from per-process batches
   (`jax.make_array_from_process_local_data`), run the jitted, donated step, log every
   `log_every`, evaluate every `eval_every`, checkpoint every `checkpoint_every`.
   SIGTERM saves and exits cleanly; a non-finite loss stops the run with the names of
   the non-finite gradients and keeps the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from unit_scaling.train import checkpoint as checkpoint_lib
from unit_scaling.train import mesh as mesh_lib
from unit_scaling.train import metrics as metrics_lib
from unit_scaling.train import optimizer as optimizer_lib
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


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and exiting after this step")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def run(config, workdir: str, make_task: Callable[[Any], Task]) -> dict:
    """Trains `config` in `workdir`; returns the last logged metrics."""
    train = config.train
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.AXES})
    rules = tuple(tuple(r) for r in config.mesh.rules)
    micro_batch = train.global_batch_size // train.grad_accum
    mesh_lib.check_batch_size(micro_batch, mesh, "config.train.global_batch_size / grad_accum")
    task = make_task(config)
    schedule = optimizer_lib.learning_rate_schedule(train)
    loss_scale = optimizer_lib.make_loss_scale(train)
    dynamic = isinstance(loss_scale, optimizer_lib.DynamicLossScale)
    batch_sharding = mesh_lib.batch_sharding(mesh)

    first = next(task.train_batches)
    example = global_batch(first, batch_sharding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        tx, init, shardings = plan_state(task, train, loss_scale, mesh, rules, example, config.seed)
        state = jax.jit(init, out_shardings=shardings)(example)
        train_step = jax.jit(
            step_lib.make_train_step(task.model, tx, schedule),
            in_shardings=(shardings, batch_sharding),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_step = jax.jit(step_lib.make_eval_step(task.model), in_shardings=(shardings.params, batch_sharding))

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    ckpt = checkpoint_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), json.loads(config.to_json_best_effort()),
        every=train.checkpoint_every, keep=train.keep_checkpoints,
    )
    start = 0
    pending = [first]  # the batch already drawn, used first unless we restore
    if ckpt.latest_step() is not None:
        state, data_state, start = ckpt.restore(checkpoint_lib.abstract_like(state, shardings))
        task.set_data_state(data_state)
        pending = []
        logging.info("resumed from %s at step %d", ckpt.directory, start)
    elif task.init_params is not None:
        state = state.replace(params=jax.device_put(task.init_params(state.params), shardings.params))

    writer = metrics_lib.MetricWriter(workdir)
    peak = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, fp8=task.fp8)
    last: dict = {}
    timer = (time.perf_counter(), start)  # (time, step) of the last log
    progress = tqdm.tqdm(total=train.steps, initial=start, disable=jax.process_index() != 0,
                         desc="train", unit="step", dynamic_ncols=True)
    try:
        with _Preemption() as preemption, jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for micro in range(start * train.grad_accum, train.steps * train.grad_accum):
                local = pending.pop() if pending else next(task.train_batches)
                state, step_metrics = train_step(state, global_batch(local, batch_sharding))
                if (micro + 1) % train.grad_accum:
                    continue  # inside an accumulation: no update yet
                step = (micro + 1) // train.grad_accum
                progress.update(1)
                is_last = step == train.steps
                _maybe_profile(train, step, workdir)
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
                if task.eval_batches and train.eval_every and (step % train.eval_every == 0 or is_last):
                    evaluated = _evaluate(eval_step, state.params, task, batch_sharding, train)
                    evaluated.update(task.eval_constants)
                    writer.write(step, evaluated)
                    last.update(evaluated)
                if ckpt.should_save(step) or is_last or preemption.requested:
                    _check_finite(jax.device_get(step_metrics), ckpt, dynamic)  # never save NaNs
                    ckpt.save(step, state, task.get_data_state(), force=True)
                if preemption.requested:
                    logging.warning("saved step %d after SIGTERM; exiting", step)
                    break
    finally:
        progress.close()
        ckpt.close()
        writer.close()
        task.close()
    return last


def _maybe_profile(train, step: int, workdir: str) -> None:
    """A profiler trace of `profile_steps` steps after step `profile_start` (0: off)."""
    if not train.profile_start:
        return
    if step == train.profile_start:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
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
    abstract = jax.eval_shape(functools.partial(_init_boxed, task.model, tx, loss_scale, seed), example)
    init = functools.partial(step_lib.init_state, task.model, tx, loss_scale, seed=seed)
    return tx, init, state_shardings(abstract, mesh, rules)


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
