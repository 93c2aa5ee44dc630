r"""Scales at init: how far from RMS 1 every tensor of BERT and the causal LM starts,
under standard parametrization (sp), unit scaling (unit) and u-μP (umup), fp32.

  python -m experiments.scales_at_init      # defaults below: ~17 min, 11 GB peak on 2 busy CPUs
  python -m experiments.scales_at_init --reuse    # re-summarise the records left in --runs
  python -m experiments.scales_at_init --models bert --batch_size 8 --seq_len 512   # a GPU
  python -m experiments.scales_at_init --models mine=configs/bert.py:tiny \
      --out /tmp/scales -- --config.model.num_layers=1    # any config; overrides after --

For each model (`bert`: configs/bert.py:base; `causal_lm`: configs/causal_lm.py:125m;
or `NAME=FILE.py:ARG`) this runs the scale analysis of `unit_scaling.analysis` (its
command line, `--compare param=sp,unit,umup`) on one batch at the config's init:
the RMS of every tracked op output and its gradient, and of every parameter and its
gradient. The per-tensor records go to `--runs` (runs/, not committed); `--out` gets
one compare plot per model (`<model>.png`) and `results.md`/`results.json`: per model and
parametrization, the number of tensors, the share whose RMS lies in [1/2, 2] (forward
values, backward gradients, and both; activations and parameters apart) and the spread
of log2 RMS (std, 5th/95th percentile, min/max).

What it tests (the papers' claim): unit scaling and u-μP start (nearly) every value,
weight and gradient near RMS 1, while SP spreads them over many octaves; SP's gradients
in particular sit far below 1 (the mean loss divides them by the number of predicted
tokens). results.md lists, per model, the activations that stay outside [1/2, 2] under
unit/umup. Zero-initialised tensors (biases, norm offsets) have RMS 0 by design: they
are counted (`zero`) but left out of the shares and spreads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import report, sweep

MODELS = {"bert": "configs/bert.py:base", "causal_lm": "configs/causal_lm.py:125m"}
PARAMS = ("sp", "unit", "umup")
# (column suffix, record filter): the groups the table reports.
GROUPS = {
    "fwd": lambda r: r.kind == "forward" and r.role != "param",
    "bwd": lambda r: r.kind == "backward" and r.role != "param",
    "params": lambda r: r.kind == "forward" and r.role == "param",
    "pgrads": lambda r: r.kind == "backward" and r.role == "param",
    "all": lambda r: True,
}


def summarise(records: Sequence[Any], lo: float = 0.5, hi: float = 2.0) -> dict[str, Any]:
    """Per group of `GROUPS`: `n_<g>` finite non-zero tensors, `in_<g>` the share with
    `lo <= rms <= hi`, `std_<g>`/`p5_<g>`/`p95_<g>`/`min_<g>`/`max_<g>` of log2 RMS;
    plus `tensors` (distinct names), `zero` (records with RMS 0: zero-init, excluded)
    and `nonfinite` (excluded too; should be 0)."""
    row: dict[str, Any] = {"tensors": len({r.name for r in records}),
                           "zero": sum(r.rms == 0 for r in records),
                           "nonfinite": sum(not np.isfinite(r.rms) for r in records)}
    for group, keep in GROUPS.items():
        rms = np.array([r.rms for r in records if keep(r) and np.isfinite(r.rms) and r.rms > 0])
        row[f"n_{group}"] = len(rms)
        if not len(rms):
            continue
        x = np.log2(rms)
        row[f"in_{group}"] = float(np.mean((rms >= lo) & (rms <= hi)))
        row[f"std_{group}"] = float(np.std(x))
        row[f"p5_{group}"], row[f"p95_{group}"] = (float(v) for v in np.percentile(x, [5, 95]))
        row[f"min_{group}"], row[f"max_{group}"] = float(x.min()), float(x.max())
    return row


def outliers(records: Sequence[Any], lo: float = 0.5, hi: float = 2.0, limit: int = 12) -> list[str]:
    """The non-parameter tensors outside [lo, hi] (zero ones left out), grouped over
    layers (`layer_3/attn_out` -> `layer_*/attn_out`), farthest first."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.role == "param" or not (np.isfinite(r.rms) and r.rms > 0) or lo <= r.rms <= hi:
            continue
        parts = [p if not p.startswith("layer_") or not p[6:].isdigit() else "layer_*"
                 for p in r.name.split("/")]
        groups.setdefault(("/".join(parts), r.kind), []).append(float(np.log2(r.rms)))
    ranked = sorted(groups.items(), key=lambda kv: -max(abs(v) for v in kv[1]))
    short = {"forward": "fwd", "backward": "bwd"}
    return [f"{name} ({short[kind]}, {len(v)}x): log2 RMS {min(v):.1f}..{max(v):.1f}"
            if len(v) > 1 else f"{name} ({short[kind]}): log2 RMS {v[0]:.1f}"
            for (name, kind), v in ranked[:limit]]


def analyse_model(spec: str, runs_dir: str, batch_size: int, seq_len: int | None,
                  max_rows: int, extra: Sequence[str], params: Sequence[str] = PARAMS,
                  reuse: bool = False) -> tuple[dict[str, list], str, float]:
    """Runs the analysis command line on `spec` for every parametrization; returns
    ({param: records}, path of the compare plot, seconds). `reuse`: read the records
    and plot an earlier run left in `runs_dir` instead (seconds: that run's)."""
    from unit_scaling.analysis import cli, from_json

    timing = os.path.join(runs_dir, "seconds.txt")
    if reuse:
        with open(timing) as f:
            seconds = float(f.read())
        return ({p: from_json(os.path.join(runs_dir, f"scales_param_{p}.json")) for p in params},
                os.path.join(runs_dir, "scales.png"), seconds)
    start = time.time()
    argv = ["--config", spec, "--compare", f"param={','.join(params)}",
            "--batch_size", str(batch_size), "--out", runs_dir, "--max_rows", str(max_rows),
            "--config.precision=fp32"]
    if seq_len:
        argv.append(f"--config.data.seq_len={seq_len}")
    paths = cli.main([*argv, *extra])
    seconds = time.time() - start
    with open(timing, "w") as f:
        f.write(f"{seconds:.1f}\n")
    return {p: from_json(paths[f"json:param={p}"]) for p in params}, paths["png"], seconds


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "experiments.scales_at_init", *argv])
    argv, extra = sweep.split_train_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma list of {sorted(MODELS)} or NAME=FILE.py:ARG")
    parser.add_argument("--params", default=",".join(PARAMS), help="parametrizations")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128, help="0: the config's")
    parser.add_argument("--max_rows", type=int, default=0, help="plot rows per model (0: all)")
    parser.add_argument("--out", default="experiments/results/scales_at_init")
    parser.add_argument("--runs", default="runs/scales_at_init", help="per-tensor records")
    parser.add_argument("--reuse", action="store_true",
                        help="summarise the records an earlier run left in --runs")
    args = parser.parse_args(argv)

    rows, notes = [], []
    for item in args.models.split(","):
        name, _, spec = item.partition("=")
        spec = spec or MODELS[name]
        runs, png, seconds = analyse_model(
            spec, os.path.join(args.runs, name), args.batch_size, args.seq_len or None,
            args.max_rows, extra, args.params.split(","), args.reuse)
        os.makedirs(args.out, exist_ok=True)
        shutil.copyfile(png, os.path.join(args.out, f"{name}.png"))
        for param, records in runs.items():
            rows.append({"model": name, "config": spec, "param": param, "seconds": round(seconds),
                         **summarise(records)})
            if param != "sp":
                notes.append(f"- {name} {param}: " + "; ".join(outliers(records) or ["none"]))

    share = {f"in_{g}": ".0%" for g in GROUPS}
    cols = ["model", "param", "tensors", "zero"]
    markdown = (
        f"Scale analysis at init, one batch ({args.batch_size} sequences, seq_len "
        f"{args.seq_len or 'of the config'}), fp32. Share of tensors with RMS in [1/2, 2] "
        "and the spread of log2 RMS; fwd = activation values, bwd = their gradients, "
        "params / pgrads = parameters / their gradients, all = every record. Records with "
        "RMS 0 (zero-initialised biases and offsets, `zero`) are left out; `seconds`: the "
        "analysis of the model (all parametrizations).\n\n"
        "### Share with RMS in [1/2, 2]\n\n"
        + report.markdown_table(rows, cols + [f"in_{g}" for g in GROUPS] + ["seconds"], share)
        + "\n### Spread of log2 RMS: std [5th, 95th percentile] (min, max)\n\n"
        + report.markdown_table(
            [{**r, **{g: _spread(r, g) for g in GROUPS}} for r in rows], cols + list(GROUPS))
        + "\n### Activations outside [1/2, 2] under unit / umup (farthest first)\n\n"
        + "\n".join(notes) + "\n"
        + "\n" + "".join(f"![{m}]({m}.png)\n" for m in dict.fromkeys(r["model"] for r in rows))
    )
    report.write_results(args.out, rows, markdown, command)
    print(markdown)
    return rows


def _spread(row: dict[str, Any], group: str) -> str:
    if f"std_{group}" not in row:
        return "-"
    return (f"{row[f'std_{group}']:.1f} [{row[f'p5_{group}']:.1f}, {row[f'p95_{group}']:.1f}] "
            f"({row[f'min_{group}']:.1f}, {row[f'max_{group}']:.1f})")


if __name__ == "__main__":
    main()
