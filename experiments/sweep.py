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
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from typing import Iterable, Sequence

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


def run_name(point: dict[str, str]) -> str:
    return ",".join(f"{k.removeprefix('config.')}={v}" for k, v in point.items()) or "default"


def command(config: str, point: dict[str, str], workdir: str, extra: Sequence[str]) -> list[str]:
    """The `train.py` command line of one grid point."""
    arg_items = [f"{k}={v}" for k, v in point.items() if not k.startswith("config.")]
    config_arg = config + ("," if ":" in config else ":") + ",".join(arg_items) if arg_items else config
    overrides = [f"--{k}={v}" for k, v in point.items() if k.startswith("config.")]
    return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config_arg}",
            f"--workdir={workdir}", *overrides, *extra]


def finished(workdir: str) -> bool:
    """Whether the run in `workdir` logged its last step."""
    path = os.path.join(workdir, "metrics.jsonl")
    config_path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and os.path.exists(config_path)):
        return False
    with open(config_path) as f:
        steps = json.load(f)["train"]["steps"]
    with open(path) as f:
        return any(json.loads(line).get("step") == steps for line in f if line.strip())


def collect(sweep_dir: str) -> list[dict]:
    """One row per run: its grid point (from the directory name) and last metrics."""
    rows = []
    for name in sorted(os.listdir(sweep_dir)):
        path = os.path.join(sweep_dir, name, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        point = dict(item.split("=", 1) for item in name.split(",") if "=" in item)
        last: dict = {}
        with open(path) as f:
            for line in f:
                if line.strip():
                    last.update(json.loads(line))
        rows.append({"run": name, **point, **last})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file[:arg], as for train.py")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,...")
    parser.add_argument("--workdir", required=True, help="one subdirectory per run")
    parser.add_argument("--print", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    for point in points(parse_grid(args.grid)):
        workdir = os.path.join(args.workdir, run_name(point))
        cmd = command(args.config, point, workdir, extra)
        if args.print:
            print(shlex.join(cmd))
        elif finished(workdir):
            print(f"done already: {workdir}")
        else:
            print(f"running: {shlex.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
