r"""A scaling law for u-μP causal LMs, and what u-μP saves over SP in getting one.

  python -m experiments.scaling_law                      # train (resumable), fit, report
  python -m experiments.scaling_law --print              # the train.py commands only
  python -m experiments.scaling_law --report_only        # fit and report from the runs
  python -m experiments.scaling_law --depths 2,4,6,8,12,16,24 --head_dim 64 --mlp_ratio 4 \
      --budgets 2000,4000,8000,16000 --batch 256 --seq_len 1024 --vocab 32768 \
      --sp_depths 2,6,12 --eval_batches 100 --no-fast_compile --print  # a cluster's grid

Sizes grow depth and width together by one rule (`unit_scaling.scaling_law.shape`):
`L` layers, `d_model = head_dim (L + 1)`, `L + 1` heads, `mlp_dim = mlp_ratio d_model`.
The defaults (depths 1-6, head dim 16, MLP ratio 3) span 13.4k to 980k non-embedding
parameters (73x). Every u-μP size trains at the one transferred peak lr (`--umup_lr`,
the config's 0.5, the optimum of `experiments/lr_transfer` at width 32 that holds to
width 256) for each token budget in `--budgets` (steps; tokens = steps x batch x
seq_len). Each budget is a separate run whose schedule (10% warmup, cosine to 0) fits
that budget, as Chinchilla trained them: no intermediate checkpoints of a longer run.

The loss of a run is its eval loss at the last step on `--eval_batches` held-out batches
(the same batches for every run: about one pass over the 2% of the King James Bible held
out). The fit is `unit_scaling.scaling_law.fit` (Chinchilla's Huber fit in log space)
with `--bootstrap` refits on resampled runs for the intervals; held-out check: the fit
without the largest size predicts the largest size's losses.

SP (standard parametrization) trains `--sp_depths` with a per-size lr sweep (`--sp_lrs`,
log2) at the `--sp_tune_steps` budget, then each size's best lr at the other budgets:
the runs u-μP does not need, and the loss at equal compute (same shape, same tokens).

Writes `OUT/fit.json` (the law: read by `python -m unit_scaling.plan`), `OUT/scaling_law.png`,
`OUT/results.md` and `OUT/results.json`. Runs go to `WORKDIR/param=P,model.num_layers=L,...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from experiments import lr_transfer, report, sweep
from experiments.lr_transfer import FAST_COMPILE, SWEEP_LOG, fmt_pow2, load_run, parse_log2, timing
from unit_scaling import scaling_law as sl
from unit_scaling.train.rundir import RunDir

CONFIG = "configs/causal_lm.py:tiny"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = sweep.split_train_flags(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="1,2,3,4,5,6", help="u-μP sizes (layers; width follows)")
    p.add_argument("--head_dim", type=int, default=16, help="d_model = head_dim (layers + 1)")
    p.add_argument("--mlp_ratio", type=int, default=3, help="mlp_dim / d_model")
    p.add_argument("--budgets", default="100,200,400", help="training steps, one run each")
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--umup_lr", type=float, default=0.5, help="the transferred u-μP peak lr")
    p.add_argument("--params", default="umup,sp", help="which parametrizations to train")
    p.add_argument("--sp_depths", default="1,3,5", help="SP sizes (each with an lr sweep)")
    p.add_argument("--sp_lrs", default="-9,-7,-5", help="log2 of the SP peak lrs swept")
    p.add_argument("--sp_tune_steps", type=int, default=0,
                   help="the budget of the SP lr sweep (0: the middle of --budgets)")
    p.add_argument("--eval_batches", type=int, default=24, help="held-out batches per eval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits")
    p.add_argument("--workdir", default="runs/scaling_law", help="one subdirectory per run")
    p.add_argument("--out", default="experiments/results/scaling_law",
                   help="fit.json, results.md, results.json and the figure go here")
    p.add_argument("--print", action="store_true", help="print the commands only")
    p.add_argument("--fast_compile", action=argparse.BooleanOptionalAction, default=True,
                   help="XLA optimisation level 0 (faster compiles on a CPU); "
                        "--no-fast_compile on GPUs/TPUs")
    p.add_argument("--subprocess", action="store_true", help="one train.py process per run")
    p.add_argument("--report_only", action="store_true", help="fit and report the runs there")
    args = p.parse_args(argv)
    args.depths = [int(x) for x in args.depths.split(",")]
    args.sp_depths = [int(x) for x in args.sp_depths.split(",") if x]
    args.budgets = sorted(int(x) for x in args.budgets.split(","))
    args.sp_lrs = parse_log2(args.sp_lrs)
    args.params = args.params.split(",")
    args.sp_tune_steps = args.sp_tune_steps or args.budgets[len(args.budgets) // 2]
    if args.sp_tune_steps not in args.budgets:
        p.error(f"--sp_tune_steps {args.sp_tune_steps} is not one of --budgets {args.budgets}")
    if len(args.depths) < 2 or len(args.budgets) < 2:
        p.error("--depths and --budgets need at least 2 values each for a fit")
    for depth in {*args.depths, *args.sp_depths}:
        sl.shape(depth, args.head_dim, args.mlp_ratio)  # rejects depth < 1
    args.extra = extra
    return args, extra


def point(args, param: str, depth: int, steps: int, lr: float) -> dict[str, str]:
    shape = sl.shape(depth, args.head_dim, args.mlp_ratio)
    return {"param": param, **{f"config.model.{k}": str(v) for k, v in shape.items()},
            "config.train.steps": str(steps), "config.train.lr": repr(lr)}


def overrides(args) -> list[str]:
    """Every run's flags: data shape, per-10-step logging, one eval at the last step
    (`eval_every` beyond any budget: the loop also evaluates at the last step)."""
    return [f"--config.seed={args.seed}", f"--config.train.global_batch_size={args.batch}",
            f"--config.data.seq_len={args.seq_len}", f"--config.data.vocab_size={args.vocab}",
            "--config.train.log_every=10", "--config.train.eval_every=1000000000",
            f"--config.train.eval_batches={args.eval_batches}",
            "--config.train.checkpoint_every=0"]


def umup_points(args) -> list[dict[str, str]]:
    return [point(args, "umup", d, s, args.umup_lr) for d in args.depths for s in args.budgets]


def sp_tune_points(args) -> list[dict[str, str]]:
    return [point(args, "sp", d, args.sp_tune_steps, lr)
            for d in args.sp_depths for lr in args.sp_lrs]


def sp_best_lrs(args) -> dict[int, float]:
    """Each SP depth's best lr of the sweep (by eval loss), where the sweep has a result."""
    best = {}
    for depth in args.sp_depths:
        losses = [load_run(_dir(args, point(args, "sp", depth, args.sp_tune_steps, lr)), 0.25)
                  ["eval_loss"] for lr in args.sp_lrs]
        found = sweep.optimum(args.sp_lrs, losses)
        if found:
            best[depth] = found["x"]
    return best


def sp_budget_points(args) -> list[dict[str, str]]:
    best = sp_best_lrs(args)
    return [point(args, "sp", d, s, best[d]) for d in args.sp_depths if d in best
            for s in args.budgets if s != args.sp_tune_steps]


def _dir(args, p: dict[str, str]) -> str:
    return os.path.join(args.workdir, sweep.run_name(p))


def train(args, extra: Sequence[str], command: str) -> None:
    """u-μP first (the law), then the SP sweep, then SP at its best lrs."""
    stages = []
    if "umup" in args.params:
        stages.append(umup_points)
    if "sp" in args.params:
        stages += [sp_tune_points, sp_budget_points]
    for stage in stages:
        todo = stage(args)
        if stage is sp_budget_points and args.print and len(todo) < len(args.sp_depths) * (
                len(args.budgets) - 1):
            print("# SP at the other budgets runs at each size's best lr of the sweep above; "
                  "rerun with --print once the sweep has finished for those commands")
        run_stage(args, todo, extra, command)


def run_stage(args, todo: Sequence[dict[str, str]], extra: Sequence[str], command: str) -> None:
    """Trains (or prints) `todo` through the sweep runner; logs the wall time of a stage
    that trained anything to `WORKDIR/sweeps.jsonl` (as experiments/lr_transfer does)."""
    if args.fast_compile and not args.print and FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    dirs = [_dir(args, p) for p in todo]
    before = sum(map(sweep.finished, dirs))
    start = time.perf_counter()
    sweep.run_points(CONFIG, todo, args.workdir, [*overrides(args), *extra],
                     print_only=args.print, keep_going=True, log_name=RunDir.LOG,
                     in_process=not args.subprocess)
    trained = sum(map(sweep.finished, dirs)) - before
    if trained and not args.print:
        with open(os.path.join(args.workdir, SWEEP_LOG), "a") as f:
            f.write(json.dumps({"command": command, "wall_s": round(time.perf_counter() - start, 1),
                                "trained": trained, "date": time.strftime("%Y-%m-%d %H:%M")}) + "\n")


# ------------------------------------------------------------------------ report
def collect(args, todo: Sequence[dict[str, str]]) -> list[dict]:
    rows = []
    for p in todo:
        run = load_run(_dir(args, p), 0.25)
        depth, steps = int(p["config.model.num_layers"]), int(p["config.train.steps"])
        n = sl.non_embedding_params(depth, args.head_dim, args.mlp_ratio)
        d = steps * args.batch * args.seq_len
        rows.append({"param": p["param"], "depth": depth, "d_model": int(p["config.model.d_model"]),
                     "steps": steps, "lr": float(p["config.train.lr"]), "N": n, "D": d,
                     "C": 6.0 * n * d, "status": run["status"], "loss": run["eval_loss"],
                     "run_s": run["run_s"], "idle_s": run["idle_s"]})
    return rows


def fit_rows(rows: Sequence[dict], samples: int) -> dict | None:
    """The law and its bootstrap on the finished rows (None if too few for a fit)."""
    done = [r for r in rows if r["loss"] is not None]
    if len(done) < 5 or len({r["N"] for r in done}) < 2 or len({r["D"] for r in done}) < 2:
        return None
    n, d, loss = ([r[k] for r in done] for k in ("N", "D", "loss"))
    law = sl.fit(n, d, loss)
    boot = sl.bootstrap(n, d, loss, samples, start=law) if samples else []
    pred = law.loss(np.array(n, float), np.array(d, float))
    return {"law": law, "bootstrap": boot, "runs": len(done),
            "rms_residual": float(np.sqrt(np.mean((pred - np.array(loss)) ** 2)))}


def held_out(rows: Sequence[dict]) -> dict | None:
    """Fit without the largest size; its error predicting the largest size's losses."""
    done = [r for r in rows if r["loss"] is not None]
    largest = max((r["N"] for r in done), default=None)
    fitted = fit_rows([r for r in done if r["N"] != largest], 0)
    if fitted is None:
        return None
    law = fitted["law"]
    cases = [{"steps": r["steps"], "loss": r["loss"], "predicted": float(law.loss(r["N"], r["D"]))}
             for r in done if r["N"] == largest]
    errors = [c["predicted"] - c["loss"] for c in cases]
    return {"N": largest, "params": law.as_dict(), "cases": cases,
            "mean_abs_error": float(np.mean(np.abs(errors))),
            "mean_rel_error": float(np.mean([abs(e) / c["loss"] for e, c in zip(errors, cases)]))}


def build_report(args, command: str) -> dict:
    umup = collect(args, umup_points(args))
    sp = collect(args, [*sp_tune_points(args), *sp_budget_points(args)])
    fitted = fit_rows(umup, args.bootstrap)
    check = held_out(umup)
    os.makedirs(args.out, exist_ok=True)
    paths = {}
    if fitted:
        done = [r for r in umup if r["loss"] is not None]
        paths["fit"] = os.path.join(args.out, "fit.json")
        sl.save(paths["fit"], fitted["law"], fitted["bootstrap"],
                {"head_dim": args.head_dim, "mlp_ratio": args.mlp_ratio},
                {"config": f"{CONFIG},param=umup", "lr": args.umup_lr,
                 "global_batch_size": args.batch, "seq_len": args.seq_len,
                 "vocab_size": args.vocab},
                {"runs": fitted["runs"], "N": [min(r["N"] for r in done), max(r["N"] for r in done)],
                 "D": [min(r["D"] for r in done), max(r["D"] for r in done)]},
                rms_residual=fitted["rms_residual"], held_out=check, command=command)
    best = sp_best_lrs(args) if "sp" in args.params else {}
    sp_best = [r for r in sp if best.get(r["depth"]) == r["lr"]]
    figure = plot(args, umup, sp_best, fitted)
    md = _markdown(args, umup, sp, sp_best, fitted, check)
    paths.update(report.write_results(args.out, [*umup, *sp], md, command))
    paths["figure"] = figure
    return {"umup": umup, "sp": sp, "fit": fitted, "held_out": check, "paths": paths}


def plot(args, umup: Sequence[dict], sp_best: Sequence[dict], fitted: dict | None) -> str:
    import matplotlib.pyplot as plt

    fig, (ax_n, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2))
    cmap = plt.get_cmap("viridis")
    colour = {s: cmap(i / max(len(args.budgets) - 1, 1) * 0.9) for i, s in enumerate(args.budgets)}
    ns = sorted({r["N"] for r in umup})
    grid_n = np.geomspace(ns[0] / 1.5, ns[-1] * 1.5, 100)
    for steps in args.budgets:
        mine = [r for r in umup if r["steps"] == steps and r["loss"] is not None]
        d = steps * args.batch * args.seq_len
        ax_n.plot([r["N"] for r in mine], [r["loss"] for r in mine], "o", color=colour[steps],
                  label=f"u-μP, D = {d / 1e3:.0f}k tokens")
        if fitted:
            ax_n.plot(grid_n, fitted["law"].loss(grid_n, d), "-", color=colour[steps], lw=1)
        sp_mine = [r for r in sp_best if r["steps"] == steps and r["loss"] is not None]
        if sp_mine:
            ax_n.plot([r["N"] for r in sp_mine], [r["loss"] for r in sp_mine], "x",
                      color=colour[steps], markersize=8, label=f"SP (tuned lr), D = {d / 1e3:.0f}k")
    ax_n.set(xscale="log", xlabel="non-embedding parameters N", ylabel="eval loss",
             title="loss vs N (lines: fitted law)")
    cmap_n = {n: plt.get_cmap("plasma")(i / max(len(ns) - 1, 1) * 0.85) for i, n in enumerate(ns)}
    for n in ns:
        mine = sorted((r for r in umup if r["N"] == n and r["loss"] is not None), key=lambda r: r["C"])
        if not mine:
            continue
        ax_c.plot([r["C"] for r in mine], [r["loss"] for r in mine], "o-", color=cmap_n[n], lw=0.8,
                  markersize=4, label=f"u-μP N = {n / 1e3:.0f}k")
    for n in sorted({r["N"] for r in sp_best}):
        mine = sorted((r for r in sp_best if r["N"] == n and r["loss"] is not None),
                      key=lambda r: r["C"])
        if not mine:
            continue
        ax_c.plot([r["C"] for r in mine], [r["loss"] for r in mine], "x--", color=cmap_n.get(n, "k"),
                  lw=0.8, label=f"SP N = {n / 1e3:.0f}k")
    if fitted:
        # The frontier only where the compute and its optimal N lie in the fitted range.
        cs = [r["C"] for r in umup if r["loss"] is not None]
        frontier = [(c, fitted["law"].compute_optimal(c)) for c in np.geomspace(min(cs), max(cs), 100)]
        frontier = [(c, n, d) for c, (n, d) in frontier if ns[0] <= n <= ns[-1]]
        if frontier:
            beyond = max(d for _, _, d in frontier) > max(r["D"] for r in umup)
            ax_c.plot([c for c, _, _ in frontier],
                      [float(fitted["law"].loss(n, d)) for _, n, d in frontier], "k--", lw=1.5,
                      label="fit: compute-optimal" + (" (D beyond the runs')" if beyond else ""))
    ax_c.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="eval loss",
             title="loss vs compute")
    for ax in (ax_n, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return report.save_figure(fig, os.path.join(args.out, "scaling_law.png"))


def _interval_text(fitted: dict, key: str) -> str:
    lo, hi = sl.interval([getattr(s, key) for s in fitted["bootstrap"]])
    return f"{getattr(fitted['law'], key):.3g} [{lo:.3g}, {hi:.3g}]"


def _markdown(args, umup, sp, sp_best, fitted, check) -> str:
    n_range = [sl.non_embedding_params(d, args.head_dim, args.mlp_ratio) for d in args.depths]
    lines = [
        f"Causal LM (`{CONFIG}`), sizes by the rule `d_model = {args.head_dim} (layers + 1)`, "
        f"heads = layers + 1, `mlp_dim = {args.mlp_ratio} d_model`: depths {args.depths}, "
        f"non-embedding N {n_range[0]:,} to {n_range[-1]:,} ({n_range[-1] / n_range[0]:.0f}x); "
        f"vocab {args.vocab}, batch {args.batch} x seq {args.seq_len}, budgets {args.budgets} "
        f"steps (one run each, 10% warmup, cosine to 0), seed {args.seed}, fp32. Loss: eval "
        f"loss at the last step on {args.eval_batches} held-out batches. u-μP at lr "
        f"{args.umup_lr:g} for every size. Figure: `scaling_law.png`.", ""]
    cols = ["depth", "d_model", "N", *[f"{s} steps" for s in args.budgets]]
    table = []
    for depth in args.depths:
        mine = {r["steps"]: r for r in umup if r["depth"] == depth}
        row = {"depth": depth, "d_model": sl.shape(depth, args.head_dim, args.mlp_ratio)["d_model"],
               "N": f"{sl.non_embedding_params(depth, args.head_dim, args.mlp_ratio):,}"}
        row.update({f"{s} steps": mine[s]["loss"] if s in mine else None for s in args.budgets})
        table.append(row)
    lines += ["u-μP eval loss:", "", report.markdown_table(
        table, cols, {f"{s} steps": ".3f" for s in args.budgets})]
    if fitted:
        lines.append(
            f"Fit `L = E + A/N^alpha + B/D^beta` on {fitted['runs']} runs (90% bootstrap "
            f"intervals over {len(fitted['bootstrap'])} refits): E = {_interval_text(fitted, 'E')}, "
            f"alpha = {_interval_text(fitted, 'alpha')}, beta = {_interval_text(fitted, 'beta')}, "
            f"A = {fitted['law'].A:.3g}, B = {fitted['law'].B:.3g}; RMS residual "
            f"{fitted['rms_residual']:.3f} nats. Chinchilla (Hoffmann et al. 2022) fitted "
            "E = 1.69, alpha = 0.34, beta = 0.28 at 10^7-10^10 parameters on MassiveText.")
    else:
        lines.append("Fit: not enough finished runs yet.")
    if check:
        cases = ", ".join(f"{c['steps']} steps: predicted {c['predicted']:.3f}, measured "
                          f"{c['loss']:.3f}" for c in check["cases"])
        lines.append(f"\nHeld out: the fit without the largest size (N = {check['N']:,}) predicts "
                     f"it with mean absolute error {check['mean_abs_error']:.3f} nats "
                     f"({100 * check['mean_rel_error']:.1f}%): {cases}.")
    lines += _sp_section(args, umup, sp, sp_best)
    lines.append(f"\nRuns finished: {sum(r['loss'] is not None for r in [*umup, *sp])} of "
                 f"{len(umup) + len(sp)}. " + timing(args, [*umup, *sp]))
    return "\n".join(lines) + "\n"


def _sp_section(args, umup, sp, sp_best) -> list[str]:
    if not sp:
        return []
    lines = ["", f"SP, per-size lr sweep at {args.sp_tune_steps} steps (eval loss):", ""]
    grid = []
    for depth in args.sp_depths:
        cells = {"depth": depth}
        for r in sp:
            if r["depth"] == depth and r["steps"] == args.sp_tune_steps:
                cells[fmt_pow2(r["lr"])] = r["loss"] if r["status"] == "done" else r["status"]
        grid.append(cells)
    lines.append(report.markdown_table(grid, ["depth", *map(fmt_pow2, args.sp_lrs)],
                                       {fmt_pow2(x): ".3f" for x in args.sp_lrs}))
    compare = []
    by_key = {(r["depth"], r["steps"]): r for r in umup}
    for r in sp_best:
        u = by_key.get((r["depth"], r["steps"]))
        if u and u["loss"] is not None and r["loss"] is not None:
            compare.append({"depth": r["depth"], "steps": r["steps"], "C (FLOPs)": f"{r['C']:.2e}",
                            "SP lr": fmt_pow2(r["lr"]), "SP loss": r["loss"],
                            "u-μP loss": u["loss"], "u-μP - SP": u["loss"] - r["loss"]})
    lines += ["Equal compute (same shape, same tokens): u-μP at its one lr against SP at each "
              "size's best lr:", "", report.markdown_table(
                  compare, ["depth", "steps", "C (FLOPs)", "SP lr", "SP loss", "u-μP loss",
                            "u-μP - SP"], {"SP loss": ".3f", "u-μP loss": ".3f",
                                           "u-μP - SP": "+.3f"})]
    n_sizes, n_budgets, n_lrs = len(args.sp_depths), len(args.budgets), len(args.sp_lrs)
    lines.append(
        f"Runs: u-μP needs one per (size, budget), {n_sizes * n_budgets} for these {n_sizes} "
        f"sizes (its lr was found once, at width 32: experiments/lr_transfer); SP needed "
        f"{n_sizes * (n_lrs + n_budgets - 1)} ({n_sizes} x {n_lrs} lrs at one budget, then "
        f"{n_budgets - 1} more budgets at the best), and for all {len(args.depths)} sizes it "
        f"would need {len(args.depths) * (n_lrs + n_budgets - 1)} against u-μP's "
        f"{len(args.depths) * n_budgets}. A {n_lrs}-point grid two octaves apart tunes SP "
        "only to within an octave, and the lr tuned at one budget is reused at the others.")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    return lr_transfer.experiment_main("scaling_law", argv, parse_args, None, build_report,
                                       train=train)


if __name__ == "__main__":
    sys.exit(main())
