r"""What unit scaling costs in step time: sp vs unit vs umup on the same model.

  python benchmarks/param_cost.py --config configs/bert.py:tiny --out benchmarks/results

Times the jitted forward+backward of the config's model (dropout off, one fixed batch
from its data pipeline) for each parametrization and precision, after a warm-up, and
writes `param_cost.json` and a markdown table with the ratio to sp. The goal is no
measurable cost: the scales are constants XLA should fold into neighbouring kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from configs.common import load_config  # noqa: E402
from unit_scaling.train import tasks  # noqa: E402


def time_grad(config, repeats: int) -> tuple[float, float]:
    """(compile seconds, seconds per forward+backward) of the config's model."""
    task = tasks.make_task(config)
    batch = next(task.train_batches)
    task.close()
    params = task.model.init({"params": jax.random.key(0)}, batch, deterministic=True)["params"]
    grad = jax.jit(jax.grad(lambda p, b: task.model.apply({"params": p}, b, deterministic=True)[0]))
    start = time.perf_counter()
    jax.block_until_ready(grad(params, batch))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        out = grad(params, batch)
    jax.block_until_ready(out)
    return compile_s, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/bert.py:tiny")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    for precision in args.precisions.split(","):
        for param in ("sp", "unit", "umup"):
            config = load_config(f"{args.config},param={param},precision={precision}")
            config.model.update(dropout=0.0, attention_dropout=0.0)
            compile_s, step_s = time_grad(config, args.repeats)
            rows.append(dict(config=args.config, param=param, precision=precision,
                             compile_s=compile_s, step_s=step_s))
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        sp = next(r for r in rows if r["precision"] == row["precision"] and r["param"] == "sp")
        row["ratio_to_sp"] = row["step_s"] / sp["step_s"]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}, jax {jax.__version__}"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "param_cost.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=2)
    lines = [f"`python benchmarks/param_cost.py --config {args.config}` on {machine}", "",
             "| precision | param | fwd+bwd ms | ratio to sp | compile s |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['param']} | {r['step_s'] * 1e3:.1f} | {r['ratio_to_sp']:.2f} "
              f"| {r['compile_s']:.1f} |" for r in rows]
    with open(os.path.join(args.out, "param_cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
