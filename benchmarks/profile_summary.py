r"""Where a profiled train step spends its time, by kind of XLA op.

  python train.py --config configs/bert.py:tiny --workdir /tmp/prof \
      --config.train.profile_start=10 --config.train.profile_steps=5 \
      --config.train.log_every=1   # a host sync per step: the trace holds whole steps
  python benchmarks/profile_summary.py /tmp/prof/profile --steps 5

Reads the newest `*.trace.json.gz` under the trace directory (`RUN/profile`, which
`train.profile_start` / `profile_steps` write), sums the duration of every XLA op
event, and groups the ops by kind: the name with its numeric suffix dropped
(`multiply_add_fusion.12` -> `multiply_add_fusion`), and every matmul (XLA:CPU's
`ynn_fusion`/XNNPACK, `dot`, `gemm`) as "matmul". Only events on XLA's threads
(named `tf_XLA...`) count, without `ThunkExecutor`'s, which wrap the ops they run:
the Python frames and the input pipeline's iterators are host work.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys

_XLA_THREAD = "tf_XLA"
_WRAPPER = "ThunkExecutor"
_MATMUL = re.compile(r"ynn|dot|gemm", re.IGNORECASE)


def op_kind(name: str) -> str:
    """The kind of an XLA op event: "matmul", or its name without the numeric suffix."""
    return "matmul" if _MATMUL.search(name) else re.sub(r"[.\d]+$", "", name)


def summarise(trace: dict) -> dict[str, float]:
    """Microseconds per op kind over the whole trace (Chrome trace-event JSON)."""
    threads = {(e["pid"], e["tid"]) for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"
               and e["args"]["name"].startswith(_XLA_THREAD)}
    kinds: collections.Counter = collections.Counter()
    for event in trace["traceEvents"]:
        if (event.get("ph") == "X" and (event["pid"], event["tid"]) in threads
                and not event["name"].startswith(_WRAPPER)):
            kinds[op_kind(event["name"])] += event["dur"]
    return dict(kinds)


def newest_trace(directory: pathlib.Path) -> pathlib.Path:
    traces = sorted(directory.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not traces:
        raise SystemExit(f"error: no *.trace.json.gz under {directory}; profile a run with "
                         "--config.train.profile_start=N --config.train.profile_steps=M")
    return traces[-1]


def report(kinds: dict[str, float], steps: int, top: int = 10) -> str:
    total = sum(kinds.values())
    lines = [f"op time per step: {total / steps / 1e3:.1f} ms", "| op kind | share |", "|---|---|"]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {kind} | {us / total:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace_dir", type=pathlib.Path)
    parser.add_argument("--steps", type=int, default=5, help="steps in the trace")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    with gzip.open(newest_trace(args.trace_dir)) as f:
        print(report(summarise(json.load(f)), args.steps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
