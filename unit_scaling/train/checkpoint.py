"""Checkpoints with orbax: async, every N steps, keep the last K, restorable on another
mesh, with the data iterator state and the config.

Each checkpoint step holds three items: `state` (the sharded train state, restored into
an abstract target whose shardings may come from a different mesh), `data` (the input
pipeline's iterator state, JSON) and `config` (the run's config, JSON). Restoring
checks the stored config's model-defining fields against the current ones first and
fails with a message naming the differing fields, before touching the state.

A save that fails (disk full, permissions), now or in the background, raises
`CheckpointSaveError` naming the directory and its free space, once the pending save has
finished; the checkpoints saved before stay intact (orbax writes a step to a temporary
directory and renames it only when complete). A step that cannot be restored raises
`CheckpointRestoreError` naming the step, the reason in one line, and the fix
(`config.train.restore_step`), instead of a tensorstore traceback.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Mapping, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

from unit_scaling.errors import ConfigError, InputError, UserError
from unit_scaling.train.rundir import RunDir, short_reason, step_dirs

# The config fields that define the parameter tree: a checkpoint only restores into a
# run whose fields agree.
MODEL_FIELDS = ("model", "param", "data.vocab_size")

# Fields that change the training trajectory: a resumed run refuses a change of these
# unless `config.train.allow_resume_changes` (then it prints them).
TRAJECTORY_FIELDS = (
    "seed", "train.steps", "train.lr", "train.schedule", "train.warmup_steps",
    "train.final_lr_fraction", "train.global_batch_size", "train.grad_accum",
    "train.optimizer", "train.weight_decay", "train.loss_scale", "train.moment_dtype",
    "train.param_rounding", "data.corpus",
    "data.tokenizer", "data.tokenizer_path", "data.seq_len", "data.eval_fraction",
    "data.eval_split",
)
# Fields whose change makes the saved data-iterator state unusable: always refused.
DATA_STATE_FIELDS = ("data.num_workers",)


class CheckpointMismatchError(ConfigError):
    """The checkpoint was written by a run with another model."""


class CheckpointSaveError(UserError, OSError):
    """A checkpoint could not be written; the run stopped, earlier checkpoints intact."""


class CheckpointRestoreError(InputError):
    """A checkpoint step cannot be restored (corrupt or incomplete files)."""


_MISSING = object()


def _get(tree: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, Mapping) or key not in tree:
            return default
        tree = tree[key]
    return tree


def config_differences(
    stored: Mapping[str, Any], current: Mapping[str, Any], fields: Sequence[str] = MODEL_FIELDS,
    skip_missing: bool = False,
) -> list[str]:
    """`field: stored -> current` for every field of `fields` (default: the
    model-defining ones) that differs. `skip_missing`: ignore a field absent from either
    config (e.g. one added to the configs after the checkpoint was written)."""
    diffs = []
    for field in fields:
        a, b = _get(stored, field, _MISSING), _get(current, field, _MISSING)
        if a is _MISSING or b is _MISSING:
            if skip_missing:
                continue
            a, b = (None if v is _MISSING else v for v in (a, b))
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

    def __init__(self, directory: "str | epath.Path", config: Mapping[str, Any], every: int, keep: int):
        if keep < 1:
            raise ConfigError(f"config.train.keep_checkpoints={keep} must be >= 1")
        self.directory = RunDir(directory).path  # absolute, or a URL such as gs://...
        self.run_dir = RunDir(self.directory.parent)
        self.failed = False
        self.pending: Optional[int] = None  # the step of the latest save started
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
        """Starts an async save at `step` if due (or `force`); returns whether it did.
        Raises `CheckpointSaveError` if this save, or an earlier one still finishing in
        the background, failed."""
        if not (force or self.should_save(step)) or step in self.manager.all_steps():
            return False
        self.wait()  # the previous save first (orbax would wait too): errors name its step
        try:
            self.pending = step
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state if data_state is not None else {}),
                    config=ocp.args.JsonSave(self.config),
                ),
                force=True,
            )
        except Exception as e:  # OSError from the filesystem, or wrapped by orbax
            raise self._save_error(step, e) from e

    def check(self) -> None:
        """Raises `CheckpointSaveError` if a background save failed (cheap: no wait)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_error(self.pending, e) from e

    def _save_error(self, step: Optional[int], e: BaseException) -> CheckpointSaveError:
        self.failed = True
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()  # let a pending save end before we report
        saved = self.finished_steps()
        kept = (f"the last saved checkpoint, step {saved[-1]}, is intact" if saved
                else "no checkpoint had been saved yet")
        what = f"step {step}" if step is not None else "a checkpoint"
        return CheckpointSaveError(
            f"could not save {what} in {self.directory} ({short_reason(e)}); "
            f"{self.run_dir.free_space()} there. The run stopped and {kept}. Free space "
            "(or fix the permissions) and rerun the same command to resume.")

    def finished_steps(self) -> list[int]:
        """The steps whose checkpoint is complete on disk (what a restart sees)."""
        return step_dirs(self.directory)

    def stored_config(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except Exception as e:
            raise self.restore_error(step, e) from e
        if restored["config"] is None:
            raise self.restore_error(step, FileNotFoundError("its config item is missing"))
        return dict(restored["config"])

    def check_model(self, stored: Mapping[str, Any], step: int) -> None:
        """`CheckpointMismatchError` naming the fields if `stored` (the config saved at
        `step`) defines another model than this run's config."""
        diffs = config_differences(stored, self.config)
        if diffs:
            raise CheckpointMismatchError(
                f"the checkpoint at {self.directory} step {step} was written by another "
                f"model ({'; '.join(diffs)}). Use a new --workdir, or restore the config "
                "it was trained with."
            )

    def restore_error(self, step: int, e: BaseException) -> CheckpointRestoreError:
        """The error for an unrestorable `step`: the reason in a line, and the fix."""
        earlier = [s for s in self.finished_steps() if s < step]
        fix = (f"To resume from step {earlier[-1]}, rerun with "
               f"--config.train.restore_step={earlier[-1]} (step {step} and any later ones are "
               f"moved to {self.run_dir.skipped}); or start over with another --workdir."
               if earlier else "No earlier checkpoint exists: start over with another --workdir "
               f"(or delete {self.directory}).")
        return CheckpointRestoreError(
            f"checkpoint step {step} in {self.directory} cannot be restored "
            f"({short_reason(e)}). {fix}")

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, Any, int]:
        """Restores `(state, data_state, step)` into `abstract_state`'s shapes, dtypes
        and shardings (a pytree of `jax.ShapeDtypeStruct` with shardings, e.g. for
        another mesh). Raises `CheckpointMismatchError` if the model differs."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise InputError(f"no checkpoint in {self.directory}")
        self.check_model(self.stored_config(step), step)
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:
            raise self.restore_error(step, e) from e
        return restored["state"], restored["data"], step

    def resume_step(self) -> Optional[int]:
        """The step to resume from (None: a new run): `train.restore_step`, else the
        latest. Checks first that this run's config may resume it: the model must match;
        the data-iterator fields must match; trajectory fields must match unless
        `train.allow_resume_changes` (then the changes are printed)."""
        steps = self.finished_steps()
        train = self.config.get("train", {})
        wanted = train.get("restore_step", 0)
        if wanted and wanted not in steps:
            raise ConfigError(f"config.train.restore_step={wanted}: no checkpoint at that step in "
                              f"{self.directory} (steps there: {steps or 'none'})")
        if not steps:
            return None
        step = wanted or steps[-1]
        stored = self.stored_config(step)
        self.check_model(stored, step)
        frozen = config_differences(stored, self.config, DATA_STATE_FIELDS, skip_missing=True)
        if frozen:
            raise ConfigError(
                f"cannot resume {self.directory} step {step} with {'; '.join(frozen)}: the saved "
                "data-iterator state needs the same setting. Set it back (the checkpoint's value "
                "is on the left), or use another --workdir.")
        changes = config_differences(stored, self.config, TRAJECTORY_FIELDS, skip_missing=True)
        if changes and not train.get("allow_resume_changes", False):
            raise ConfigError(
                f"resuming {self.directory} at step {step} with a different training config: "
                f"{'; '.join(changes)} (checkpoint -> now). Restore these, use another --workdir, "
                "or pass --config.train.allow_resume_changes=true to resume with them anyway.")
        for change in changes if jax.process_index() == 0 else ():
            print(f"resuming with a changed config: {change}", file=sys.stderr)
        return step

    def set_aside_after(self, step: int) -> None:
        """After restoring an earlier step (`train.restore_step`), moves the later steps
        out of the way (to `skipped_checkpoints/`), so the resumed run can save them anew."""
        later = [s for s in self.finished_steps() if s > step]
        if not later:
            return
        if jax.process_index() == 0:
            for s in later:
                logging.warning("restored step %d: moved checkpoint step %d to %s", step, s,
                                self.run_dir.set_aside(s))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("set_aside_later_steps")
        self.manager.reload()

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(self.pending, e) from e

    def close(self) -> None:
        """Waits for the pending save, then releases the manager. After a reported save
        error, the same error is not raised a second time."""
        reported = self.failed
        try:
            self.wait()
        except CheckpointSaveError:
            if not reported:
                raise
        finally:
            with contextlib.suppress(Exception):
                self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """`ShapeDtypeStruct`s of `tree` (arrays or abstract) with the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
