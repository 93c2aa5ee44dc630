r"""Low precision without loss scaling: the unit-scaling paper's table, in miniature.

  python -m experiments.low_precision                  # tiny BERT, 14 runs (~20 min idle, 48 min busy, 2 cores)
  python -m experiments.low_precision --print          # the train.py commands, one a line
  python -m experiments.low_precision --report_only    # table + figure from the runs so far
  python -m experiments.low_precision --config configs/bert.py:mini --steps 2000 \
      --precisions fp32,fp16,fp8
  python -m experiments.low_precision --config configs/causal_lm.py:tiny --variants sp,sp+ls,umup \
      --precisions fp32,fp16,fp8                       # the causal LM, 8 runs

A model (`--config FILE.py:ARG`, default `configs/bert.py:tiny`: BERT, MLM+NSP on the
embedded King James Bible; `configs/causal_lm.py:tiny`: the decoder-only LM on the same
text; the variant and precision are appended to ARG) trains in each
precision (`precision=fp32|bf16|fp16|fp8`; fp8 = E4M3 forward operands and E5M2
output gradients of every linear layer, simulated) in four variants, each at its
config's default peak lr (the lr column of the config file's PARAMETRIZATIONS):

- `sp`: standard parametrization, no loss scaling;
- `sp+ls`: the same with a loss scale of 2^15 (`config.train.loss_scale_value`):
  `--loss_scale static` (the default) multiplies the loss by it; `dynamic` (jmp)
  halves it and skips the step on non-finite gradients, which matters only on
  overflow (it doubles after 2000 good steps, beyond a short run). Only in the
  precisions of `--ls_precisions` (fp16, fp8: fp32 and bf16 have float32's exponent
  range, where a loss scale changes nothing). The recorded results use static.
- `unit` (unit scaling) and `umup` (u-μP), no loss scaling.

The claim under test (Blake et al. 2023, Table 2): SP without loss scaling degrades or
fails in FP16/FP8 (gradients underflow), a loss scale recovers it, and unit scaling
trains in FP16/FP8 without one, close to its FP32 result. So each run is compared with
the *same variant in fp32*, not with the other variants (u-μP BERT stalls at the
unigram stage even in fp32: docs/results.md).

Runs go to `--runs_dir` (default `runs/low_precision/SIZE-STEPSsteps` for
`configs/bert.py:SIZE`, else `runs/low_precision/STEM_ARG-STEPSsteps`, e.g.
`causal_lm_tiny-150steps`), one directory
per run named as `experiments.sweep` names grid points; finished runs are skipped, so
an interrupted sweep resumes, and deleting some run directories (say the umup ones)
reruns just those. A run that stops on a non-finite loss (`NonFiniteLossError`: the
trainer exits non-zero and `metrics.jsonl` ends at the last good logged step) is
marked failed by `sweep.run_one` (`RUN/failed`), reported as diverged from its
`train.log`, and not retried unless `--retry_failed`; the sweep goes on. Arguments after `--` go to every run (e.g.
`-- --config.train.rms_every=10`; they are not part of the run names).

Outputs (`--out`, default `experiments/results/low_precision` for BERT, else
`experiments/results/low_precision/STEM_ARG`, e.g. `.../causal_lm_tiny`): `results.md`
(final eval loss and accuracy, variant x precision, and one row per run), `results.json`,
and `loss_curves.png` (train loss and accuracy vs step, one panel per precision, the fp32
curve of each variant dotted for reference). The accuracy is BERT's MLM accuracy
(`*/mlm_accuracy`) where the runs logged it, else the model's `*/accuracy` (next-token
accuracy for the causal LM).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import report, sweep
from unit_scaling.train.rundir import RunDir

VARIANTS = ("sp", "sp+ls", "unit", "umup")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
LOSS_SCALES = ("static", "dynamic")
LOG_FILE = RunDir.LOG
LABELS = {"sp": "SP", "sp+ls": "SP + loss scale", "unit": "unit scaling", "umup": "u-μP"}
COLORS = {"sp": "tab:red", "sp+ls": "tab:orange", "unit": "tab:blue", "umup": "tab:green"}
DEFAULT_CONFIG = "configs/bert.py:tiny"
DEFAULT_OUT = os.path.join(sweep.ROOT, "experiments", "results", "low_precision")
MODEL_NAMES = {"bert": "BERT", "causal_lm": "causal LM"}  # config file stem -> name


def config_parts(config: str) -> tuple[str, str]:
    """`"configs/causal_lm.py:tiny"` -> `("causal_lm", "tiny")`: the config file's stem
    and its argument ("" if none)."""
    path, _, arg = config.partition(":")
    return os.path.splitext(os.path.basename(path))[0], arg


def accuracy_metric(rows: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The accuracy the runs logged, as (metric name, label): BERT's
    `("mlm_accuracy", "MLM accuracy")` if any row has it, else `("accuracy", "accuracy")`
    (the causal LM's next-token accuracy)."""
    if any(k.endswith("/mlm_accuracy") for row in rows for k in row):
        return "mlm_accuracy", "MLM accuracy"
    return "accuracy", "accuracy"


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the sweep: its variant, precision and `train.py` command."""

    variant: str
    precision: str
    name: str  # directory name under the runs directory (sweep.run_name of its point)
    workdir: str
    cmd: tuple[str, ...]


def split_list(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    """`"fp32,fp16"` -> `["fp32", "fp16"]`, in the order of `allowed`; a ValueError
    naming the flag and the valid values for anything else."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"{flag}={text!r}: use a comma list of {', '.join(allowed)}")
    return [a for a in allowed if a in items]


def grid_point(variant: str, precision: str, loss_scale: str = "static") -> dict[str, str]:
    """The `experiments.sweep` point of one run: config-argument keys plus, for the
    loss-scaled SP baseline, the `config.train.loss_scale` override."""
    point = {"param": variant.removesuffix("+ls"), "precision": precision}
    if variant.endswith("+ls"):
        point["config.train.loss_scale"] = loss_scale
    return point


def train_flags(steps: int, log_every: int, eval_batches: int, rms_every: int = 0) -> list[str]:
    """Overrides shared by every run: length, logging (with the per-tensor RMS of
    params, grads and updates every `rms_every` steps: the step computes them anyway),
    one evaluation at the end, no intermediate checkpoints (a run is short; it
    restarts rather than resumes)."""
    return [f"--config.train.steps={steps}", f"--config.train.log_every={log_every}",
            f"--config.train.rms_every={rms_every}",
            f"--config.train.eval_every={steps}", f"--config.train.eval_batches={eval_batches}",
            "--config.train.checkpoint_every=0"]


def plan(config: str, steps: int, precisions: Sequence[str], variants: Sequence[str],
         runs_dir: str, loss_scale: str = "static", ls_precisions: Sequence[str] = ("fp16", "fp8"),
         log_every: int = 10, eval_batches: int = 10, extra: Sequence[str] = (),
         rms_every: int = 50) -> list[Run]:
    """Every run of `config` (`FILE.py[:ARG]`), precision-major; `sp+ls` only in
    `ls_precisions`."""
    flags = train_flags(steps, log_every, eval_batches, rms_every) + list(extra)
    runs = []
    for precision in precisions:
        for variant in variants:
            if variant.endswith("+ls") and precision not in ls_precisions:
                continue
            point = grid_point(variant, precision, loss_scale)
            name = sweep.run_name(point)
            workdir = os.path.join(runs_dir, name)
            runs.append(Run(variant, precision, name, workdir,
                            tuple(sweep.command(config, point, workdir, flags))))
    return runs


# ------------------------------------------------------------------------ running


def status(workdir: str) -> str:
    """"ok" (logged its last step), "diverged" (stopped on a non-finite loss),
    "failed" (exited non-zero otherwise), "incomplete" (started, not finished, no
    recorded exit: still running, killed, or run elsewhere) or "missing"."""
    if sweep.finished(workdir):
        return "ok"
    if RunDir(workdir).diverged():
        return "diverged"
    if sweep.failed(workdir):
        return "failed"
    if RunDir(workdir).metrics_path.exists():
        return "incomplete"
    return "missing"


def run_all(runs: Sequence[Run], retry_failed: bool = False) -> None:
    """Runs every run that is not finished (and, unless `retry_failed`, did not
    already diverge or fail) with `sweep.run_one`, carrying on past failures."""
    for i, run in enumerate(runs, 1):
        failed_marker = RunDir(run.workdir).failed_path
        if retry_failed and failed_marker.exists():
            failed_marker.unlink()
        print(f"[{i}/{len(runs)}] {run.name}", flush=True)
        if sweep.run_one(list(run.cmd), run.workdir, keep_going=True, log_name=LOG_FILE) != "ok":
            print(f"[{i}/{len(runs)}] {run.name}: {status(run.workdir)}", flush=True)


# ------------------------------------------------------------------------ report


def _number(value: Any) -> float | None:
    """Floats as logged; the trainer writes NaN/inf as strings ("nan")."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def collect_rows(runs: Sequence[Run], runs_dir: str) -> list[dict]:
    """One row per planned run: variant, precision, status, the last logged metrics
    (via `sweep.collect`) and the step where a diverged run was caught."""
    last = {row["run"]: row for row in (sweep.collect(runs_dir) if os.path.isdir(runs_dir) else [])}
    rows = []
    for run in runs:
        state = status(run.workdir)
        metrics = last.get(run.name, {})
        run_dir = RunDir(run.workdir)
        train = run_dir.read_config().train.to_dict() if run_dir.has_config() else {}
        history = run_dir.read_metrics()
        train_steps = [m["step"] for m in history if "train/loss" in m]
        row = {"run": run.name, "variant": run.variant, "precision": run.precision,
               "status": state, "last_step": max(train_steps, default=0),
               "steps": train.get("steps"), "lr": train.get("lr"),
               "loss_scale": train.get("loss_scale")}
        if state == "diverged" and train.get("log_every"):
            # The loop checks for NaN at logging steps: the first bad step lies after
            # the last logged one and no later than the next logging step.
            row["nonfinite_by_step"] = min(row["last_step"] + train["log_every"],
                                           train.get("steps") or 10**9)
        rms_rows = [m for m in history if any(k.startswith("rms/grads/") for k in m)]
        if rms_rows:  # gradients that underflowed to exactly zero (fp8: E5M2 flushes < 2^-16)
            grads = {k: v for k, v in rms_rows[-1].items() if k.startswith("rms/grads/")}
            row["zero_grad_tensors"] = f"{sum(_number(v) == 0.0 for v in grads.values())}/{len(grads)}"
            row["rms_step"] = rms_rows[-1]["step"]
        for key in ("train/loss", "train/mlm_accuracy", "train/accuracy", "train/loss_scale",
                    "train/grads_finite", "eval/loss", "eval/mlm_loss", "eval/mlm_accuracy",
                    "eval/accuracy", "eval/nsp_accuracy", "perf/step_s"):
            if key in metrics:
                row[key] = _number(metrics[key])
        if state != "ok":  # an eval from a run that did not finish is not its final one
            for key in [k for k in row if k.startswith("eval/")]:
                del row[key]
        rows.append(row)
    return rows


def _cell(row: Mapping[str, Any] | None, reference: Mapping[str, Any] | None,
          accuracy: str = "mlm_accuracy") -> str:
    """`eval loss (Δ vs fp32) / eval accuracy`, or why there is none."""
    if row is None:
        return ""
    state = row["status"]
    if state == "diverged":
        return f"**non-finite** (by step {row.get('nonfinite_by_step', '?')})"
    if state != "ok":
        return state
    loss, acc = row.get("eval/loss"), row.get(f"eval/{accuracy}")
    if loss is None:
        return "no eval"
    text = f"{loss:.3f}"
    ref = reference.get("eval/loss") if reference and reference.get("status") == "ok" else None
    if ref is not None and reference is not row:
        text += f" ({loss - ref:+.3f})"
    if acc is not None:
        text += f" / {acc:.1%}"
    return text


def tables(rows: Sequence[Mapping[str, Any]], precisions: Sequence[str],
           variants: Sequence[str]) -> str:
    """The variant x precision table and the per-run table, as markdown."""
    accuracy, label = accuracy_metric(rows)
    by = {(r["variant"], r["precision"]): r for r in rows}
    grid = []
    for variant in variants:
        line = {"variant": LABELS.get(variant, variant)}
        for precision in precisions:
            reference = by.get((variant.removesuffix("+ls"), "fp32"))
            line[precision] = _cell(by.get((variant, precision)), reference, accuracy)
        grid.append(line)
    text = ("Final eval loss (difference to the same parametrization in fp32) / eval "
            f"{label}. SP + loss scale is compared with SP in fp32; an empty cell is a run "
            "not in the sweep.\n\n")
    text += report.markdown_table(grid, ["variant", *precisions])
    nsp = ["eval/nsp_accuracy"] if any("eval/nsp_accuracy" in r for r in rows) else []
    detail = ["run", "status", "lr", "last_step", "train/loss", "eval/loss", f"eval/{accuracy}",
              *nsp, "train/loss_scale", "zero_grad_tensors", "perf/step_s"]
    text += ("\nEvery run (train loss and loss scale at the last logged step; "
             "zero_grad_tensors: parameters whose whole gradient was exactly 0 at the last "
             "step with per-tensor RMS logged):\n\n")
    text += report.markdown_table(rows, detail, {
        "lr": "g", "train/loss": ".3f", "eval/loss": ".3f", f"eval/{accuracy}": ".3f",
        "eval/nsp_accuracy": ".3f", "train/loss_scale": "g", "perf/step_s": ".2f"})
    return text


def figure(runs: Sequence[Run], rows: Sequence[Mapping[str, Any]], path: str) -> str:
    """Train loss (top) and train accuracy (bottom; `accuracy_metric`) vs step, one column per
    precision, one line per variant; the fp32 run of each variant dotted in the others;
    an x where a diverged run's log ends."""
    import matplotlib.pyplot as plt

    precisions = list(dict.fromkeys(r.precision for r in runs))
    accuracy, label = accuracy_metric(rows)
    state = {r["run"]: r["status"] for r in rows}
    history = {r.name: RunDir(r.workdir).read_metrics() for r in runs}
    fp32 = {r.variant: r for r in runs if r.precision == "fp32"}
    fig, axes = plt.subplots(2, len(precisions), figsize=(4.2 * len(precisions), 6.4),
                             squeeze=False, sharey="row")
    for col, precision in enumerate(precisions):
        for row, (key, ylabel) in enumerate((("train/loss", "train loss"),
                                             (f"train/{accuracy}", f"train {label}"))):
            ax = axes[row][col]
            curves, styles = {}, {}
            for run in runs:
                if run.precision != precision:
                    continue
                ref = fp32.get(run.variant.removesuffix("+ls"))
                if precision != "fp32" and ref is not None and run.variant == ref.variant:
                    label = f"{LABELS[run.variant]}, fp32"
                    curves[label] = report.series(history[ref.name], key)
                    styles[label] = {"color": COLORS[run.variant], "linestyle": ":", "alpha": 0.6,
                                         "linewidth": 1}
                label = LABELS[run.variant] + {"diverged": " (non-finite)",
                                               "ok": ""}.get(state.get(run.name), " (unfinished)")
                curves[label] = report.series(history[run.name], key)
                styles[label] = {"color": COLORS[run.variant], "linewidth": 1.6}
                if state.get(run.name) == "diverged" and curves[label][0]:
                    ax.plot(curves[label][0][-1], curves[label][1][-1], "x", markersize=10,
                            color=COLORS[run.variant])
            report.plot_curves(ax, curves, ylabel if col == 0 else "",
                               title=precision if row == 0 else "",
                               style=lambda label, styles=styles: styles[label])
            if row == 1:
                ax.set_xlabel("step")
    return report.save_figure(fig, path)


# ------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = sweep.split_train_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="FILE.py:ARG, e.g. configs/bert.py:mini or configs/causal_lm.py:tiny")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--loss_scale", default="static", choices=LOSS_SCALES,
                        help="the loss scale of the sp+ls variant")
    parser.add_argument("--ls_precisions", default="fp16,fp8",
                        help="precisions that get the sp+ls variant")
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--eval_batches", type=int, default=10)
    parser.add_argument("--rms_every", type=int, default=50,
                        help="log per-tensor RMS every N steps (a multiple of --log_every)")
    parser.add_argument("--runs_dir", default=None,
                        help="default runs/low_precision/SIZE-STEPSsteps (BERT) or "
                        "STEM_ARG-STEPSsteps")
    parser.add_argument("--out", default=None, help="results.{md,json} and the figure; default "
                        f"{os.path.relpath(DEFAULT_OUT, sweep.ROOT)} (BERT) or .../STEM_ARG")
    parser.add_argument("--print", action="store_true", help="print the commands only")
    parser.add_argument("--report_only", action="store_true",
                        help="collect and plot the existing runs; train nothing")
    parser.add_argument("--retry_failed", action="store_true",
                        help="rerun runs recorded as diverged or failed")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        parser.error("--steps and --log_every must be positive")
    try:
        args.precisions = split_list(args.precisions, PRECISIONS, "--precisions")
        args.variants = split_list(args.variants, VARIANTS, "--variants")
        args.ls_precisions = split_list(args.ls_precisions, PRECISIONS, "--ls_precisions")
    except ValueError as e:
        parser.error(str(e))
    stem, arg = config_parts(args.config)
    name = arg if stem == "bert" else "_".join(filter(None, (stem, arg)))  # BERT: as before
    if args.runs_dir is None:
        args.runs_dir = os.path.join(sweep.ROOT, "runs", "low_precision",
                                     f"{name}-{args.steps}steps")
    if args.out is None:
        args.out = DEFAULT_OUT if stem == "bert" else os.path.join(DEFAULT_OUT, name)
    return args, extra


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    runs = plan(args.config, args.steps, args.precisions, args.variants, args.runs_dir,
                args.loss_scale, args.ls_precisions, args.log_every, args.eval_batches, extra,
                args.rms_every)
    if args.print:
        for run in runs:
            print(shlex.join(run.cmd))
        return 0
    start = time.perf_counter()
    if not args.report_only:
        run_all(runs, args.retry_failed)
    rows = collect_rows(runs, args.runs_dir)
    # The command that makes the results (a report of existing runs makes the same).
    command = shlex.join(["python", "-m", "experiments.low_precision",
                          *(a for a in argv if a != "--report_only")])
    stem, arg = config_parts(args.config)
    path = args.config.partition(":")[0]
    markdown = (f"{MODEL_NAMES.get(stem, stem)} `{arg}` ({path}), {args.steps} steps per run, each "
                "variant at its config's default peak lr; fp8 = simulated E4M3 forward / "
                "E5M2 gradients on the linear layers. Figure: `loss_curves.png`.\n\n"
                + tables(rows, args.precisions, args.variants))
    paths = report.write_results(args.out, rows, markdown, command)
    figure_path = figure(runs, rows, os.path.join(args.out, "loss_curves.png"))
    print(markdown)
    print(f"wrote {paths['md']}, {paths['json']}, {figure_path} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
