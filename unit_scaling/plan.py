r"""Plan a run from a fitted scaling law: how big a model, how many tokens, how much compute.

  python -m unit_scaling.plan --law experiments/results/scaling_law/fit.json --target_loss 4.5
  python -m unit_scaling.plan --law experiments/results/scaling_law/fit.json --compute 1e15

`--target_loss X`: the model size `N` (non-embedding parameters) and tokens `D` that reach
loss `X` with the least compute `C = 6 N D` (`Law.for_target`); a target at or below the
fitted irreducible loss `E` is refused. `--compute C`: the compute-optimal `N` and `D` for
`C` FLOPs and the loss the law predicts there (`Law.compute_optimal`). Intervals (90% by
default) come from the law file's bootstrap refits; refits whose `E` is above the target
cannot reach it and are counted. Then the nearest shape of the law's growth rule
(`unit_scaling.scaling_law.shape`), the tokens that shape needs (target) or gets
(compute), and the `train.py` command that launches it with the runs' lr, batch, sequence
length and vocabulary. Predictions outside the fitted range of N and D are extrapolations,
and the planner says so. The law file's schema: `unit_scaling.scaling_law`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from typing import Sequence

from unit_scaling import scaling_law as sl
from unit_scaling import errors
from unit_scaling.errors import InputError


def plan_target(law: sl.Law, samples: Sequence[sl.Law], target: float) -> dict:
    """`{"N", "D", "C", "samples": [(N, D, C), ...], "unreachable": k}` for loss `target`."""
    n, d = law.for_target(target)  # raises LawError below E
    spread, unreachable = [], 0
    for s in samples:
        if target <= s.E:
            unreachable += 1
            continue
        sn, sd = s.for_target(target)
        spread.append((sn, sd, 6 * sn * sd))
    return {"N": n, "D": d, "C": 6 * n * d, "loss": target, "samples": spread,
            "unreachable": unreachable}


def plan_compute(law: sl.Law, samples: Sequence[sl.Law], compute: float) -> dict:
    """`{"N", "D", "C", "loss", "samples": [(N, D, loss), ...]}` at `compute` FLOPs."""
    if not compute > 0:
        raise sl.LawError(f"--compute {compute:g}: give a positive number of FLOPs, e.g. 1e15")
    n, d = law.compute_optimal(compute)
    spread = []
    for s in samples:
        sn, sd = s.compute_optimal(compute)
        spread.append((sn, sd, float(s.loss(sn, sd))))
    return {"N": n, "D": d, "C": compute, "loss": float(law.loss(n, d)), "samples": spread,
            "unreachable": 0}


def launch(law: sl.Law, content: dict, plan: dict, target: float | None) -> dict:
    """The nearest shape of the growth rule to `plan["N"]`, its tokens (enough to reach
    `target` at that shape, or `C / 6N` at that shape's N under a compute plan), its
    steps and the `train.py` command. A shape too small to reach `target` with any data
    is replaced by the next depth up."""
    rule, run = content["shape_rule"], content["launch"]
    depth = sl.depth_for(plan["N"], rule["head_dim"], rule["mlp_ratio"])
    while True:
        n = sl.non_embedding_params(depth, rule["head_dim"], rule["mlp_ratio"])
        if target is None:
            d = plan["C"] / (6 * n)
            break
        data_term = target - law.E - law.A / n ** law.alpha
        if data_term > 0:
            d = (law.B / data_term) ** (1 / law.beta)
            break
        depth += 1
    tokens_per_step = run["global_batch_size"] * run["seq_len"]
    steps = max(1, math.ceil(d / tokens_per_step))
    shape = sl.shape(depth, rule["head_dim"], rule["mlp_ratio"])
    cmd = ["python", "train.py", f"--config={run['config']}", f"--workdir=runs/plan_{depth}x{steps}",
           *(f"--config.model.{k}={v}" for k, v in shape.items()),
           f"--config.train.steps={steps}", f"--config.train.lr={run['lr']}",
           f"--config.train.global_batch_size={run['global_batch_size']}",
           f"--config.data.seq_len={run['seq_len']}", f"--config.data.vocab_size={run['vocab_size']}"]
    d_run = steps * tokens_per_step
    return {"shape": shape, "N": n, "D": d_run, "C": 6 * n * d_run, "steps": steps,
            "loss": float(law.loss(n, d_run)), "command": shlex.join(cmd)}


def _with_interval(value: float, values: Sequence[float], level: float) -> str:
    lo, hi = sl.interval(values, level)
    return f"{value:.3g}  [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) else f"{value:.3g}"


def describe(law: sl.Law, samples: Sequence[sl.Law], content: dict, plan: dict,
             target: float | None, level: float = 0.9) -> str:
    """The planner's printout (see the module docstring)."""
    fitted = content["fitted_on"]
    pct = f"{100 * level:.0f}%"
    lines = [
        f"law: L(N, D) = E + A/N^alpha + B/D^beta, fitted on {fitted['runs']} runs, "
        f"N {fitted['N'][0]:.3g}-{fitted['N'][1]:.3g}, D {fitted['D'][0]:.3g}-{fitted['D'][1]:.3g} tokens",
        *(f"  {k:5s} = {_with_interval(getattr(law, k), [getattr(s, k) for s in samples], level)}"
          for k in ("E", "alpha", "beta")),
        (f"target loss {target:g}, least compute:" if target is not None else
         f"compute {plan['C']:.3g} FLOPs, compute-optimal (predicted loss "
         f"{_with_interval(plan['loss'], [s[2] for s in plan['samples']], level)}):"),
        f"  N (non-embedding parameters) {_with_interval(plan['N'], [s[0] for s in plan['samples']], level)}",
        f"  D (tokens)                   {_with_interval(plan['D'], [s[1] for s in plan['samples']], level)}",
    ]
    if target is not None:
        lines.append(f"  C = 6ND (FLOPs)              "
                     f"{_with_interval(plan['C'], [s[2] for s in plan['samples']], level)}")
    lines.append(f"  (intervals: {pct} of {len(samples)} bootstrap refits"
                 + (f"; {plan['unreachable']} of them cannot reach the target: their E is above it"
                    if plan["unreachable"] else "") + ")")
    if not (fitted["N"][0] <= plan["N"] <= fitted["N"][1] and fitted["D"][0] <= plan["D"] <= fitted["D"][1]):
        lines.append("  note: outside the fitted range of N or D: an extrapolation of the law")
    run = launch(law, content, plan, target)
    shape = run["shape"]
    lines += [f"launch: {shape['num_layers']} layers x d_model {shape['d_model']} "
              f"({shape['num_heads']} heads, mlp_dim {shape['mlp_dim']}), N = {run['N']:,}, "
              f"{run['steps']:,} steps = {run['D']:.3g} tokens, C = {run['C']:.3g} FLOPs, "
              f"predicted loss {run['loss']:.4g}",
              f"  {run['command']}"]
    return "\n".join(lines)


@errors.reported
def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring); bad input exits 2 with one `error:` line."""
    parser = argparse.ArgumentParser(prog="python -m unit_scaling.plan",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--law", required=True, help="fit.json of experiments/scaling_law.py")
    parser.add_argument("--target_loss", type=float, help="the loss to reach")
    parser.add_argument("--compute", type=float, help="the FLOPs to spend (6ND)")
    parser.add_argument("--level", type=float, default=0.9, help="interval coverage")
    args = parser.parse_args(argv)
    if (args.target_loss is None) == (args.compute is None):
        raise InputError("give exactly one of --target_loss X (the loss to reach) or "
                         "--compute FLOPS (the budget to spend)")
    if not 0 < args.level < 1:
        raise InputError(f"--level {args.level}: give a coverage between 0 and 1, e.g. 0.9")
    law, samples, content = sl.load(args.law)
    if args.target_loss is not None:
        plan = plan_target(law, samples, args.target_loss)
    else:
        plan = plan_compute(law, samples, args.compute)
    print(describe(law, samples, content, plan, args.target_loss, args.level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
