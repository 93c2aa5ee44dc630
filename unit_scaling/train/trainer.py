"""From a config to what the loop runs: `build(config) -> Trainer`.

`build` makes the mesh from `config.mesh`, the task (model and data) with
`tasks.make_task`, draws the first batch, and from the model's abstract parameters
builds the optimizer (`optimizer.from_config`), the train state's shardings (from the
parameters' logical axes and `config.mesh.rules`) and the jitted `init`, `train_step`
and `eval_step`. Nothing is compiled or allocated yet: `init(batch)` creates the state
directly sharded, or a checkpoint is restored into `abstract_state()`.

`loop.run`, `benchmarks/speed.py` and the tests build their steps here, so they all
train the same program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from unit_scaling.errors import ConfigError
from unit_scaling.train import checkpoint as checkpoint_lib
from unit_scaling.train import mesh as mesh_lib
from unit_scaling.train import optimizer as optimizer_lib
from unit_scaling.train import step as step_lib
from unit_scaling.train import tasks as tasks_lib


@dataclasses.dataclass
class Trainer:
    """Everything `loop.run` needs besides the run directory (made by `build`).

    init: batch -> `TrainState`, jitted onto `shardings`.
    train_step: (state, batch) -> (state, metrics), jitted, donating the state.
    eval_step: (params, batch) -> metrics, jitted.
    first: the first local batch, already drawn from `task.train_batches` (for the
      shapes); a new run trains on it first.
    Run `init`, the steps and `global_batch` under `with trainer.context():`.
    """

    mesh: Mesh
    rules: tuple
    task: tasks_lib.Task
    optimizer: optax.GradientTransformation
    loss_scale: Any  # jmp.LossScale
    shardings: Any  # the TrainState's NamedShardings
    init: Callable
    train_step: Callable
    eval_step: Callable
    batch_sharding: NamedSharding
    first: dict

    def context(self) -> contextlib.ExitStack:
        """The mesh and the logical-axis rules, for tracing and running the steps."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    def global_batch(self, local: dict) -> dict:
        return global_batch(local, self.batch_sharding)

    def abstract_state(self) -> Any:
        """The state's shapes, dtypes and shardings (to restore a checkpoint into)."""
        with self.context():
            abstract = jax.eval_shape(self.init, self.global_batch(self.first))
        return checkpoint_lib.abstract_like(abstract, self.shardings)

    def close(self) -> None:
        self.task.close()


def check_train_config(train) -> None:
    """The loop's own settings, checked before any data is loaded (the only check of
    them; `tasks.validate` checks the task's)."""
    for field in ("steps", "global_batch_size", "log_every", "eval_every", "checkpoint_every"):
        if train[field] < 0:
            raise ConfigError(f"config.train.{field}={train[field]} must be >= 0")
    if train.preemption_check_every < 1:
        raise ConfigError(f"config.train.preemption_check_every={train.preemption_check_every} "
                          "must be >= 1 (steps between the hosts' agreement on a stop signal)")
    if train.steps == 0 or train.global_batch_size == 0:
        raise ConfigError("config.train.steps and global_batch_size must be positive")
    if train.grad_accum < 1:
        raise ConfigError(f"config.train.grad_accum={train.grad_accum} must be >= 1 "
                          "(1 = no accumulation)")
    if train.global_batch_size % train.grad_accum:
        raise ConfigError(
            f"config.train.global_batch_size={train.global_batch_size} must be a "
            f"multiple of config.train.grad_accum={train.grad_accum}")


def build(config, make_task: Optional[Callable[[Any], tasks_lib.Task]] = None,
          devices: Optional[Sequence[jax.Device]] = None) -> Trainer:
    """The `Trainer` for `config` on `devices` (default: all, across hosts).
    `make_task(config)` replaces `tasks.make_task` (e.g. a toy model in the tests)."""
    train = config.train
    check_train_config(train)
    optimizer_lib.check_update_numerics(train, config.model.get("param_dtype"))
    mesh = mesh_lib.make_mesh({axis: config.mesh[axis] for axis in mesh_lib.AXES}, devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    mesh_lib.check_batch_size(train.global_batch_size // train.grad_accum, mesh,
                              "config.train.global_batch_size / grad_accum")
    task = (make_task or tasks_lib.make_task)(config)
    try:
        batch_sharding = mesh_lib.batch_sharding(mesh)
        first = next(task.train_batches)
        example = global_batch(first, batch_sharding)
        loss_scale = optimizer_lib.make_loss_scale(train)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            abstract_params = jax.eval_shape(
                lambda b: step_lib.init_variables(task.model, b, config.seed)[0]["params"],
                example)
            tx = optimizer_lib.from_config(config, abstract_params)
            check_divisible(abstract_params, mesh, rules)
            abstract = jax.eval_shape(
                functools.partial(step_lib.init_state, task.model, tx, loss_scale,
                                  seed=config.seed, boxed=True), example)
            shardings = state_shardings(abstract, mesh, rules)
    except BaseException:
        task.close()
        raise
    init = functools.partial(step_lib.init_state, task.model, tx, loss_scale, seed=config.seed)
    schedule = optimizer_lib.learning_rate_schedule(train)
    return Trainer(
        mesh=mesh, rules=rules, task=task, optimizer=tx, loss_scale=loss_scale,
        shardings=shardings,
        init=jax.jit(init, out_shardings=shardings),
        train_step=jax.jit(step_lib.make_train_step(task.model, tx, schedule,
                                                    train.get("param_rounding", "nearest"),
                                                    per_tensor_rms=bool(train.rms_every)),
                           in_shardings=(shardings, batch_sharding),
                           out_shardings=(shardings, None), donate_argnums=0),
        eval_step=jax.jit(step_lib.make_eval_step(task.model),
                          in_shardings=(shardings.params, batch_sharding)),
        batch_sharding=batch_sharding, first=first,
    )


def global_batch(local: dict, sharding) -> dict:
    """Global arrays sharded over the batch axes, from this process's batch."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def state_shardings(abstract_boxed_state: Any, mesh, rules) -> Any:
    """NamedShardings for every leaf of the (unboxed) state, from logical axes."""
    specs = nn.get_partition_spec(abstract_boxed_state)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


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


def evaluate(trainer: Trainer, params, max_batches: int) -> dict:
    """Means of the eval metrics over `max_batches` batches of a fresh eval iterator
    (or one pass, if shorter)."""
    totals: dict = {}
    batches = 0
    iterator: Iterator[dict] = trainer.task.eval_batches()
    for local in iterator:
        if batches == max_batches:
            break
        for k, v in jax.device_get(trainer.eval_step(params, trainer.global_batch(local))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        batches += 1
    getattr(iterator, "close", lambda: None)()
    return {k: v / max(batches, 1) for k, v in totals.items()}
