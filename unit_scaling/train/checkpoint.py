"""Checkpoints with orbax: async, every N steps, keep the last K, restorable on another
mesh, with the data iterator state and the config.

Each checkpoint step holds three items: `state` (the sharded train state, restored into
an abstract target whose shardings may come from a different mesh), `data` (the input
pipeline's iterator state, JSON) and `config` (the run's config, JSON). Restoring
checks the stored config's model-defining fields against the current ones first and
fails with a message naming the differing fields, before touching the state.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import jax
import orbax.checkpoint as ocp

# The config fields that define the parameter tree: a checkpoint only restores into a
# run whose fields agree.
MODEL_FIELDS = ("model", "param", "data.vocab_size")


class CheckpointMismatchError(ValueError):
    """The checkpoint was written by a run with another model."""


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def config_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], fields: Sequence[str] = MODEL_FIELDS
) -> list[str]:
    """`field: stored -> current` for every model-defining field that differs."""
    diffs = []
    for field in fields:
        a, b = _get(stored, field), _get(current, field)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys = sorted(set(a) | set(b))
            diffs += [
                f"{field}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)
            ]
        elif a != b:
            diffs.append(f"{field}: {a!r} -> {b!r}")
    return diffs


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` for train states.

    Args:
      directory: where step directories go (`WORKDIR/checkpoints`).
      config: the run's config as a JSON-able dict; stored with every checkpoint.
      every: save when `step % every == 0` (0: only forced saves).
      keep: how many recent checkpoints to keep.
    """

    def __init__(self, directory: str, config: Mapping[str, Any], every: int, keep: int):
        if keep < 1:
            raise ValueError(f"config.train.keep_checkpoints={keep} must be >= 1")
        self.directory = os.path.abspath(directory)
        self.config = dict(config)
        self.every = every
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=True
            ),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: Any = None, force: bool = False) -> bool:
        """Starts an async save at `step` if due (or `force`); returns whether it did."""
        if not (force or self.should_save(step)) or step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                config=ocp.args.JsonSave(self.config),
            ),
            force=True,
        )

    def stored_config(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return dict(restored["config"])

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, int]:
        """Restores `(state, data_state, step)` into `abstract_state`'s shapes, dtypes
        and shardings (a pytree of `jax.ShapeDtypeStruct` with shardings, e.g. for
        another mesh). Raises `CheckpointMismatchError` if the model differs."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        diffs = config_differences(self.stored_config(step), self.config)
        if diffs:
            raise CheckpointMismatchError(
                f"the checkpoint at {self.directory} step {step} was written by another "
                f"model ({'; '.join(diffs)}). Use a new --workdir, or restore the config "
                "it was trained with."
            )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s of `tree` (arrays or abstract) with the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
