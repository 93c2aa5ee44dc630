r"""Smaller after training: 8-bit weights, an 8-bit KV cache and low-rank projections of
sp and u-μP models (issue #14, items 3-4).

  python -m experiments.quantise --print               # the train.py commands of the runs
  python -m experiments.quantise                       # evaluate them (seed 0: 17 min BERT,
                                                       # 3 min per causal LM, 2 cores at load 25)
  python -m experiments.quantise --models bert_tiny --seeds 0 --low_rank_seeds 0

The runs (`--runs_dir`, default `runs/quantise`): tiny BERT (`configs/bert.py:tiny`, 600
steps) and the tiny causal LM (`configs/causal_lm.py:tiny`, `--causal_steps` 100 of its
1000, to fit the box), each under sp and umup, seeds `--seeds`. Both parametrizations
use the same architecture: pre-norm RMSNorm, SwiGLU, RoPE, no biases (BERT's sp gets
`configs/bert.py`'s PRE_NORM overrides; the causal LM has it already). mini BERT
(`configs/bert.py:mini`, 5000 steps) is in `--models` but not in the default grid: it
does not train in this box's time.

For every run (`unit_scaling.evaluate.Evaluator`, the code of `python -m
unit_scaling.evaluate`): eval loss and accuracy (MLM accuracy for BERT, next-token
accuracy for the causal LM) over `--eval_batches` held-out batches with
- weights fp32 (as trained), bf16, fp8 (E4M3) and int8, each 8-bit format with
  (a) a plain cast (`--scales none`; int8: the fixed scale 4/127, i.e. +-4 sigma of a
  unit-RMS tensor) and (b) per-channel absmax scales;
- the causal LM's KV cache in fp8 and int8, (a) and (b) (scales per token and head);
- for the seeds in `--low_rank_seeds`: the attention and MLP projections at rank
  fractions `--rank_fractions` of min(fan_in, fan_out), without and with a
  `--finetune_steps` fine-tune (relative Adam, `compress.recover`; none with
  `--finetune_steps 0`), and the same fine-tune of the dense model (rank 1) as the
  control.

The claim under test (#14): u-μP models lose less than SP under a plain cast, because
their weights sit near RMS 1 while SP's (std ~0.02) sit in E4M3's subnormals and on a
handful of int8 steps. Outputs in `--out` (default `experiments/results/quantise`):
`results.json`, `results.md` (tables below) and `low_rank.png` (eval loss against the
projections' parameter count). Rows of runs outside the grid asked for are kept from
an earlier `results.json` in `--out`, with their commands, so the grid can be
evaluated in parts as its runs finish.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

from experiments import report

PRE_NORM_FLAGS = ("--config.model.norm_position=pre --config.model.norm=rms_norm "
                  "--config.model.activation=swiglu --config.model.position=rope "
                  "--config.model.use_bias=false")
# name -> (config ARG prefix, extra train.py flags, extra flags for sp)
MODELS = {
    "bert_tiny": ("configs/bert.py:tiny", "", PRE_NORM_FLAGS),
    "bert_mini": ("configs/bert.py:mini", "", PRE_NORM_FLAGS),
    "clm_tiny": ("configs/causal_lm.py:tiny", "--config.train.steps={causal_steps}", ""),
}
QUANT = [("fp32", "none"), ("bf16", "none"), ("fp8", "none"), ("fp8", "per_channel"),
         ("int8", "none"), ("int8", "per_channel")]
KV = [("fp8", "none"), ("fp8", "per_channel"), ("int8", "none"), ("int8", "per_channel")]


def run_dir(args, model: str, param: str, seed: int) -> str:
    return os.path.join(args.runs_dir, f"{model}_{param}_s{seed}")


def train_command(args, model: str, param: str, seed: int) -> str:
    config, extra, sp_extra = MODELS[model]
    flags = extra.format(causal_steps=args.causal_steps)
    if param == "sp":
        flags += " " + sp_extra
    return (f"nice -n 10 {sys.executable} train.py --config {config},param={param},seed={seed}"
            f" --workdir {run_dir(args, model, param, seed)} {flags}").strip()


def evaluate_run(args, model: str, param: str, seed: int) -> list[dict]:
    from unit_scaling.compress import Compression
    from unit_scaling.evaluate import Evaluator

    evaluator = Evaluator(run_dir(args, model, param, seed), args.eval_batches)
    base = dict(model=model, param=param, seed=seed, step=evaluator.step)
    grid = [("weights", Compression(weights=w, scales=s)) for w, s in QUANT]
    if model.startswith("clm"):
        grid += [("kv_cache", Compression(kv_cache=k, scales=s)) for k, s in KV]
    if seed in args.low_rank_seeds:
        for fraction in args.rank_fractions:
            grid.append(("low_rank", Compression(rank_fraction=fraction)))
        for fraction in (*args.rank_fractions, 1.0) if args.finetune_steps else ():
            grid.append(("low_rank", Compression(rank_fraction=fraction,
                                                 finetune_steps=args.finetune_steps)))
    rows = []
    try:
        for kind, c in grid:
            start = time.perf_counter()
            row = dict(base, kind=kind, weights=c.weights, scales=c.scales,
                       kv_cache=c.kv_cache, rank_fraction=c.rank_fraction,
                       finetune_steps=c.finetune_steps, **evaluator(c))
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
            print({k: v for k, v in row.items() if k not in base}, flush=True)
    finally:
        evaluator.close()
    reference = rows[0]["loss"]  # fp32 weights, first in the grid
    for row in rows:
        row["delta_loss"] = row["loss"] - reference
    return rows


def _label(row: dict) -> str:
    if row["kind"] == "weights":
        return row["weights"] + ("" if row["weights"] in ("fp32", "bf16") else
                                 " plain" if row["scales"] == "none" else " per-ch")
    if row["kind"] == "kv_cache":
        return f"KV {row['kv_cache']} " + ("plain" if row["scales"] == "none" else "per-ch")
    ft = f" +{row['finetune_steps']} ft" if row["finetune_steps"] else ""
    return f"rank {row['rank_fraction']:g}{ft}"


def markdown(rows: list[dict]) -> str:
    """Per model and parametrization: each compression's eval loss change against fp32
    weights (one column per seed), the accuracy, the weights' bytes."""
    out = []
    for kind, title in (("weights", "Weight-only quantisation"),
                        ("kv_cache", "KV cache in 8 bits (causal LM)"),
                        ("low_rank", "Low-rank projections")):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        seeds = sorted({r["seed"] for r in chosen})
        table = {}
        for r in chosen:
            key = (r["model"], r["param"], _label(r))
            entry = table.setdefault(key, dict(model=r["model"], param=r["param"],
                                               compression=_label(r)))
            entry[f"d_loss s{r['seed']}"] = r["delta_loss"]
            entry[f"loss s{r['seed']}"] = r["loss"]
            entry[f"acc s{r['seed']}"] = r["accuracy"]
            entry["weight MB"] = r["weight_bytes"] / 1e6
            entry["KV B/token"] = r.get("kv_bytes_per_token")
            entry["proj params"] = r["projection_params"]
            entry["params"] = r["params"]
        columns = ["model", "param", "compression",
                   *[f"{c} s{s}" for c in ("loss", "d_loss", "acc") for s in seeds]]
        columns += [{"low_rank": "proj params", "kv_cache": "KV B/token"}.get(kind, "weight MB")]
        fmt = {c: ".3f" for c in columns if c.startswith(("loss", "d_loss", "acc"))}
        fmt["weight MB"] = ".3f"
        out.append(f"### {title}\n\n" + report.markdown_table(list(table.values()), columns, fmt))
    return "\n".join(out)


def plot_low_rank(rows: list[dict], path: str) -> Optional[str]:
    import matplotlib.pyplot as plt

    chosen = [r for r in rows if r["kind"] == "low_rank" or
              (r["kind"] == "weights" and r["weights"] == "fp32" and r["seed"] in
               {x["seed"] for x in rows if x["kind"] == "low_rank"})]
    models = sorted({r["model"] for r in chosen if r["kind"] == "low_rank"})
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        curves = {}
        seeds = sorted({r["seed"] for r in chosen if r["model"] == model})
        for param in ("sp", "umup"):
            for tuned in (False, True):
                for seed in seeds:  # one curve per seed: pooling seeds would zigzag
                    pts = sorted((r["projection_params"], r["loss"]) for r in chosen
                                 if r["model"] == model and r["param"] == param
                                 and r["seed"] == seed
                                 and bool(r.get("finetune_steps")) == tuned
                                 and (r["kind"] == "low_rank" or not tuned))
                    if pts:
                        curves[f"{param}{' + fine-tune' if tuned else ''} s{seed}"] = (
                            [p for p, _ in pts], [v for _, v in pts])
        report.plot_curves(ax, curves, "eval loss", model)
        ax.set_xlabel("attention + MLP projection parameters")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1e3:.0f}k")
    return report.save_figure(fig, path)


def merge_previous(out: str, rows: list[dict], grid: list, command: str):
    """`(rows, commands)`: these rows plus those of an earlier `results.json` in `out`
    for runs outside this grid (so the grid can be evaluated in parts as runs finish),
    and the commands that made them."""
    path = os.path.join(out, "results.json")
    if not os.path.exists(path):
        return rows, [command]
    with open(path) as f:
        previous = json.load(f)
    done = {(m, p, s) for m, p, s in grid}
    kept = [r for r in previous["rows"] if (r["model"], r["param"], r["seed"]) not in done]
    commands = [c for c in previous["command"].split(" ; ") if c != command] if kept else []
    return kept + rows, commands + [command]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert_tiny,clm_tiny")
    parser.add_argument("--params", default="sp,umup")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--low_rank_seeds", default="0")
    parser.add_argument("--rank_fractions", default="0.5,0.25")
    parser.add_argument("--finetune_steps", type=int, default=50)
    parser.add_argument("--eval_batches", type=int, default=10)
    parser.add_argument("--causal_steps", type=int, default=100)
    parser.add_argument("--runs_dir", default="runs/quantise")
    parser.add_argument("--out", default="experiments/results/quantise")
    parser.add_argument("--print", action="store_true", help="print the train commands")
    parser.add_argument("--train", action="store_true", help="train missing runs first")
    parser.add_argument("--report_only", action="store_true",
                        help="rewrite results.md and low_rank.png from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, "results.json")) as f:
            previous = json.load(f)
        report.write_results(args.out, previous["rows"], markdown(previous["rows"]),
                             previous["command"])
        plot_low_rank(previous["rows"], os.path.join(args.out, "low_rank.png"))
        return
    args.low_rank_seeds = [int(s) for s in args.low_rank_seeds.split(",") if s]
    args.rank_fractions = [float(f) for f in args.rank_fractions.split(",")]
    grid = [(m, p, int(s)) for m in args.models.split(",") for s in args.seeds.split(",")
            for p in args.params.split(",")]
    for m in {m for m, _, _ in grid} - set(MODELS):
        parser.error(f"--models: unknown {m!r}; use some of {sorted(MODELS)}")
    if args.print:
        print("\n".join(train_command(args, *g) for g in grid))
        return
    rows, missing = [], []
    for g in grid:
        if not os.path.isdir(os.path.join(run_dir(args, *g), "checkpoints")):
            if not args.train:
                missing.append(run_dir(args, *g))
                continue
            subprocess.run(shlex.split(train_command(args, *g)), check=True)
        rows += evaluate_run(args, *g)
    command = "python -m experiments.quantise " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows, commands = merge_previous(args.out, rows, grid, command)
    text = markdown(rows)
    if missing:
        text += "\nNot run (no checkpoint): " + ", ".join(missing) + "\n"
    paths = report.write_results(args.out, rows, text, " ; ".join(commands))
    plot = plot_low_rank(rows, os.path.join(args.out, "low_rank.png"))
    print(text)
    print("wrote", *paths.values(), plot or "")


if __name__ == "__main__":
    main()
