"""`RunDir`: the one place that knows the layout of a training run's directory.

    WORKDIR/config.json        the run's config (written once the resume checks pass)
    WORKDIR/metrics.jsonl      one JSON object per logged step, each step once
    WORKDIR/checkpoints/STEP   orbax checkpoints (state, data iterator, config)
    WORKDIR/skipped_checkpoints/STEP  steps set aside by `train.restore_step`
    WORKDIR/tensorboard/       TensorBoard event files
    WORKDIR/profile/           profiler traces
    WORKDIR/tokenizer.model    the run's sentencepiece model
    WORKDIR/lock               host and pid of the run using the directory
    WORKDIR/train.log          a sweep's run (experiments/sweep.py): its console output
    WORKDIR/failed             a sweep's run that exited non-zero: its exit status

Every path goes through `etils.epath` (which orbax uses too), so a workdir may be a
local path or a URL such as `gs://bucket/run` (or `file:///path`); local paths are
made absolute.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import Any, Iterator, Optional

import ml_collections
from etils import epath

from unit_scaling.errors import InputError


class RunDirError(InputError):
    """The run directory cannot be used (missing, a file, not writable, in use)."""


class RunDir:
    """A training run's directory (see the module docstring for the layout)."""

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    CHECKPOINTS = "checkpoints"
    SKIPPED = "skipped_checkpoints"
    TENSORBOARD = "tensorboard"
    PROFILE = "profile"
    TOKENIZER = "tokenizer.model"
    LOCK = "lock"
    LOG = "train.log"
    FAILED = "failed"

    def __init__(self, path: "str | os.PathLike | RunDir"):
        if isinstance(path, RunDir):
            path = path.path
        path = os.fspath(path)
        if path.startswith("file://"):  # a local path written as a URL
            path = path[len("file://"):]
        self.remote = "://" in path
        self.path = epath.Path(path if self.remote else os.path.abspath(path))

    def __str__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self)!r})"

    # -------------------------------------------------------------------- layout
    @property
    def config_path(self) -> epath.Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> epath.Path:
        return self.path / self.METRICS

    @property
    def checkpoints(self) -> epath.Path:
        return self.path / self.CHECKPOINTS

    @property
    def skipped(self) -> epath.Path:
        return self.path / self.SKIPPED

    @property
    def tensorboard(self) -> epath.Path:
        return self.path / self.TENSORBOARD

    @property
    def profile(self) -> epath.Path:
        return self.path / self.PROFILE

    @property
    def tokenizer(self) -> epath.Path:
        return self.path / self.TOKENIZER

    @property
    def lock_path(self) -> epath.Path:
        return self.path / self.LOCK

    @property
    def log_path(self) -> epath.Path:
        return self.path / self.LOG

    @property
    def failed_path(self) -> epath.Path:
        return self.path / self.FAILED

    # -------------------------------------------------------------- start-up checks
    def check_usable(self) -> None:
        """Creates the directory if needed; `RunDirError` if it is a file or cannot be
        written (checked with a probe file, so read-only mounts are caught too)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--workdir {self} is a file, not a directory; pass a directory")
        probe = self.path / f".probe-{socket.gethostname()}-{os.getpid()}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(
                f"--workdir {self} is not writable ({e.strerror or e}); pass a directory you "
                "can write to") from e

    def free_space(self) -> str:
        """Free space where the run writes, e.g. "12.3 GB free" ("unknown" if remote)."""
        if self.remote:
            return "free space unknown (remote storage)"
        path = os.fspath(self.path)
        while path and not os.path.exists(path):
            path = os.path.dirname(path)
        try:
            return f"{shutil.disk_usage(path).free / 1e9:.3g} GB free"
        except OSError:
            return "free space unknown"

    # ------------------------------------------------------------------- config
    def has_config(self) -> bool:
        return self.config_path.exists()

    def read_config(self) -> ml_collections.ConfigDict:
        """The config the run wrote; `RunDirError` if there is none."""
        if not self.path.is_dir():
            raise RunDirError(f"--workdir {self} does not exist; pass the --workdir of a train.py run")
        if not self.has_config():
            raise RunDirError(f"--workdir {self} has no {self.CONFIG}: not a train.py run directory")
        try:
            return ml_collections.ConfigDict(json.loads(self.config_path.read_text()))
        except ValueError as e:
            raise RunDirError(f"{self.config_path} is not valid JSON ({e})") from e

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        self.config_path.write_text(config.to_json_best_effort(indent=2))

    # ------------------------------------------------------------------ metrics
    def read_metrics(self) -> list[dict]:
        """The rows of `metrics.jsonl` ([] if there is none)."""
        return read_jsonl(self.metrics_path)

    def append_metrics(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, last_step: int) -> int:
        """Drops the rows after `last_step` (logged after the checkpoint a resumed run
        restarts from, so they would appear twice); returns how many were dropped."""
        rows = self.read_metrics()
        kept = [r for r in rows if r.get("step", 0) <= last_step]
        if len(kept) < len(rows):
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return len(rows) - len(kept)

    # --------------------------------------------------------- a sweep's run
    def failed(self) -> bool:
        """Whether a sweep marked the run failed (it exited non-zero)."""
        return self.failed_path.exists()

    def mark_failed(self, returncode: int) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.failed_path.write_text(f"exit status {returncode}\n")

    def diverged(self) -> bool:
        """Whether the run's log shows it stopped on a non-finite loss."""
        if not self.log_path.exists():
            return False
        return "NonFiniteLossError" in self.log_path.read_bytes().decode(errors="replace")

    # -------------------------------------------------------------- checkpoints
    def checkpoint_steps(self) -> list[int]:
        """The steps with a finished checkpoint directory, ascending."""
        return step_dirs(self.checkpoints)

    def set_aside(self, step: int) -> epath.Path:
        """Moves checkpoint `step` to `skipped_checkpoints/STEP` (kept, not restored)."""
        target = self.skipped / str(step)
        self.skipped.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = self.skipped / f"{step}.{int(time.time())}"
        (self.checkpoints / str(step)).rename(target)
        return target

    def restore_params(self, step: Optional[int] = None, abstract_params: Any = None) -> tuple[Any, int]:
        """`(params, step)`: only the parameters of checkpoint `step` (default: the
        latest), as stored, or into the shapes, dtypes and shardings of
        `abstract_params` (`jax.ShapeDtypeStruct`s) when given; the optimizer state is
        not read. `RunDirError` names the step and the reason when it cannot."""
        import orbax.checkpoint as ocp

        steps = self.checkpoint_steps()
        if not steps:
            raise RunDirError(f"--workdir {self} has no checkpoint in {self.checkpoints}; train "
                              "it first (a run saves at checkpoint_every and at its last step)")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise RunDirError(f"--workdir {self}: no checkpoint at step {step} (steps: {steps})")
        if abstract_params is None:
            args = ocp.args.StandardRestore()
        else:
            target = {"params": abstract_params}
            args = ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)
        with ocp.CheckpointManager(self.checkpoints, item_names=("state", "data", "config")) as mngr:
            try:
                restored = mngr.restore(step, args=ocp.args.Composite(state=args))
            except Exception as e:  # orbax/tensorstore raise many types; name the step
                raise RunDirError(
                    f"--workdir {self} step {step}: the parameters cannot be restored "
                    f"({short_reason(e)})") from e
        return restored["state"]["params"], step

    # ---------------------------------------------------------------- tokenizer
    def keep_tokenizer(self, tokenizer: Any, replace: bool = False) -> bool:
        """Copies the run's tokenizer (an object with `model_proto`) to
        `WORKDIR/tokenizer.model` unless one is there (or `replace`); returns whether
        it wrote."""
        if tokenizer is None or (self.tokenizer.exists() and not replace):
            return False
        self.tokenizer.write_bytes(tokenizer.model_proto)
        return True

    # --------------------------------------------------------------------- lock
    @contextlib.contextmanager
    def lock(self, enabled: bool = True) -> Iterator[None]:
        """Holds `WORKDIR/lock` (host, pid, start time) while the run uses the directory.

        A second run on the directory is refused, naming the holder. A lock left by a
        dead process on this host is reported and replaced; one from another host cannot
        be checked, and the message says to delete it if that run is gone."""
        if not enabled:
            yield
            return
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._take_lock(me)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(self.lock_path.read_text()).get("pid") == me["pid"]:
                    self.lock_path.unlink()

    def _take_lock(self, me: dict) -> None:
        if self.lock_path.exists():
            try:
                holder = json.loads(self.lock_path.read_text())
            except (OSError, ValueError):
                holder = {}
            host, pid = holder.get("host"), holder.get("pid")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            if host == me["host"] and pid != me["pid"] and not _alive(pid):
                logging.warning("%s: stale lock of process %s on %s (started %s, no longer "
                                "running); taking it over", self.lock_path, pid, host, since)
                self.lock_path.unlink()
            elif host == me["host"] or not host:
                raise self._in_use(pid, host, since)
            else:
                raise RunDirError(
                    f"--workdir {self} is in use by process {pid} on host {host} (since "
                    f"{since}). If that run is gone, delete {self.lock_path} and rerun; "
                    "otherwise pass another --workdir")
        if self.remote:
            self.lock_path.write_text(json.dumps(me))
            return
        try:  # O_EXCL: of two runs starting together, exactly one creates the lock
            fd = os.open(os.fspath(self.lock_path), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            raise self._in_use("?", "this host", "just now") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)

    def _in_use(self, pid, host, since) -> RunDirError:
        return RunDirError(
            f"--workdir {self} is in use by process {pid} on {host} (since {since}); "
            "wait for it to finish, stop it, or pass another --workdir")


def with_tokenizer(config: ml_collections.ConfigDict, path: Any) -> ml_collections.ConfigDict:
    """A copy of `config` whose `data.tokenizer_path` is `path` (the data pipelines
    then load that model instead of training one)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.tokenizer_path = os.fspath(path)
    return config


def read_jsonl(path: "str | os.PathLike") -> list[dict]:
    """The JSON objects of a JSON-lines file, one a line ([] if there is no file)."""
    path = epath.Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_dirs(directory: epath.Path) -> list[int]:
    """The steps with a finished checkpoint in an orbax directory, ascending (a save in
    progress lives in `STEP.orbax-checkpoint-tmp-*` and is not counted)."""
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def short_reason(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (orbax and tensorstore errors run to
    hundreds of lines), with its type."""
    message = str(e).strip()
    text = message.splitlines()[0] if message else ""
    # The cause (e.g. "File too large") is usually at the end of a long message.
    text = text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"
    # tensorstore names the OS error as "...: File too large [os_error_code=27]", not
    # always at the end: keep it whatever was cut.
    chain, link = [], e
    while link is not None and len(chain) < 8:  # and in the exceptions behind this one
        chain.append(str(link))
        link = link.__cause__ or link.__context__
    # The error's tensorstore spec (brackets, JSON) may sit between the two.
    for cause in re.findall(r":\s*([^:\[\]]+?)\s*(?:\[tensorstore_spec='.*?'\]\s*)?"
                            r"\[os_error_code", "\n".join(chain)):
        if cause not in text:
            text += f" [{cause}]"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
