r"""Parameter dtype under u-μP: do bfloat16 parameters and Adam moments train like float32?

  python -m experiments.param_dtype                    # train (resumes), then report
  python -m experiments.param_dtype --print            # the train.py commands only
  python -m experiments.param_dtype --report_only      # report from runs/param_dtype
  python -m experiments.param_dtype --widths 256,1024 --layers 8 --steps 5000 \
      --seq_len 512 --batch 64 --vocab 8192 --no-fast_compile --print  # bigger, on a GPU

The causal LM under u-μP at two widths (`--widths`, heads at a fixed head dim, `--layers`
layers), trained at its default peak lr (2^-1, `--lr` in log2) with float32 compute, in
each of the `SETTINGS`:

- `fp32`: float32 parameters and Adam moments (the reference);
- `bf16`: bfloat16 parameters (`model.param_dtype`) and moments (`train.moment_dtype`;
  the Adam arithmetic stays float32), updates rounded to nearest into the parameters;
- `bf16_sr`: the same with stochastic rounding of the update (`train.param_rounding`,
  `formats.quantise`): an update below half a bf16 spacing of its parameter is lost
  to nearest rounding (late in a decaying schedule most are), kept in expectation here;
- `bf16_f32_moments` (not in the default list): bf16 parameters, float32 moments.

For every width and seed (`--seeds`, two by default: a difference is claimed only where
both agree) the report gives the loss (mean train loss over the last `--tail` of the
steps; every setting sees the same batches, so the gap to fp32 is paired), the gap to
`fp32`, and the bytes of the parameters and the optimizer state, from the train
state's abstract shapes (`trainer.abstract_state`, no data). Writes `OUT/results.md`,
`OUT/results.json` and `OUT/param_dtype.png` (loss curves per width).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence

from experiments import lr_transfer, report, sweep

SETTINGS = {
    "fp32": {"config.model.param_dtype": "float32"},
    "bf16": {"config.model.param_dtype": "bfloat16", "config.train.moment_dtype": "bfloat16"},
    "bf16_sr": {"config.model.param_dtype": "bfloat16", "config.train.moment_dtype": "bfloat16",
                "config.train.param_rounding": "stochastic"},
    "bf16_f32_moments": {"config.model.param_dtype": "bfloat16",
                         "config.train.moment_dtype": "float32"},
}
DEFAULT_SETTINGS = "fp32,bf16,bf16_sr"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = sweep.split_train_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="64,128", help="d_model of the two sizes")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS,
                        help=f"which of {', '.join(SETTINGS)}")
    parser.add_argument("--seeds", default="0,1", help="seeds (each setting, each width)")
    parser.add_argument("--lr", type=float, default=-1.0, help="log2 of the peak lr")
    lr_transfer.add_common_flags(parser, "param_dtype")
    parser.set_defaults(steps=200, seq_len=64)
    args = parser.parse_args(argv)
    if args.metric == "eval" and not args.eval_batches:
        parser.error("--metric eval needs --eval_batches N > 0")
    args.widths = lr_transfer.parse_ints(args.widths, "--widths")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.settings = [s for s in args.settings.split(",") if s]
    for name in args.settings:
        if name not in SETTINGS:
            parser.error(f"--settings: unknown {name!r}; choose from {', '.join(SETTINGS)}")
    args.extra = extra
    return args, extra


def runs(args: argparse.Namespace) -> list[tuple[int, int, str, dict[str, str]]]:
    """Every run as `(width, seed, setting, point)`; seed-major, so seed 0 finishes first."""
    return [(width, seed, name,
             {"param": "umup", **lr_transfer.width_point(width, args.head_dim, args.mlp_ratio),
              "config.seed": str(seed), "config.train.lr": repr(2.0 ** args.lr),
              **SETTINGS[name]})
            for seed in args.seeds for width in args.widths for name in args.settings]


def points(args: argparse.Namespace) -> list[dict[str, str]]:
    return [point for *_, point in runs(args)]


def state_bytes(workdir: str) -> dict[str, int] | None:
    """Bytes of the parameters and of the optimizer state of the run in `workdir`, from
    its config's abstract train state (no data read); None without a config."""
    import jax
    import numpy as np

    from unit_scaling.train import compile as compile_lib, tasks, trainer as trainer_lib
    from unit_scaling.train.rundir import RunDir

    run_dir = RunDir(workdir)
    if not run_dir.has_config():
        return None
    make_task = functools.partial(tasks.make_task, pipeline=compile_lib.shapes_pipeline)
    trainer = trainer_lib.build(run_dir.read_config(), make_task, devices=jax.devices()[:1])
    trainer.close()
    state = trainer.abstract_state()

    def total(tree) -> int:
        return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))

    return {"params_bytes": total(state.params), "opt_bytes": total(state.opt_state)}


def build_report(args: argparse.Namespace, command: str) -> dict:
    rows, sizes = [], {}
    for width, seed, name, point in runs(args):
        workdir = lr_transfer.point_dir(args, point)
        run = lr_transfer.load_run(workdir, args.tail)
        if (width, name) not in sizes and run["status"] == "done":
            sizes[width, name] = state_bytes(workdir)
        rows.append({"width": width, "seed": seed, "setting": name, "workdir": workdir, **run,
                     "loss": lr_transfer.loss_of(run, args.metric)})
    for r in rows:
        ref = next((f for f in rows if f["setting"] == "fp32" and f["width"] == r["width"]
                    and f["seed"] == r["seed"]), None)
        r["gap"] = (r["loss"] - ref["loss"] if ref and r["loss"] is not None
                    and ref["loss"] is not None else None)
        r.update(sizes.get((r["width"], r["setting"])) or {})
    figure = _plot(args, rows)
    saved = [{k: v for k, v in r.items() if k != "workdir"} for r in rows]
    paths = report.write_results(args.out, saved, _markdown(args, rows), command)
    paths["figure"] = figure
    return {"rows": rows, "paths": paths}


def _plot(args: argparse.Namespace, rows: Sequence[dict]) -> str:
    import matplotlib.pyplot as plt

    from experiments import sweep

    fig, axes = plt.subplots(1, len(args.widths), figsize=(5 * len(args.widths), 4), squeeze=False)
    seed = args.seeds[0]
    for ax, width in zip(axes[0], args.widths):
        curves = {}
        for r in rows:
            if r["width"] == width and r["seed"] == seed and r["status"] == "done":
                steps, losses = report.series(sweep.read_metrics(r["workdir"]), "train/loss")
                k = 10  # a moving average: the per-batch loss is noisy
                curves[r["setting"]] = (steps[k - 1:], [sum(losses[i - k + 1:i + 1]) / k
                                                        for i in range(k - 1, len(losses))])
        report.plot_curves(ax, curves, "train loss (mean of 10 steps)",
                           title=f"u-μP width {width}, seed {seed}")
        ax.set_xlabel("step")
        tail = [v for _, ys in curves.values() for v in ys[len(ys) // 2:]]
        if tail:
            ax.set_ylim(min(tail) - 0.1, max(tail) + 0.3)
    return report.save_figure(fig, os.path.join(args.out, "param_dtype.png"))


def _markdown(args: argparse.Namespace, rows: Sequence[dict]) -> str:
    mean_rows = []
    for width in args.widths:
        for name in args.settings:
            mine = [r for r in rows if r["width"] == width and r["setting"] == name]
            gaps = [r["gap"] for r in mine if r["gap"] is not None]
            losses = [r["loss"] for r in mine if r["loss"] is not None]
            first = mine[0]
            state = (first.get("params_bytes") or 0) + (first.get("opt_bytes") or 0)
            mean_rows.append({
                "width": width, "setting": name,
                "loss (mean)": sum(losses) / len(losses) if losses else None,
                "gap to fp32 per seed": ", ".join(f"{g:+.3f}" for g in gaps) or "-",
                "params MiB": first.get("params_bytes") and first["params_bytes"] / 2**20,
                "opt state MiB": first.get("opt_bytes") and first["opt_bytes"] / 2**20,
                "params+opt MiB": state / 2**20 if state else None,
                "runs": f"{len(losses)}/{len(mine)}"})
    return "\n".join([
        f"Causal LM under u-μP (`{lr_transfer.CONFIG}`"
        + "".join(f" `{e}`" for e in args.extra)
        + f"): widths {', '.join(map(str, args.widths))} (heads of dim {args.head_dim}, "
        f"mlp_dim = {args.mlp_ratio} x d_model), {args.layers} layers, vocab "
        f"{args.vocab}, batch {args.batch} x seq {args.seq_len}, {args.steps} steps (warmup 10%, "
        f"cosine to 0), peak lr 2^{args.lr:g}, float32 compute, seeds "
        f"{', '.join(map(str, args.seeds))}. Loss: mean train loss over the last "
        f"{args.tail:.0%} of the steps; gap = loss - the fp32 run's loss (same width and "
        "seed, same batches). Bytes: the train state's parameters and optimizer state "
        "(Adam's two moments and its step count). Figure: `param_dtype.png`.",
        "",
        report.markdown_table(mean_rows, ["width", "setting", "loss (mean)",
                                          "gap to fp32 per seed", "params MiB",
                                          "opt state MiB", "params+opt MiB", "runs"],
                              {"loss (mean)": ".3f", "params MiB": ".2f",
                               "opt state MiB": ".2f", "params+opt MiB": ".2f"}),
        lr_transfer.timing(args, rows),
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    return lr_transfer.experiment_main("param_dtype", argv, parse_args, points, build_report)


if __name__ == "__main__":
    sys.exit(main())
