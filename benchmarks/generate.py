r"""Speed and memory of KV-cache generation, prefill and decode apart, with weights stored
in fp32, bf16, fp8 (E4M3) and int8 (issue #14, item 5).

  python benchmarks/generate.py                        # tiny + 125m, batch 1 and 16 (CPU)
  python benchmarks/generate.py --presets tiny --batches 1 --weights fp32,int8

For each causal-LM preset (`configs/causal_lm.py`; random weights: speed does not
depend on their values), batch size and weight format the script runs what
`python -m unit_scaling.generate` runs: `causal_lm.prefill` (the prompt in one
forward, filling the KV cache) then `causal_lm.decode_step` once per new token, both
jitted, with the weights kept in their stored format (`compress.quantise_params`,
per-channel scales) and dequantised inside each step (`prepare`). Greedy sampling.

Reported (`--out`/generate_cpu.{json,md}): prefill ms and prompt tokens/s (median of
`--repeats` prefills), decode ms per step and generated tokens/s (`batch /
step time`, median over the steps of `--repeats` generations), the weights' stored
bytes, the KV cache's bytes, the compiled decode step's memory (`memory_analysis`:
arguments + temporaries), and the number of compilations of the decode step over all
its calls (1 = no recompilation per token). `max_len` (the KV cache length, which
every decode step attends over) is set to prompt + new tokens.

On CPU there are no 8-bit matmuls: XLA converts the 8-bit weights to float32 in each
step, so fp8/int8 weights save memory, not time (the conversion costs time). The
compute dtype is the preset's (float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import causal_lm as causal_config  # noqa: E402
from unit_scaling import compress, host_memory  # noqa: E402
from unit_scaling.models import causal_lm  # noqa: E402
from unit_scaling.train import tasks  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines()
                    if l.startswith("Model name"))
    except Exception:  # lscpu missing: the platform's word
        return platform.processor() or platform.machine()


def build(preset: str, max_len: int):
    config = causal_config.get_config(preset)
    cfg = tasks.model_config(config, config.data.vocab_size)
    model = causal_lm.CausalLM(dataclasses.replace(cfg, max_len=max_len))
    key = jax.random.key(0, impl="rbg")
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(lambda: model.init(key, ids, method=causal_lm.CausalLM.logits))()
    return model, flax.linen.unbox(params["params"])


def bench_one(model, params, weights: str, batch: int, prompt_len: int, new_tokens: int,
              repeats: int) -> dict:
    c = compress.Compression(weights=weights,
                             scales="per_channel" if weights in ("fp8", "int8") else "none")
    tree, prepare = compress.compress(params, c)
    tree = jax.device_put(tree)
    kw = dict(model=model, prepare=prepare, temperature=0.0)
    prompt = jax.random.randint(jax.random.key(1), (batch, prompt_len), 0, model.config.vocab_size)
    key = jax.random.key(0)
    compiles_before = causal_lm.decode_step._cache_size()
    prefill_s, step_s = [], []
    for rep in range(repeats + 1):  # the first round compiles
        cache = causal_lm.init_cache(model, batch)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        token, cache = causal_lm.prefill(tree, cache, prompt, key, **kw)
        token.block_until_ready()
        t1 = time.perf_counter()
        for t in range(prompt_len, prompt_len + new_tokens - 1):
            s0 = time.perf_counter()
            token, cache = causal_lm.decode_step(tree, cache, token, jnp.int32(t), key, **kw)
            token.block_until_ready()
            if rep:
                step_s.append(time.perf_counter() - s0)
        if rep:
            prefill_s.append(t1 - t0)
    compiles = causal_lm.decode_step._cache_size() - compiles_before
    mem = causal_lm.decode_step.lower(
        tree, causal_lm.init_cache(model, batch), token, jnp.int32(prompt_len), key, **kw
    ).compile().memory_analysis()
    prefill_ms = statistics.median(prefill_s) * 1e3
    step_ms = statistics.median(step_s) * 1e3
    return dict(
        weights=weights, scales=c.scales, batch=batch, prompt_len=prompt_len,
        new_tokens=new_tokens, prefill_ms=prefill_ms,
        prefill_tokens_per_s=batch * prompt_len / prefill_ms * 1e3,
        decode_ms_per_step=step_ms, decode_tokens_per_s=batch / step_ms * 1e3,
        weight_bytes=compress.params_nbytes(tree),
        kv_cache_bytes=compress.params_nbytes(causal_lm.init_cache(model, batch)),
        decode_argument_bytes=getattr(mem, "argument_size_in_bytes", None),
        decode_temp_bytes=getattr(mem, "temp_size_in_bytes", None),
        decode_compilations=compiles)


def table(rows: list[dict]) -> str:
    cols = ["preset", "weights", "batch", "prefill ms", "prefill tok/s", "decode ms/step",
            "decode tok/s", "weights MB", "KV cache MB", "step temp MB", "compiles", "load 1m"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["preset"], r["weights"], str(r["batch"]), f"{r['prefill_ms']:.1f}",
            f"{r['prefill_tokens_per_s']:.0f}", f"{r['decode_ms_per_step']:.1f}",
            f"{r['decode_tokens_per_s']:.1f}", f"{r['weight_bytes'] / 1e6:.1f}",
            f"{r['kv_cache_bytes'] / 1e6:.2f}",
            "-" if r["decode_temp_bytes"] is None else f"{r['decode_temp_bytes'] / 1e6:.1f}",
            str(r["decode_compilations"]),
            f"{r['loadavg_before'][0]:.1f}" if "loadavg_before" in r else "-"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,125m")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--weights", default="fp32,bf16,fp8,int8")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--load_note", default="", help="how busy the machine was")
    args = parser.parse_args(argv)
    host_memory.keep_freed_memory()  # as train.py and generate: before JAX's CPU client
    rows = []
    load_before = os.getloadavg()
    for preset in args.presets.split(","):
        model, params = build(preset, args.prompt_len + args.new_tokens)
        for batch in (int(b) for b in args.batches.split(",")):
            for weights in args.weights.split(","):
                row_load = os.getloadavg()  # 1/5/15 min: how busy the shared box was
                row = dict(preset=preset, **bench_one(model, params, weights, batch,
                                                       args.prompt_len, args.new_tokens,
                                                       args.repeats))
                row["loadavg_before"] = [round(x, 2) for x in row_load]
                print(json.dumps(row), flush=True)
                rows.append(row)
    command = "python benchmarks/generate.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    device = jax.devices()[0]
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, {device.platform} "
               f"({device.device_kind}); no GPU lent to this task; jax {jax.__version__}")
    load_after = os.getloadavg()
    load = (f"load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} before, "
            f"{'/'.join(f'{x:.1f}' for x in load_after)} after"
            + (f"; {args.load_note}" if args.load_note else ""))
    date = time.strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generate_cpu.json"), "w") as f:
        json.dump(dict(command=command, machine=machine, date=date, load=load, rows=rows), f,
                  indent=1)
    with open(os.path.join(args.out, "generate_cpu.md"), "w") as f:
        f.write(f"Command: `{command}`\n\nMachine: {machine}. Date: {date}. Load: {load}.\n\n"
                f"Prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
                f"max_len {args.prompt_len + args.new_tokens}, greedy; 8-bit weights with "
                "per-channel scales, dequantised to float32 inside each step.\n\n"
                + table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
