r"""Learning-rate transfer beyond width: depth, global batch size and training length.

  python -m experiments.transfer                       # train (resumes), then report
  python -m experiments.transfer --print               # the train.py commands only
  python -m experiments.transfer --report_only         # report from runs/transfer
  python -m experiments.transfer --params umup --axes depth  # a part of it
  python -m experiments.transfer --scale gpu --print   # the bigger sweep, for a cluster
  python -m experiments.transfer --seed 1 --depths 2,16 --batches 8,32 --step_values 50,200 \
      --workdir runs/transfer_seed1 --out experiments/results/transfer/seed1  # 2nd seed, ends

The u-μP paper's Figure 1 shows the optimal peak learning rate staying put as the
model grows wider; `experiments/lr_transfer.py` reproduces that. This experiment asks
the same of the three other axes a scaling study moves along, one at a time, each
from the same base run (the causal LM at `--width`, `--layers`, `--batch`, `--steps`):

- depth: `model.num_layers` in `--depths` (the model's own rule: under u-μP the
  residual taus and the depth^-1/2 lr factor of the stack follow it; sp is plain);
- batch: `train.global_batch_size` in `--batches` (same steps, so more tokens; u-μP
  has no batch rule, the lr stays as it is);
- steps: `train.steps` in `--step_values` (warmup and cosine decay follow them).

Each axis is `lr_transfer`'s sweep with `--axis` set (the same points, runner, loss,
fitted optimum and report), in `WORKDIR/AXIS` and `OUT/AXIS` (`AXIS.png`: loss against
lr per axis value). The runs train parametrization by parametrization (all axes of the
first, then the next), so an interrupted or partial sweep has the first one whole;
the base run (every axis at its base value: the same config) trains once and is
copied into the other axes' directories.
`OUT/results.md` and `OUT/transfer.png` summarise: the fitted optimum of every axis
value, in octaves from the axis' first value, per parametrization.

`--scale cpu` (the default) is sized for a 2-core CPU: width 64, seq 64, vocab 1024,
batch 16, 100 steps, 2 layers at the base. `--scale gpu` is a bigger sweep for a GPU
or TPU host (width 256, seq 256, vocab 8192, batch 64, 2000 steps, 4 layers; no fast
compile); any flag given on the command line overrides the preset.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import sys
from collections.abc import Sequence

from experiments import lr_transfer, report, sweep

AXES = ("depth", "batch", "steps")
# Per scale: the base run, each axis' values, and the XLA fast compile (CPU only).
SCALES = {
    "cpu": dict(width=64, layers=2, seq_len=64, vocab=1024, batch=16, steps=100,
                depths="2,4,8,16", batches="8,16,32", step_values="50,100,200",
                fast_compile=True),
    "gpu": dict(width=256, layers=4, seq_len=256, vocab=8192, batch=64, steps=2000,
                depths="2,4,8,16", batches="32,64,128,256", step_values="1000,2000,4000,8000",
                fast_compile=False),
}
# log2 of the peak lrs: one octave apart around each config's optimum at the base run.
LOG2_LRS = {"sp": "-10,-9,-8,-7,-6", "umup": "-3,-2,-1,0,1"}
_VALUE_FLAGS = {"depth": "depths", "batch": "batches", "steps": "step_values"}


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                        help="preset of the base run and the axes' values")
    parser.add_argument("--axes", default=",".join(AXES), help="which axes to sweep")
    parser.add_argument("--depths", help="layers of the depth axis")
    parser.add_argument("--batches", help="global batch sizes of the batch axis")
    parser.add_argument("--step_values", help="training steps of the steps axis")
    lr_transfer.add_lr_flags(parser, "transfer", LOG2_LRS)
    parser.set_defaults(params="umup,sp")  # u-μP first: a partial sweep has it whole
    scale, _ = parser.parse_known_args(argv)
    parser.set_defaults(**SCALES[scale.scale])
    args = lr_transfer.finish_lr_args(parser, parser.parse_args(argv), extra)
    args.axes = [a for a in args.axes.split(",") if a]
    for axis in args.axes:
        if axis not in AXES:
            parser.error(f"--axes: unknown axis {axis!r}; choose from {', '.join(AXES)}")
    args.axis_values = {axis: lr_transfer.parse_ints(getattr(args, _VALUE_FLAGS[axis]),
                                                     f"--{_VALUE_FLAGS[axis]}")
                        for axis in AXES}
    return args, extra


def axis_args(args: argparse.Namespace, axis: str) -> argparse.Namespace:
    """`args` as `lr_transfer`'s for one axis: its values, its workdir and output."""
    one = copy.copy(args)
    one.axis, one.values = axis, args.axis_values[axis]
    one.workdir, one.out = os.path.join(args.workdir, axis), os.path.join(args.out, axis)
    return one


_BASE = {"depth": "layers", "batch": "batch", "steps": "steps"}  # each axis' base flag


def reuse_base_runs(args: argparse.Namespace, param: str) -> int:
    """Copies each finished base run (every axis at its base value: the same config)
    into the other axes' directories that lack it, so that it trains once, not once
    per axis; returns how many were copied."""
    copied = 0
    for lr in args.lrs[param]:
        dirs = []
        for axis in args.axes:
            one = axis_args(args, axis)
            base = getattr(args, _BASE[axis])
            if base in one.values:
                point = {"param": param, **lr_transfer.axis_point(one, base),
                         "config.train.lr": repr(lr)}
                dirs.append(lr_transfer.point_dir(one, point))
        done = next((d for d in dirs if sweep.finished(d)), None)
        for d in dirs:
            if done and not os.path.exists(d):
                shutil.copytree(done, d)
                copied += 1
    return copied


def summary(args: argparse.Namespace, results: dict[str, dict], command: str) -> dict:
    """Writes `OUT/transfer.png` (fitted optimum against each axis, in octaves from
    its first value) and `OUT/results.md`/`.json` (the moves per axis and param)."""
    rows = []
    for axis, result in results.items():
        for param in args.params:
            moved = lr_transfer.shift(result["optima"], param, axis)
            rows.append({"axis": axis, "param": param, **(moved or {}),
                         "values": ",".join(map(str, args.axis_values[axis])),
                         "runs": _runs_done(result["optima"], param),
                         "edge": [o[axis] for o in lr_transfer.complete_optima(
                                      result["optima"], param) if o["edge"]]})
    figure = _plot(args, results)
    idle_min, idle_runs = _idle_minutes(args, results)
    fmt = {"grid": "+g", "fit": "+.2f", "fit_span": ".2f"}
    table = [{**r, "edge at": ",".join(map(str, r["edge"]))} for r in rows]
    markdown = "\n".join([
        f"Base run: causal LM width {args.width}, {args.layers} layers, batch {args.batch} x "
        f"seq {args.seq_len}, {args.steps} steps, vocab {args.vocab}, seed {args.seed}; one "
        "axis moves at a time. `grid`/`fit`: how far the optimal peak lr moves from the "
        "axis' first value to its last, in octaves (grid minimum / fitted minimum: the "
        "vertex of a parabola in log2(lr) through the grid minimum and its neighbours); "
        "`fit_span`: largest minus smallest fitted minimum over the axis; `edge at`: axis "
        "values whose minimum is at the end of the lr grid (the true optimum may lie "
        "beyond). Only axis values whose lr grid finished count. Per-axis tables and figures: " + ", ".join(
            f"[{a}]({a}/results.md)" for a in results) + ". Figure: `transfer.png`.",
        "",
        report.markdown_table(table, ["axis", "param", "values", "from", "to", "grid", "fit",
                                      "fit_span", "edge at", "runs"], fmt),
        "",
        f"Idle-box estimate of the training time: {idle_min:.1f} min over {idle_runs} "
        "finished runs (`lr_transfer.idle_seconds` per run; the base run shared by the axes "
        "counts once; every run of a shape at the fastest estimate of that shape's runs).",
    ])
    paths = report.write_results(args.out, rows, markdown, command)
    paths["figure"] = figure
    return {"rows": rows, "paths": paths}


def _idle_minutes(args: argparse.Namespace, results: dict[str, dict]) -> tuple[float, int]:
    """Idle-box estimate of the distinct finished runs' training, in minutes, and their
    count. Runs of one shape (layers, batch, steps) cost the same whatever the param and
    lr, so each counts at the fastest estimate among its shape's runs: a run trained
    under heavy load (every step slow) does not inflate the total."""
    shapes: dict[tuple, dict[tuple, float]] = {}
    for axis, result in results.items():
        for r in result["rows"]:
            if r.get("idle_s"):
                config = {a: getattr(args, flag) for a, flag in _BASE.items()}
                config[axis] = r[axis]
                shapes.setdefault(tuple(sorted(config.items())), {})[r["param"], r["lr"]] = r["idle_s"]
    runs = sum(len(s) for s in shapes.values())
    return sum(len(s) * min(s.values()) for s in shapes.values()) / 60, runs


def _runs_done(optima: Sequence[dict], param: str) -> str:
    done, total = 0, 0
    for o in optima:
        if o["param"] == param:
            d, t = o["runs"].split("/")
            done, total = done + int(d), total + int(t)
    return f"{done}/{total}"


def _plot(args: argparse.Namespace, results: dict[str, dict]) -> str:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    markers = {"sp": "s", "umup": "o"}
    for ax, (axis, result) in zip(axes[0], results.items()):
        for param in args.params:
            found = lr_transfer.complete_optima(result["optima"], param)
            if not found:
                continue
            base = found[0]["fit_lr"] or found[0]["best_lr"]
            xs = [o[axis] for o in found]
            ys = [math.log2((o["fit_lr"] or o["best_lr"]) / base) for o in found]
            ax.plot(xs, ys, marker=markers.get(param, "o"), label=param)
            for o, x, y in zip(found, xs, ys):  # hollow: grid minimum at the grid's edge
                if o["edge"]:
                    ax.plot([x], [y], marker="o", markersize=11, fillstyle="none", color="k")
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel({"depth": "layers", "batch": "global batch size",
                       "steps": "training steps"}[axis])
        ax.set_ylabel("optimal lr shift (octaves)")
        ax.set_title(f"lr transfer across {axis}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return report.save_figure(fig, os.path.join(args.out, "transfer.png"))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    command = lr_transfer.command_of("transfer", argv)
    if not args.report_only:
        for param in args.params:  # the first parametrization whole before the next
            for axis in args.axes:
                if not args.print:
                    reuse_base_runs(args, param)
                one = axis_args(args, axis)
                lr_transfer.run_sweep(one, lr_transfer.points(one, [param]), extra, command)
        if args.print:
            return 0
    results = {axis: lr_transfer.build_report(axis_args(args, axis), command)
               for axis in args.axes}
    with open(summary(args, results, command)["paths"]["md"]) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
