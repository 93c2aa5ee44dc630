r"""Interleaved A/B timing of one train step across source trees (commits).

  python benchmarks/ab_trees.py --trees base=/tmp/t/base,rms=/tmp/t/rms,loss=. \
      --config configs/causal_lm.py:tiny --param umup --override model.d_model=256 ...

Each tree (a checkout or `git archive` of a commit) gets a worker process that
imports *its own* `unit_scaling` and `benchmarks/speed.py`, compiles the train step
with `speed.compile_step` (what `train.py` runs), makes the state and warms up. Then
every round asks each worker, in an order that rotates between rounds, for
`--steps` timed steps (wall and process CPU seconds, blocking on each step). A
shared, loaded machine slows every tree alike within a round, so the paired
per-round ratio `tree step time / first tree step time` is the measure; its median
over rounds is reported with each tree's median step time and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

# What a worker runs (python -c), in its tree, with argv = spec, param, precision,
# overrides (JSON), warmup, and the path of *this* tree's host_memory.py: every tree
# runs with glibc's malloc set as train.py sets it, older trees included.
_WORKER = r"""
import json, runpy, sys, time
runpy.run_path(sys.argv[6])["keep_freed_memory"]()
sys.path.insert(0, ".")
from benchmarks import speed
spec, param, precision, overrides, warmup = sys.argv[1:6]
bench = speed.compile_step(speed.load(spec, param, precision, json.loads(overrides), False),
                           label=spec)
bench.state = bench.init()
for _ in range(int(warmup)):
    bench.run_step()
print(json.dumps({"ready": True, "compile_s": bench.row["compile_s"]}), flush=True)
for line in sys.stdin:
    wall, cpu = [], []
    for _ in range(json.loads(line)["steps"]):
        c = time.process_time()
        wall.append(bench.run_step())
        cpu.append(time.process_time() - c)
    print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)
"""


class LineWorker:
    """A child process that answers each JSON line on its stdin with one JSON line on
    its stdout (its first line, read at start, says it is ready). PYTHONPATH is
    dropped, so that the child imports the `unit_scaling` of its own tree or
    environment."""

    def __init__(self, argv: Sequence[str], cwd: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        self.process = subprocess.Popen(list(argv), cwd=cwd, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.info = self.read()

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.process.args[:3]} exited with "
                               f"{self.process.wait()} (its error is above)")
        return json.loads(line)

    def run(self, steps: int) -> dict:
        """`{"wall": [...], "cpu": [...]}`: seconds of `steps` steps."""
        self.process.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", required=True,
                        help="NAME=PATH,... (the first is the reference of the ratios)")
    parser.add_argument("--config", default="configs/causal_lm.py:tiny")
    parser.add_argument("--param", default="umup")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--out", help="write NAME.json and NAME.md under this prefix")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    trees = dict(item.split("=", 1) for item in args.trees.split(","))
    overrides = dict(item.split("=", 1) for item in args.override)
    host_memory = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "unit_scaling", "host_memory.py")
    worker_args = [args.config, args.param, args.precision, json.dumps(overrides),
                   str(args.warmup), host_memory]
    names = list(trees)
    workers = {}
    try:
        for name in names:  # one at a time: compiles do not overlap
            workers[name] = LineWorker([args.python, "-c", _WORKER, *worker_args],
                                       cwd=os.path.abspath(trees[name]))
        rounds = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            row = {"load_1min": os.getloadavg()[0]}
            for name in order:
                row[name] = workers[name].run(args.steps)
            rounds.append(row)
            print(f"round {r}: load {row['load_1min']:.1f}, " + ", ".join(
                f"{n} {statistics.median(row[n]['wall']) * 1e3:.0f} ms" for n in names),
                flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    base = names[0]
    summary = {}
    for name in names:
        med = lambda r, n, k="wall": statistics.median(r[n][k])  # noqa: E731
        summary[name] = {
            "step_ms": statistics.median(t for r in rounds for t in r[name]["wall"]) * 1e3,
            "cpu_s": statistics.median(t for r in rounds for t in r[name]["cpu"]),
            "ratio": statistics.median(med(r, name) / med(r, base) for r in rounds),
            "cpu_ratio": statistics.median(med(r, name, "cpu") / med(r, base, "cpu")
                                           for r in rounds),
        }
    loads = [r["load_1min"] for r in rounds]
    command = shlex.join(["python", "benchmarks/ab_trees.py", *(sys.argv[1:] if argv is None
                                                                 else argv)])
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "trees": trees,
              "load_1min": [min(loads), statistics.median(loads), max(loads)],
              "summary": summary, "rounds": rounds}
    lines = [f"Command: `{command}`", "",
             f"Load average (1 min) min/median/max: {min(loads):.1f} / "
             f"{statistics.median(loads):.1f} / {max(loads):.1f} on {os.cpu_count()} cores; "
             f"{args.rounds} rounds x {args.steps} steps; {result['date']}.", "",
             f"| tree | step ms | CPU s/step | step time / {base} (wall) | (CPU) |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {s['step_ms']:.0f} | {s['cpu_s']:.2f} | {s['ratio']:.3f} | "
              f"{s['cpu_ratio']:.3f} |" for n, s in summary.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)
    return result


if __name__ == "__main__":
    main()
