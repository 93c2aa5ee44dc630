r"""The unit-scaled attention's kernels side by side: forward + backward time and memory.

  python benchmarks/attention.py                  # CPU: reference vs xla, fp32, seq 256-1024
  python benchmarks/attention.py --impls reference,xla,cudnn --dtype bfloat16 \
      --seq_lens 1024,2048,4096,8192 --batch 4 --heads 16 --out benchmarks/results/h100

For each `implementation` of `U.scaled_dot_product_attention` (`U.attention_core`)
and sequence length: the jitted gradient of `<attention(q, k, v), g>` with respect to
q, k and v (causal, u-μP temperature), its compiled temporaries
(`compiled.memory_analysis()`: what the step needs besides its inputs and outputs,
the `[batch, heads, seq, seq]` logits and probabilities for the kernels that build
them) and its median wall time. cuDNN's flash attention keeps them O(seq); it runs on
an NVIDIA GPU in bf16/fp16 (elsewhere "cudnn" runs the XLA kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import statistics
import sys
import time
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import jax
import jax.numpy as jnp

import unit_scaling.functional as U
from experiments.report import machine, markdown_table


def bench(implementation: str, seq_len: int, args: argparse.Namespace) -> dict:
    """One row: compiled temporaries and the median step time of the attention's vjp."""
    shape = (args.batch, seq_len, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32).astype(args.dtype) for key in keys)

    def loss(q, k, v):
        out = U.scaled_dot_product_attention(q, k, v, causal=True, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    compiled = step.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - start)
    return {"implementation": implementation, "seq_len": seq_len, "compile_s": compile_s,
            "step_s": statistics.median(times), "step_times_s": times,
            "temp_bytes": None if memory is None else memory.temp_size_in_bytes}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impls", default="reference,xla")
    parser.add_argument("--seq_lens", default="256,512,1024")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="attention", help="output files NAME.json and NAME.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs every (implementation, seq_len); writes NAME.json and NAME.md in --out."""
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/attention.py", *argv])
    load = os.getloadavg()[0]
    rows = [bench(impl, int(n), args) for n in args.seq_lens.split(",")
            for impl in args.impls.split(",")]
    for row in rows:
        reference = next((r for r in rows if r["seq_len"] == row["seq_len"]
                          and r["implementation"] == "reference"), None)
        if reference is not None:
            row["speedup"] = reference["step_s"] / row["step_s"]
    gib = 2.0**30
    cells = [{"implementation": r["implementation"], "seq": r["seq_len"],
              "step ms": r["step_s"] * 1e3, "speed-up vs reference": r.get("speedup"),
              "temporaries GiB": None if r["temp_bytes"] is None else r["temp_bytes"] / gib,
              "compile s": r["compile_s"]} for r in rows]
    markdown = markdown_table(
        cells, ("implementation", "seq", "step ms", "speed-up vs reference", "temporaries GiB",
                "compile s"),
        {"step ms": ".2f", "speed-up vs reference": ".2f", "temporaries GiB": ".3g",
         "compile s": ".1f"})
    where = machine()
    note = (f"Causal unit-scaled attention, gradient w.r.t. q, k, v; batch {args.batch}, "
            f"{args.heads} heads of {args.head_dim}, {args.dtype}; median of {args.steps} "
            f"steps. Load average (1 min): {load:.1f} at the start, {os.getloadavg()[0]:.1f} "
            f"at the end, on {os.cpu_count()} CPU cores.")
    os.makedirs(args.out, exist_ok=True)
    paths = {ext: os.path.join(args.out, f"{args.name}.{ext}") for ext in ("json", "md")}
    with open(paths["json"], "w") as f:
        json.dump({"command": command, "machine": where, "note": note, "rows": rows}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(f"Command: `{command}`\n\nMachine: {where}\n\n{note}\n\n{markdown}")
    print(markdown)
    return {"rows": rows, "paths": paths, "markdown": markdown}


if __name__ == "__main__":
    main()
