r"""A small sweep runner over `train.py`: the same config files, a grid of overrides.

  python -m experiments.sweep --config configs/causal_lm.py:tiny \
      --grid param=sp,umup --grid config.train.lr=1e-3,3e-3,1e-2 \
      --workdir runs/lr_sweep [--print] [-- --config.train.steps=200]

Each `--grid KEY=V1,V2,...` is one axis. A KEY starting with `config.` becomes a flag
override (`--config.train.lr=3e-3`); any other KEY joins the config argument
(`configs/causal_lm.py:tiny,param=umup`). Each point of the grid trains in its own
`WORKDIR/KEY=V,...` directory; points that already finished are skipped, so an
interrupted sweep resumes. `--print` prints one command per line instead (to submit
to a cluster), and arguments after `--` are passed to every run.

Values that must change together (a width: `d_model`, `num_heads`, `mlp_dim`) are
given as explicit points: each `--point KEY=V,KEY=V,...` is one point, and the grid
(if any) is crossed with the list of points. `--keep_going` records a failed run
(e.g. a learning rate that diverges) in `WORKDIR/RUN/failed` and goes on with the
next point; a resumed sweep skips it. `--in_process` runs each command as
`train.main` in the sweep's own process (the same flags; saves the imports of every
run, which dominate short runs on a CPU). Scripts use `run_points` directly, and
`collect`, `read_metrics`, `tail_mean` and `optimum` to read the results back.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

from unit_scaling.train.rundir import RunDir, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_grid(axes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """`["param=sp,umup", ...]` -> `[("param", ["sp", "umup"]), ...]`."""
    grid = []
    for axis in axes:
        key, sep, values = axis.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--grid {axis!r}: expected KEY=V1,V2,...")
        grid.append((key, values.split(",")))
    return grid


def points(grid: list[tuple[str, list[str]]]) -> Iterable[dict[str, str]]:
    keys = [k for k, _ in grid]
    for values in itertools.product(*(v for _, v in grid)):
        yield dict(zip(keys, values))


def parse_point(spec: str) -> dict[str, str]:
    """`"config.model.d_model=256,config.model.num_heads=8"` -> one point (a dict)."""
    point = {}
    for item in spec.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key or not value or "," in value:
            raise ValueError(f"--point {spec!r}: expected KEY=V,KEY=V,...")
        point[key] = value
    return point


def cross(explicit: Sequence[dict[str, str]], grid: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """Every explicit point combined with every grid point (either may be empty)."""
    grid_points = list(points(grid))
    return [{**p, **g} for p in (explicit or [{}]) for g in grid_points]


def run_name(point: dict[str, str]) -> str:
    return ",".join(f"{k.removeprefix('config.')}={v}" for k, v in point.items()) or "default"


def split_train_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(own, extra)`: an experiment's own flags, and the `train.py` flags after `--`
    that it passes to every run."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def command(config: str, point: dict[str, str], workdir: str, extra: Sequence[str]) -> list[str]:
    """The `train.py` command line of one grid point."""
    arg_items = [f"{k}={v}" for k, v in point.items() if not k.startswith("config.")]
    config_arg = config + ("," if ":" in config else ":") + ",".join(arg_items) if arg_items else config
    overrides = [f"--{k}={v}" for k, v in point.items() if k.startswith("config.")]
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config_arg}",
            f"--workdir={workdir}", *overrides, *extra]


def failed(workdir: str) -> bool:
    """Whether the run in `workdir` failed under `keep_going` (e.g. diverged)."""
    return RunDir(workdir).failed()


def finished(workdir: str) -> bool:
    """Whether the run in `workdir` logged its last step."""
    run = RunDir(workdir)
    if not (run.metrics_path.exists() and run.has_config()):
        return False
    steps = run.read_config().train.steps
    return any(row.get("step") == steps for row in run.read_metrics())


def collect(sweep_dir: str) -> list[dict]:
    """One row per run: its grid point (from the directory name), whether it finished
    or failed, and its last metrics (each key's last logged value)."""
    rows = []
    for name in sorted(os.listdir(sweep_dir)):
        workdir = os.path.join(sweep_dir, name)
        rows_logged = RunDir(workdir).read_metrics()
        if not (rows_logged or failed(workdir)):
            continue
        point = dict(item.split("=", 1) for item in name.split(",") if "=" in item)
        last: dict = {}
        for row in rows_logged:
            last.update(row)
        rows.append({"run": name, **point, "finished": finished(workdir),
                     "failed": failed(workdir), **last})
    return rows


def run_points(config: str, todo: Iterable[dict[str, str]], sweep_dir: str,
               extra: Sequence[str] = (), print_only: bool = False,
               keep_going: bool = False, log_name: str | None = None,
               in_process: bool = False) -> list[list[str]]:
    """Trains (or with `print_only` prints) each point in `sweep_dir/run_name(point)`;
    returns the commands. Finished points are skipped. With `keep_going` a failed run
    writes `failed` (its exit status) into its directory instead of raising, and is
    skipped from then on. With `log_name` a run's output goes to that file in its
    directory instead of the console. With `in_process` each command runs as
    `train.main` in this process (see `run_in_process`) instead of a subprocess."""
    commands = []
    for point in todo:
        workdir = os.path.join(sweep_dir, run_name(point))
        cmd = command(config, point, workdir, extra)
        commands.append(cmd)
        if print_only:
            print(shlex.join(cmd))
        else:
            run_one(cmd, workdir, keep_going, log_name, in_process)
    return commands


def run_one(cmd: list[str], workdir: str, keep_going: bool = False,
            log_name: str | None = None, in_process: bool = False) -> str:
    """Runs one `train.py` command (see `run_points`) and says how it went: "done
    already", "failed already" (with `keep_going`), "ok" or "failed". A run that did
    not finish and left no checkpoint starts over in a clean directory (its
    `metrics.jsonl` is appended to, so stale rows would otherwise stay)."""
    if finished(workdir):
        print(f"done already: {workdir}")
        return "done already"
    if keep_going and failed(workdir):
        print(f"failed already: {workdir}")
        return "failed already"
    if os.path.isdir(workdir) and not _has_checkpoint(workdir):
        shutil.rmtree(workdir)
    print(f"running: {shlex.join(cmd)}", flush=True)
    returncode = (run_in_process if in_process else _run)(cmd, workdir, log_name)
    if returncode and not keep_going:
        raise subprocess.CalledProcessError(returncode, cmd)
    if returncode:
        RunDir(workdir).mark_failed(returncode)
        print(f"failed (exit status {returncode}): {workdir}", flush=True)
        return "failed"
    return "ok"


def _has_checkpoint(workdir: str) -> bool:
    return bool(RunDir(workdir).checkpoint_steps())


def _run(cmd: list[str], workdir: str, log_name: str | None) -> int:
    if not log_name:
        return subprocess.run(cmd, check=False, cwd=ROOT).returncode
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, log_name), "a") as log:
        return subprocess.run(cmd, check=False, cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT).returncode


def run_in_process(cmd: list[str], workdir: str, log_name: str | None) -> int:
    """Runs `cmd` (a `train.py` command line from `command`) as `train.main` in this
    process and returns an exit status (1 and the traceback in the log if it raised).

    The same flags and config as the subprocess, without paying the imports (about
    8 s on a 2-core CPU) once per run: short sweeps on a CPU are dominated by them.
    absl's flags are parsed again for each run (ml_collections reads the config
    overrides from `sys.argv`), and JAX's compilation caches are cleared after it."""
    import traceback

    import jax
    from absl import flags

    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import train as train_script

    argv, saved_argv, values = cmd[1:], sys.argv, flags.FLAGS
    with _output_to(os.path.join(workdir, log_name) if log_name else None):
        try:
            for name in list(values):
                if name.startswith("config."):  # the previous run's override flags
                    delattr(values, name)
            values.unparse_flags()
            sys.argv = argv
            values(argv)
            train_script.main(argv[:1])
            return 0
        except SystemExit as e:  # train.main's exit status: 2 user error, 143 preempted
            return e.code if isinstance(e.code, int) else 1
        except Exception:  # noqa: BLE001  (a failed run is recorded, the sweep goes on)
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(2, traceback.format_exc().encode())  # into the log, under pytest too
            return 1
        finally:
            sys.argv = saved_argv
            jax.clear_caches()


@contextlib.contextmanager
def _output_to(path: str | None):
    """Sends file descriptors 1 and 2 (Python, absl, tqdm and XLA output) to `path`."""
    if path is None:
        yield
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(path, "a") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def read_metrics(workdir: str, name: str | None = None) -> list[dict]:
    """The rows of the run's `metrics.jsonl` (`RunDir`), or of the sweep's JSON-lines
    file `workdir/name`; [] if absent."""
    if name is None:
        return RunDir(workdir).read_metrics()
    return read_jsonl(os.path.join(workdir, name))


def tail_mean(metrics: Sequence[dict], key: str, first_step: int) -> float | None:
    """Mean of `key` over the logged steps >= `first_step` (None if there are none)."""
    values = [m[key] for m in metrics if key in m and m.get("step", 0) >= first_step]
    return sum(values) / len(values) if values else None


def optimum(xs: Sequence[float], losses: Sequence[float | None]) -> dict | None:
    """The lowest loss over a 1-d sweep with log-spaced `xs` (None entries, e.g.
    diverged runs, are skipped): `{"x", "loss", "edge", "x_fit"}`. `edge` says the
    minimum is the first or last valid point (the true optimum may lie outside the
    grid); `x_fit` is the vertex of the parabola in log2(x) through the minimum and
    its two neighbours (None at an edge or when the parabola opens downwards)."""
    valid = [(x, y) for x, y in zip(xs, losses) if y is not None and math.isfinite(y)]
    if not valid:
        return None
    valid.sort()
    i = min(range(len(valid)), key=lambda j: valid[j][1])
    x, loss = valid[i]
    edge = i in (0, len(valid) - 1)
    x_fit = None
    if not edge:
        (x0, y0), (x1, y1), (x2, y2) = valid[i - 1], valid[i], valid[i + 1]
        u0, u1, u2 = math.log2(x0), math.log2(x1), math.log2(x2)
        # Vertex of the parabola through three points (Lagrange form).
        denom = (u0 - u1) * (u0 - u2) * (u1 - u2)
        a = (u2 * (y1 - y0) + u1 * (y0 - y2) + u0 * (y2 - y1)) / denom
        b = (u2 ** 2 * (y0 - y1) + u1 ** 2 * (y2 - y0) + u0 ** 2 * (y1 - y2)) / denom
        if a > 0:
            x_fit = 2.0 ** min(max(-b / (2 * a), u0), u2)
    return {"x": x, "loss": loss, "edge": edge, "x_fit": x_fit}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg], as for train.py")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,...")
    parser.add_argument("--point", action="append", default=[],
                        help="KEY=V,KEY=V,...: one explicit point (crossed with the grid)")
    parser.add_argument("--workdir", required=True, help="one subdirectory per run")
    parser.add_argument("--print", action="store_true", help="print the commands only")
    parser.add_argument("--keep_going", action="store_true",
                        help="record a failed run in RUN/failed and go on")
    parser.add_argument("--in_process", action="store_true",
                        help="run train.py's main in this process (saves the imports per run)")
    args = parser.parse_args(argv)
    explicit = [parse_point(p) for p in args.point]
    run_points(args.config, cross(explicit, parse_grid(args.grid)), args.workdir, extra,
               print_only=args.print, keep_going=args.keep_going, in_process=args.in_process)
    return 0


if __name__ == "__main__":
    sys.exit(main())
