r"""Sensitivity to the five u-μP hyperparameters, one at a time, at one width.

  python -m experiments.umup_mults                     # train, then report
  python -m experiments.umup_mults --print             # the train.py commands only
  python -m experiments.umup_mults --report_only       # report from runs/umup_mults
  python -m experiments.umup_mults --lr_mults attn_mult,residual_mult  # + independence

The causal LM under u-μP (`configs/causal_lm.py`, shapes as in `experiments.lr_transfer`)
at one width and the default u-μP learning rate, with one of `act_mult`, `attn_mult`,
`residual_mult`, `residual_attn_ratio`, `loss_mult` set to each of `--values` (log2,
around 1) while the others stay at 1; plus a learning-rate sweep at the default mults.
`--lr_mults NAME,...` also sweeps the learning rate with NAME at each of
`--lr_mult_values`, which tests the u-μP claim that the optimal learning rate does not
depend on the mults. The loss of a run is the mean training loss over its last steps
(see `experiments.lr_transfer`).

Writes `OUT/umup_mults.png` (loss against mult value, one line per mult; loss against
learning rate), `OUT/results.md` and `OUT/results.json`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from experiments import lr_transfer, report, sweep

MULTS = ("act_mult", "attn_mult", "residual_mult", "residual_attn_ratio", "loss_mult")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = sweep.split_train_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lr", type=float, default=0.5,
                        help="peak lr of the mult sweep (configs/causal_lm.py's u-μP default)")
    parser.add_argument("--mults", default=",".join(MULTS), help="which mults to sweep")
    parser.add_argument("--values", default="-2,-1,1,2",
                        help="log2 of the mult values (1 = the shared default run)")
    parser.add_argument("--lrs", default="-5,-3,-1,1,3",
                        help="log2 of the peak lrs swept at the default mults")
    parser.add_argument("--lr_mults", default="",
                        help="mults at whose --lr_mult_values the lrs are swept too")
    parser.add_argument("--lr_mult_values", default="-2,2", help="log2 mult values")
    lr_transfer.add_common_flags(parser, "umup_mults")
    parser.set_defaults(width=128)
    args = parser.parse_args(argv)
    if args.metric == "eval" and not args.eval_batches:
        parser.error("--metric eval needs --eval_batches N > 0")
    args.mults = [m for m in args.mults.split(",") if m]
    args.lr_mults = [m for m in args.lr_mults.split(",") if m]
    for m in args.mults + args.lr_mults:
        if m not in MULTS:
            raise SystemExit(f"unknown mult {m!r}; choose from {', '.join(MULTS)}")
    args.values = lr_transfer.parse_log2(args.values)
    args.lr_values = lr_transfer.parse_log2(args.lrs)
    args.lr_mult_values = lr_transfer.parse_log2(args.lr_mult_values)
    return args, extra


def _point(args: argparse.Namespace, lr: float, mult: str | None = None,
           value: float | None = None) -> dict[str, str]:
    point = {"param": "umup",
             **lr_transfer.width_point(args.width, args.head_dim, args.mlp_ratio),
             "config.train.lr": repr(lr)}
    if mult is not None and value != 1.0:
        point[f"config.model.{mult}"] = repr(value)
    return point


def settings(args: argparse.Namespace) -> list[tuple[str, float, float, dict[str, str]]]:
    """Every run as `(mult or "default", mult value, lr, point)`, without duplicates
    (the default run belongs to every mult's line and to the lr sweep)."""
    todo = [("default", 1.0, args.lr, _point(args, args.lr))]
    for mult in args.mults:
        todo += [(mult, v, args.lr, _point(args, args.lr, mult, v)) for v in args.values if v != 1.0]
    todo += [("default", 1.0, lr, _point(args, lr)) for lr in args.lr_values if lr != args.lr]
    for mult in args.lr_mults:
        todo += [(mult, v, lr, _point(args, lr, mult, v))
                 for v in args.lr_mult_values if v != 1.0 for lr in args.lr_values]
    seen, unique = set(), []
    for item in todo:
        name = sweep.run_name(item[3])
        if name not in seen:
            seen.add(name)
            unique.append(item)
    return unique


def build_report(args: argparse.Namespace, command: str) -> dict:
    """Collects the runs, writes the figure, results.md and results.json."""
    rows = []
    for mult, value, lr, point in settings(args):
        run = lr_transfer.load_run(os.path.join(args.workdir, sweep.run_name(point)), args.tail)
        rows.append({"mult": mult, "value": value, "lr": lr, **run,
                     "loss": lr_transfer.loss_of(run, args.metric)})
    base = next(r for r in rows if r["mult"] == "default" and r["lr"] == args.lr)

    def at(mult: str, value: float, lr: float) -> dict | None:
        if value == 1.0:
            return base if lr == args.lr else next(
                (r for r in rows if r["mult"] == "default" and r["lr"] == lr), None)
        return next((r for r in rows if r["mult"] == mult and r["value"] == value
                     and r["lr"] == lr), None)

    values = sorted({*args.values, 1.0})
    mult_rows = []
    for mult in args.mults:
        line = [at(mult, v, args.lr) for v in values]
        best = sweep.optimum(values, [r and r["loss"] for r in line])
        mult_rows.append({"mult": mult, "values": values, "losses": [r and r["loss"] for r in line],
                          "statuses": [r and r["status"] for r in line],
                          "best": best and best["x"], "best_loss": best and best["loss"]})
    lr_rows = []
    for mult, value in [("default", 1.0)] + [(m, v) for m in args.lr_mults
                                             for v in args.lr_mult_values if v != 1.0]:
        line = [at(mult, value, lr) for lr in args.lr_values]
        best = sweep.optimum(args.lr_values, [r and r["loss"] for r in line])
        lr_rows.append({"mult": mult, "value": value, "losses": [r and r["loss"] for r in line],
                        "statuses": [r and r["status"] for r in line],
                        "best_lr": best and best["x"], "fit_lr": best and best["x_fit"],
                        "edge": bool(best and best["edge"]), "loss": best and best["loss"]})
    figure = plot(args, base, mult_rows, lr_rows)
    markdown = _markdown(args, rows, base, mult_rows, lr_rows)
    saved = ([{"kind": "mult", **r} for r in mult_rows] + [{"kind": "lr", **r} for r in lr_rows]
             + [{"kind": "run", **{k: r[k] for k in ("mult", "value", "lr", "status", "loss",
                                                     "train_loss", "eval_loss", "step_s",
                                                     "run_s")}} for r in rows])
    paths = report.write_results(args.out, saved, markdown, command)
    paths["figure"] = figure
    return {"rows": rows, "mults": mult_rows, "lrs": lr_rows, "paths": paths}


def _valid(xs, ys):
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return [x for x, _ in pairs], [y for _, y in pairs]


def plot(args, base, mult_rows, lr_rows) -> str:
    import matplotlib.pyplot as plt

    colour = {m: f"C{i}" for i, m in enumerate(MULTS)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    report.plot_curves(left, {r["mult"]: _valid(r["values"], r["losses"]) for r in mult_rows},
                       f"{args.metric} loss", title=f"u-μP mults at lr {args.lr:g}, width {args.width}",
                       log_x=True, style=lambda m: {"marker": "o", "markersize": 3, "color": colour[m]})
    if base["loss"] is not None:
        left.axhline(base["loss"], color="grey", linestyle="--", linewidth=0.8)
    left.set_xlabel("mult value (others 1)")
    label = {id(r): "all mults 1" if r["mult"] == "default" else f"{r['mult']}={r['value']:g}"
             for r in lr_rows}
    style = {}  # mult colour; dashed below 1, dotted above
    for r in lr_rows:
        style[label[id(r)]] = ({"color": "k", "linewidth": 2} if r["mult"] == "default" else
                               {"color": colour[r["mult"]],
                                "linestyle": "--" if r["value"] < 1 else ":"})
    report.plot_curves(right, {label[id(r)]: _valid(args.lr_values, r["losses"]) for r in lr_rows},
                       f"{args.metric} loss", title="learning rate", log_x=True,
                       style=lambda name: {"marker": "o", "markersize": 3, **style[name]})
    for r in lr_rows:
        if r["best_lr"]:
            right.plot([r["best_lr"]], [r["loss"]], marker="*", markersize=11,
                       color=style[label[id(r)]]["color"], markeredgecolor="k")
    losses = [y for r in lr_rows for y in r["losses"] if y is not None]
    if losses:
        right.set_ylim(min(losses) - 0.1, min(max(losses), min(losses) + 2.0) + 0.1)
    if len(lr_rows) > 4:
        right.legend(fontsize="x-small", ncol=2)
    right.set_xlabel("peak learning rate")
    return report.save_figure(fig, os.path.join(args.out, f"{os.path.basename(args.out)}.png"))


def _cell(loss, status) -> str:
    if status == "done" and loss is not None:
        return f"{loss:.3f}"
    return {"diverged": "div", "failed": "fail"}.get(status, "-")


def _markdown(args, rows, base, mult_rows, lr_rows) -> str:
    fmt = lr_transfer.fmt_pow2
    heads = args.width // args.head_dim
    lines = [
        f"Causal LM under u-μP: width {args.width} ({heads} heads of {args.head_dim}, "
        f"mlp_dim {args.mlp_ratio * args.width}), {args.layers} layers, BPE vocab {args.vocab}, "
        f"batch {args.batch} x seq {args.seq_len}, {args.steps} steps (warmup 10%, cosine to 0), "
        f"seed {args.seed}, fp32. Loss: "
        + (f"mean train loss over the last {int(args.tail * args.steps)} steps."
           if args.metric == "train" else f"eval loss on {args.eval_batches} batches.")
        + f" Figure: `{os.path.basename(args.out)}.png`.",
        "",
        (f"One mult at a time (the others 1), peak lr {args.lr:g}; the default run "
         f"(all mults 1) has loss {_cell(base['loss'], base['status'])}:"),
        "",
    ]
    values = mult_rows[0]["values"] if mult_rows else []
    table = []
    for r in mult_rows:
        cells = {"mult": r["mult"], "best value": r["best"] and fmt(r["best"])}
        cells.update({fmt(v): _cell(y, s) for v, y, s in zip(r["values"], r["losses"], r["statuses"])})
        spread = [y for y in r["losses"] if y is not None]
        cells["max - min"] = f"{max(spread) - min(spread):.3f}" if len(spread) > 1 else "-"
        table.append(cells)
    lines.append(report.markdown_table(table, ["mult", *map(fmt, values), "best value",
                                               "max - min"]))
    lines += ["Learning-rate sweep (optimum: grid minimum; `fit`: parabola in log2(lr)):", ""]
    table = []
    for r in lr_rows:
        cells = {"mults": "all 1" if r["mult"] == "default" else f"{r['mult']}={fmt(r['value'])}",
                 "best lr": r["best_lr"] and fmt(r["best_lr"]) + (" (edge)" if r["edge"] else ""),
                 "fit lr": r["fit_lr"] and f"{r['fit_lr']:.3g}"}
        cells.update({fmt(lr): _cell(y, s) for lr, y, s in zip(args.lr_values, r["losses"],
                                                               r["statuses"])})
        table.append(cells)
    lines.append(report.markdown_table(table, ["mults", *map(fmt, args.lr_values), "best lr",
                                               "fit lr"]))
    if len(lr_rows) > 1 and lr_rows[0]["best_lr"]:
        ref = lr_rows[0]
        for r in lr_rows[1:]:
            if r["best_lr"]:
                lines.append(f"- {r['mult']}={fmt(r['value'])}: optimum lr moves "
                             f"{math.log2(r['best_lr'] / ref['best_lr']):+g} octaves (grid)"
                             + (f", {math.log2(r['fit_lr'] / ref['fit_lr']):+.2f} (fit)"
                                if r["fit_lr"] and ref["fit_lr"] else "") + ".")
        lines.append("")
    step_s = sorted(r["step_s"] for r in rows if r["step_s"])
    lines.append((f"Median step time: {step_s[len(step_s) // 2]:.3f} s. " if step_s else "")
                 + lr_transfer.timing(args, rows))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return lr_transfer.experiment_main("umup_mults", argv, parse_args,
                                       lambda args: [p for *_, p in settings(args)], build_report)


if __name__ == "__main__":
    sys.exit(main())
