r"""Learning-rate transfer across width, or depth, batch size or training length (the
u-μP paper's Figure 1, in miniature).

  python -m experiments.lr_transfer                      # train, then report
  python -m experiments.lr_transfer --print              # the train.py commands only
  python -m experiments.lr_transfer --report_only        # report from runs/lr_transfer
  python -m experiments.lr_transfer --widths 128,256,512,1024,2048 --steps 2000 \
      --seq_len 256 --batch 64 --vocab 8192 --workdir runs/lr_transfer_gpu \
      --out experiments/results/lr_transfer_gpu --no-fast_compile  # bigger, on a GPU
  python -m experiments.lr_transfer --sp_lrs=-14,-12,-10 --umup_lrs=-2,0,2  # other grids
  python -m experiments.lr_transfer --config configs/bert.py:tiny --widths 64,128,256,512 \
      --head_dim 64 --mlp_ratio 4 --workdir runs/lr_transfer_bert \
      --out experiments/results/lr_transfer_bert -- --config.model.norm_position=post \
      --config.model.norm=layer_norm --config.model.activation=gelu \
      --config.model.position=learned --config.model.use_bias=true  # BERT, its architecture
  python -m experiments.lr_transfer --axis depth --values 2,4,8 --width 64  # another axis

The causal LM (`configs/causal_lm.py`: pre-norm RMSNorm, RoPE, SwiGLU) at several
widths, each trained at a grid of peak learning rates (powers of 2) under standard
parametrization (`sp`) and u-μP (`umup`). Width scales `d_model`, the number of heads
(fixed head dim) and `mlp_dim` (a fixed multiple of d_model) together; depth, data,
steps and seed are the same for every point. `--axis depth|batch|steps` sweeps the
number of layers, the global batch size or the training steps instead (at `--width`;
`experiments/transfer.py` runs the three). `--config` trains another config the
same way (`configs/bert.py:tiny`: MLM+NSP; its `model.max_len` follows `--seq_len` and
`data.max_predictions_per_seq` is 15% of it); flags after `--` go to every run. Every run trains in
`WORKDIR/param=P,model.d_model=D,...,train.lr=LR` (see `experiments/sweep.py`; an
interrupted sweep resumes, a diverging run is recorded and skipped). The runs execute
`train.main` in this process (`--subprocess`: one `train.py` each) with XLA's fast
compilation (`--fast_compile`): on a 2-core CPU a short run is dominated by imports and
compilation. Lists of log2 values that start with a minus sign need `=`.

The loss of a run is the mean training loss over its last `--tail` fraction of steps
(every run sees the same batches, so the comparison between learning rates is paired;
it averages `tail*steps` batches where the eval loss of a short run averages only
`--eval_batches`, and costs no extra compile). With `--eval_batches N` the runs also
evaluate at the end and `--metric eval` ranks them by the eval loss.

Writes `OUT/lr_transfer.png` (loss against learning rate, one line per width, one
panel per parametrization), `OUT/results.md` and `OUT/results.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Optional

from experiments import report, sweep
from unit_scaling.train.rundir import RunDir

CONFIG = "configs/causal_lm.py:tiny"
PARAMS = ("sp", "umup")
# log2 of the peak learning rates; each config's default (sp 1e-3, umup 0.5) inside.
DEFAULT_LOG2_LRS = {"sp": "-12,-10,-8,-6,-4", "umup": "-5,-3,-1,1,3"}


def add_common_flags(parser: argparse.ArgumentParser, name: str) -> None:
    """Flags every lr experiment shares: the training run of every point, the output."""
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--width", type=int, default=64,
                        help="d_model where the width is not swept")
    parser.add_argument("--head_dim", type=int, default=16, help="d_model / num_heads")
    parser.add_argument("--mlp_ratio", type=int, default=3, help="mlp_dim / d_model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tail", type=float, default=0.25,
                        help="the loss is the mean train loss over this last fraction of steps")
    parser.add_argument("--eval_batches", type=int, default=0,
                        help="> 0: also evaluate at the end on this many batches")
    parser.add_argument("--metric", choices=("train", "eval"), default="train",
                        help="rank runs by the train-tail loss or the final eval loss")
    parser.add_argument("--workdir", default=f"runs/{name}", help="one subdirectory per run")
    parser.add_argument("--out", default=f"experiments/results/{name}",
                        help="results.md, results.json and the figure go here")
    parser.add_argument("--print", action="store_true", help="print the commands only")
    parser.add_argument("--fast_compile", action=argparse.BooleanOptionalAction, default=True,
                        help="XLA backend optimisation level 0: on a CPU each run compiles "
                             "several times faster (the losses agree to ~1e-5) and steps run "
                             "somewhat slower; --no-fast_compile on GPUs/TPUs and long runs")
    parser.add_argument("--subprocess", action="store_true",
                        help="one train.py process per run (default: train.main in this "
                             "process, which saves the imports of every run)")
    parser.add_argument("--report_only", action="store_true",
                        help="collect and plot the runs already in --workdir")


def add_lr_flags(parser: argparse.ArgumentParser, name: str,
                 log2_lrs: dict[str, str] = DEFAULT_LOG2_LRS) -> None:
    """The flags of an lr sweep along an axis: parametrizations, config, lr grids, and
    `add_common_flags`."""
    parser.add_argument("--params", default="sp,umup", help="parametrizations")
    parser.add_argument("--config", default=CONFIG,
                        help="config file[:arg] of every run, as for train.py (e.g. "
                             "configs/bert.py:tiny); flags after `--` go to every run")
    for param in PARAMS:
        parser.add_argument(f"--{param}_lrs", default=log2_lrs[param],
                            help=f"log2 of the {param} peak learning rates")
    add_common_flags(parser, name)


def finish_lr_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   extra: list[str]) -> argparse.Namespace:
    """Checks and converts the flags of `add_lr_flags` (lists, lr grids) in place."""
    if args.metric == "eval" and not args.eval_batches:
        parser.error("--metric eval needs --eval_batches N > 0")
    args.params = args.params.split(",")
    args.lrs = {p: parse_log2(getattr(args, f"{p}_lrs")) for p in PARAMS}
    args.extra = extra
    return args


def parse_log2(text: str) -> list[float]:
    """`"-3,-1,1"` -> `[0.125, 0.5, 2.0]` (exact powers of 2)."""
    return [2.0 ** float(v) for v in text.split(",") if v.strip()]


def parse_ints(text: str, flag: str) -> list[int]:
    """`"2,4,8"` -> `[2, 4, 8]`, or an error naming `flag`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected positive integers like 2,4,8") from None
    if not values or min(values) <= 0:
        raise SystemExit(f"{flag} {text!r}: expected positive integers like 2,4,8")
    return values


def fmt_pow2(x: float) -> str:
    """`0.125` -> `2^-3`; other numbers as `%g`."""
    e = math.log2(x)
    return f"2^{e:g}" if e == round(e) else f"{x:g}"


def width_point(width: int, head_dim: int, mlp_ratio: int) -> dict[str, str]:
    """The overrides of one width: d_model, heads (fixed head dim) and MLP dim."""
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of --head_dim {head_dim}")
    return {"config.model.d_model": str(width), "config.model.num_heads": str(width // head_dim),
            "config.model.mlp_dim": str(mlp_ratio * width)}


# The axes an lr sweep moves along, and what each changes (the others stay at their
# flags: --width, --layers, --batch, --steps). Depth is the model's own rule: under
# u-μP the residual taus and the depth^-1/2 lr factor follow `model.num_layers`.
AXES = {
    "width": "d_model, with the heads (fixed head dim) and mlp_dim (fixed multiple)",
    "depth": "transformer layers (u-μP: residual taus and lr factors follow the depth)",
    "batch": "global batch size in sequences (same steps: more tokens)",
    "steps": "training steps (warmup 10% and the cosine decay follow them)",
}
_AXIS_KEYS = {"depth": "config.model.num_layers", "batch": "config.train.global_batch_size",
              "steps": "config.train.steps"}


def axis_point(args: argparse.Namespace, value: int) -> dict[str, str]:
    """The overrides that put the sweep's axis (`args.axis`) at `value`."""
    if args.axis == "width":
        return width_point(value, args.head_dim, args.mlp_ratio)
    return {_AXIS_KEYS[args.axis]: str(value)}


def common_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The overrides every run of the sweep gets (the fixed settings; short runs,
    per-step logging, no checkpoints), keyed like a point's. `run_sweep` drops those a
    point sets itself (the swept axis)."""
    bert = ({"config.model.max_len": str(args.seq_len),
             "config.data.max_predictions_per_seq": str(max(1, round(0.15 * args.seq_len)))}
            if "bert" in os.path.basename(config_of(args)) else {})
    return {**bert,
        "config.seed": str(args.seed),
        "config.train.steps": str(args.steps),
        "config.train.global_batch_size": str(args.batch),
        "config.data.seq_len": str(args.seq_len),
        "config.data.vocab_size": str(args.vocab),
        "config.model.num_layers": str(args.layers),
        # (a swept width sets its own; --width need not fit --head_dim then)
        **({} if getattr(args, "axis", None) == "width" else
           width_point(args.width, args.head_dim, args.mlp_ratio)),
        "config.train.log_every": "1",
        "config.train.eval_every": str(args.steps if args.eval_batches else 0),
        "config.train.eval_batches": str(max(args.eval_batches, 1)),
        "config.train.checkpoint_every": "0",
    }


def config_of(args: argparse.Namespace) -> str:
    """The config file[:arg] of the sweep (`--config`; the causal LM where absent)."""
    return getattr(args, "config", None) or CONFIG


FAST_COMPILE = "--xla_backend_optimization_level=0"
SWEEP_LOG = "sweeps.jsonl"  # in the workdir: one line per sweep that trained runs


def run_sweep(args: argparse.Namespace, todo: list[dict[str, str]], extra: Sequence[str],
              command: str = "") -> float:
    """Trains (or prints) `todo` into `args.workdir`; returns the wall time in seconds
    and, when it trained anything, appends it with `command` to `WORKDIR/sweeps.jsonl`."""
    if args.fast_compile and not args.print and FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        if "jax" in sys.modules and not args.subprocess:
            print("--fast_compile: JAX is imported already; XLA_FLAGS cannot change now")
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    dirs = [point_dir(args, p) for p in todo]
    before = sum(map(sweep.finished, dirs))
    start = time.perf_counter()
    point_keys = {k for p in todo for k in p}
    fixed = [f"--{k}={v}" for k, v in common_overrides(args).items() if k not in point_keys]
    sweep.run_points(config_of(args), todo, args.workdir, [*fixed, *extra],
                     print_only=args.print, keep_going=True, log_name=RunDir.LOG,
                     in_process=not args.subprocess)
    wall_s = time.perf_counter() - start
    trained = sum(map(sweep.finished, dirs)) - before
    if trained and not args.print:
        with open(os.path.join(args.workdir, SWEEP_LOG), "a") as f:
            f.write(json.dumps({"command": command, "wall_s": round(wall_s, 1), "trained": trained,
                                "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    return wall_s


def idle_seconds(logged: Sequence[tuple[int, float]]) -> float:
    """An idle-box estimate of one run's training time from its own logs: `logged` is
    (step, perf/step_s) per log line, step_s being the mean over the steps since the
    previous log. The first interval (it holds the compile) counts as logged, every
    later step at the 10th percentile of the later intervals: a shared box slows most
    of a run's intervals but not all, and the fast tail is the idle speed. Process
    start-up and data loading before the first step are left out."""
    if not logged:
        raise ValueError("idle_seconds: no perf/step_s logged; train with log_every >= 1")
    (first, first_s), rest = logged[0], sorted(s for _, s in logged[1:]) or [logged[0][1]]
    return first * first_s + (logged[-1][0] - first) * rest[len(rest) // 10]


def timing(args: argparse.Namespace, rows: Sequence[dict]) -> str:
    """The runs' summed training time, its idle-box estimate and the logged sweeps'
    wall times."""
    idle = [r["idle_s"] for r in rows if r.get("idle_s")]
    text = (f"Sum of the runs' training times (first step to last log): "
            f"{sum(r['run_s'] or 0.0 for r in rows) / 60:.1f} min; idle-box estimate from "
            f"their fastest steps (`lr_transfer.idle_seconds`; {len(idle)} runs): "
            f"{sum(idle) / 60:.1f} min.")
    log = sweep.read_metrics(args.workdir, SWEEP_LOG)
    if log:
        text += " Sweeps logged in the workdir (wall time incl. start-up; runs trained): " + "; ".join(
            f"`{e['command']}` {e['wall_s'] / 60:.1f} min, {e['trained']}" for e in log) + "."
    return text


def load_run(workdir: str, tail: float) -> dict:
    """What the report needs of one run: status, train-tail loss, eval loss, timing."""
    run_dir = RunDir(workdir)
    metrics = run_dir.read_metrics()
    steps = run_dir.read_config().train.steps if run_dir.has_config() else None
    status = ("failed" if sweep.failed(workdir) else
              "done" if sweep.finished(workdir) else "unfinished")
    if status == "failed" and run_dir.diverged():
        status = "diverged"
    row: dict = {"status": status, "train_loss": None, "eval_loss": None,
                 "step_s": None, "run_s": None, "idle_s": None}
    if status == "done" and steps:
        row["train_loss"] = sweep.tail_mean(metrics, "train/loss", steps - int(tail * steps) + 1)
        row["eval_loss"] = sweep.tail_mean(metrics, "eval/loss", steps)
        step_s = [m["perf/step_s"] for m in metrics if "perf/step_s" in m]
        row["step_s"] = sorted(step_s)[len(step_s) // 2] if step_s else None  # median
        row["run_s"] = run_dir.metrics_path.stat().mtime - run_dir.config_path.stat().mtime
        logged = [(m["step"], m["perf/step_s"]) for m in metrics if "perf/step_s" in m]
        row["idle_s"] = idle_seconds(logged) if logged else None
    return row


def point_dir(args: argparse.Namespace, point: dict[str, str]) -> str:
    return os.path.join(args.workdir, sweep.run_name(point))


def loss_of(row: dict, metric: str) -> float | None:
    return row["eval_loss"] if metric == "eval" else row["train_loss"]


def points(args: argparse.Namespace, params: Sequence[str] | None = None) -> list[dict[str, str]]:
    """Every (axis value, parametrization, lr) point of `params` (default all),
    smallest value first."""
    return [{"param": param, **axis_point(args, value), "config.train.lr": repr(lr)}
            for value in args.values for param in (params or args.params)
            for lr in args.lrs[param]]


def build_report(args: argparse.Namespace, command: str) -> dict:
    """Collects every point's run, picks the optimum per (param, axis value), writes
    the figure, results.md and results.json; returns `{"rows", "optima", "paths"}`.
    Rows and optima name the axis value by the axis (`"width": 64`)."""
    ax, rows = args.axis, []
    for value in args.values:
        for point in points(args):
            if point.items() >= axis_point(args, value).items():
                run = load_run(point_dir(args, point), args.tail)
                rows.append({"param": point["param"], ax: value,
                             "lr": float(point["config.train.lr"]), **run,
                             "loss": loss_of(run, args.metric)})
    optima = []
    for param in args.params:
        for value in args.values:
            mine = [r for r in rows if r["param"] == param and r[ax] == value]
            best = sweep.optimum([r["lr"] for r in mine], [r["loss"] for r in mine])
            optima.append({"param": param, ax: value,
                           "best_lr": best and best["x"], "loss": best and best["loss"],
                           "fit_lr": best and best["x_fit"], "edge": bool(best and best["edge"]),
                           "runs": f"{sum(r['status'] == 'done' for r in mine)}/{len(mine)}",
                           # every lr trained or failed: the optimum is not a partial grid's
                           "complete": all(r["status"] != "unfinished" for r in mine)})
    figure = plot(args, rows, optima)
    markdown = _markdown(args, rows, optima)
    saved = ([{"kind": "optimum", **o} for o in optima]
             + [{"kind": "run", **{k: r[k] for k in ("param", ax, "lr", "status", "loss",
                                                     "train_loss", "eval_loss", "step_s",
                                                     "run_s", "idle_s")}} for r in rows])
    paths = report.write_results(args.out, saved, markdown, command)
    paths["figure"] = figure
    return {"rows": rows, "optima": optima, "paths": paths}


def shift(optima: Sequence[dict], param: str, axis: str) -> dict | None:
    """How far `param`'s optimum moves along the axis, from its first to its last
    value whose lr grid is complete: `{"from", "to", "grid", "fit", "fit_span"}` in
    octaves of lr (`fit`: between the fitted minima, None where either end has none;
    `fit_span`: the largest minus the smallest fitted minimum over the complete values)."""
    found = complete_optima(optima, param)
    if len(found) < 2:
        return None
    a, b = found[0], found[-1]
    fits = [math.log2(o["fit_lr"]) for o in found if o["fit_lr"]]
    return {"from": a[axis], "to": b[axis], "grid": math.log2(b["best_lr"] / a["best_lr"]),
            "fit": math.log2(b["fit_lr"] / a["fit_lr"]) if a["fit_lr"] and b["fit_lr"] else None,
            "fit_span": max(fits) - min(fits) if len(fits) >= 2 else None}


def complete_optima(optima: Sequence[dict], param: str) -> list[dict]:
    """`param`'s optima whose lr grid finished (no run missing), in axis order."""
    return [o for o in optima if o["param"] == param and o["best_lr"] and o["complete"]]


def plot(args: argparse.Namespace, rows: Sequence[dict], optima: Sequence[dict]) -> str:
    import matplotlib.pyplot as plt

    ax_name = args.axis
    fig, axes = plt.subplots(1, len(args.params), figsize=(5 * len(args.params), 4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    colour = {v: cmap(i / max(len(args.values) - 1, 1) * 0.9) for i, v in enumerate(args.values)}
    for ax, param in zip(axes[0], args.params):
        curves = {}
        for value in args.values:
            done = [r for r in rows if r["param"] == param and r[ax_name] == value
                    and r["loss"] is not None]
            curves[f"{ax_name} {value}"] = ([r["lr"] for r in done], [r["loss"] for r in done])
        report.plot_curves(ax, curves, f"{args.metric} loss", title=param, log_x=True,
                           style=lambda label: {"color": colour[int(label.split()[1])],
                                                    "marker": "o", "markersize": 3})
        for o in optima:
            if o["param"] == param and o["best_lr"]:
                ax.plot([o["best_lr"]], [o["loss"]], marker="*", markersize=12,
                        color=colour[o[ax_name]], markeredgecolor="k")
        losses = [r["loss"] for r in rows if r["loss"] is not None]
        if losses:  # one scale for all panels; clip the diverging ends of the curves
            low = min(losses)
            ax.set_ylim(low - 0.1, min(max(losses), low + 2.0) + 0.1)
        top = ax.get_ylim()[1]
        for r in rows:  # diverged or failed runs: a cross at the top of the panel
            if r["param"] == param and r["status"] in ("diverged", "failed"):
                ax.plot([r["lr"]], [top], marker="x", color=colour[r[ax_name]], clip_on=False)
        ax.set_xlabel("peak learning rate")
    return report.save_figure(fig, os.path.join(args.out, f"{os.path.basename(args.out)}.png"))


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _setup(args: argparse.Namespace) -> str:
    """One sentence: the model and training of every run, the swept axis named."""
    swept = ",".join(map(str, args.values))
    width = (f"width {swept}" if args.axis == "width" else f"width {args.width}") + (
        f" (head dim {args.head_dim}, mlp_dim = {args.mlp_ratio} x d_model)")
    fixed = {"depth": f"{args.layers} layers", "batch": f"batch {args.batch}",
             "steps": f"{args.steps} steps"}
    if args.axis in fixed:
        fixed[args.axis] = {"depth": f"layers {swept}", "batch": f"batch {swept}",
                            "steps": f"steps {swept}"}[args.axis]
    return (f"{'BERT MLM+NSP' if 'bert' in config_of(args) else 'Causal LM'} "
            f"(`{config_of(args)}`" + "".join(f" `{e}`" for e in getattr(args, "extra", []))
            + f"; swept: {AXES[args.axis]}): {width}, {fixed['depth']}, vocab {args.vocab}, "
            f"{fixed['batch']} x seq {args.seq_len}, {fixed['steps']} (warmup 10%, cosine to "
            f"0), seed {args.seed}, fp32; each parametrization with its config's optimizer "
            "settings.")


def _markdown(args, rows, optima) -> str:
    ax = args.axis
    lines = [
        _setup(args) + " Loss: "
        + (f"mean train loss over the last {args.tail:.0%} of the steps."
           if args.metric == "train" else f"eval loss on {args.eval_batches} batches.")
        + " Figure: `" + os.path.basename(args.out) + f".png` (stars: optimum per {ax}; "
        "crosses on the top edge: diverged).",
        "",
        (f"Optimum per {ax} (grid minimum; `fit` = vertex of a parabola in log2(lr) "
         "through the minimum and its neighbours; `edge` = the minimum is at the end of "
         "the grid):"),
        "",
    ]
    table = [{"param": o["param"], ax: o[ax],
              "best lr": o["best_lr"] and f"{fmt_pow2(o['best_lr'])} ({o['best_lr']:.3g})",
              "fit lr": o["fit_lr"] and f"{o['fit_lr']:.3g}", "loss": o["loss"],
              "edge": "yes" if o["edge"] else "", "runs done": o["runs"]} for o in optima]
    lines.append(report.markdown_table(table, ["param", ax, "best lr", "fit lr", "loss",
                                               "edge", "runs done"], {"loss": ".3f"}))
    for param in args.params:
        moved = shift(optima, param, ax)
        if moved:
            lines.append(f"- {param}: optimum moves {moved['grid']:+g} octaves (grid) from "
                         f"{ax} {moved['from']} to {moved['to']}"
                         + (f", {moved['fit']:+.2f} (fit)" if moved["fit"] is not None else "")
                         + ".")
    lines += ["", "Loss at every point (`div` = diverged, `fail` = failed, `-` = not run):", ""]
    for param in args.params:
        grid = []
        for value in args.values:
            cells = {ax: value}
            for r in rows:
                if r["param"] == param and r[ax] == value:
                    cells[fmt_pow2(r["lr"])] = (_fmt(r["loss"]) if r["status"] == "done" else
                                                {"diverged": "div", "failed": "fail"}.get(r["status"], "-"))
            grid.append(cells)
        lines += [f"{param}:", "",
                  report.markdown_table(grid, [ax, *map(fmt_pow2, args.lrs[param])])]
    step_s = {v: [r["step_s"] for r in rows if r[ax] == v and r["step_s"]] for v in args.values}
    lines.append(f"Median step time per {ax} (s): " + ", ".join(
        f"{v}: {sorted(t)[len(t) // 2]:.3f}" for v, t in step_s.items() if t) + ".")
    lines.append(timing(args, rows))
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = sweep.split_train_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--axis", choices=tuple(AXES), default="width",
                        help="what changes between the curves: " + "; ".join(
                            f"{k}: {v}" for k, v in AXES.items()).replace("%", "%%"))
    parser.add_argument("--values", "--widths", default="32,64,128,256",
                        help="the axis' values (--widths: the width axis' old name)")
    add_lr_flags(parser, "lr_transfer")
    args = finish_lr_args(parser, parser.parse_args(argv), extra)
    args.values = parse_ints(args.values, "--values")
    return args, extra


def command_of(name: str, argv: Sequence[str]) -> str:
    """The command recorded with the results: the one that trains (no --report_only)."""
    return shlex.join(["python", "-m", f"experiments.{name}",
                       *(a for a in argv if a != "--report_only")])


def experiment_main(name: str, argv: Sequence[str] | None, parse: Callable,
                    todo: Optional[Callable], build: Callable,
                    train: Optional[Callable] = None) -> int:
    """The command line of an experiment: `parse(argv) -> (args, extra)`, then train (or
    print) unless --report_only, then `build(args, command)`; the command recorded is
    the one that trains (without --report_only). Training is `run_sweep` over
    `todo(args)`, or `train(args, extra, command)` for an experiment whose points carry
    their own shapes and steps (`scaling_law`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse(argv)
    command = command_of(name, argv)
    if not args.report_only:
        if train is not None:
            train(args, extra, command)
        else:
            run_sweep(args, todo(args), extra, command)
        if args.print:
            return 0
    result = build(args, command)
    with open(result["paths"]["md"]) as f:
        print(f.read())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return experiment_main("lr_transfer", argv, parse_args, points, build_report)


if __name__ == "__main__":
    sys.exit(main())
