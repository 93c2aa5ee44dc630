r"""Tokens/s of this project's train step against the PyTorch reference library,
`unit-scaling` 0.3.5's `TransformerDecoder` under `torch.compile`, on one shape,
measured interleaved in one run.

  TORCH_PYTHON=/work/torchvenv/bin/python python benchmarks/vs_torch_reference.py
  python benchmarks/vs_torch_reference.py --torch_python /path/to/venv/bin/python --quick

torch is not a dependency of this project: it lives in a separate environment whose
interpreter `--torch_python` (or `$TORCH_PYTHON`) names, e.g.

  python3.11 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
  /work/torchvenv/bin/pip install unit-scaling==0.3.5 numpy

The script starts that interpreter on this file (`--torch_worker`, isolated with `-I`
so that this repository's `unit_scaling` does not shadow the library's), which builds
`unit_scaling.TransformerDecoder(hidden_size, vocab_size, layers, heads)` (pre-norm
RMSNorm, fused-QKV causal attention, SwiGLU with 4x expansion, untied readout, no
positional embedding, no biases), its `unit_scaling.optim.AdamW` (per-parameter u-μP
lr groups), compiles `model.loss` (forward + backward) and `optimizer.step` with
`torch.compile`, and then times steps when asked on stdin.

This side builds the train step exactly as `train.py` does (`benchmarks/speed.py`'s
`compile_step`: `trainer.build`, the jitted and donated step) for
`configs/causal_lm.py` at the same shape: d_model, layers, heads and the SwiGLU
hidden size `4 * d_model` as the reference. It does more per step than the
reference: RoPE, segment-id masking (packed documents), a weighted loss, the
accuracy metric, the learning-rate schedule, and the loss / norm / RMS metrics.

This side runs with glibc's malloc set as `train.py` sets it
(`unit_scaling/host_memory.py`: one arena that keeps freed memory, so a step's
temporaries are not page-faulted in afresh every step). The reference is timed twice,
as two workers: as torch runs by default ("torch") and with the same malloc setting
("torch, kept memory"; `--torch_malloc` picks), so that the ratio to the second is what
the code, not the allocator, buys.

Interleaving: every round times `--steps` steps of each side (blocking on each
step's outputs), in an order that alternates between rounds, so that load from
other processes on a shared machine slows both alike; the load average is recorded
every round. Reported: each side's median tokens/s over all timed steps, the median
over rounds of the per-round ratio (this side's tokens/s over the reference's), and
the same from process CPU seconds per step (less sensitive to other processes than
wall time, though not immune: caches and memory bandwidth are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import runpy
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
HOST_MEMORY = REPO / "unit_scaling" / "host_memory.py"  # stdlib only: runs in any interpreter

# The shape of issue #17: u-μP causal LM, width 256, 4 layers, seq 256, batch 8.
SHAPE = dict(d_model=256, layers=4, heads=4, seq_len=256, batch=8, vocab=8192)
# The reference's sides by glibc malloc setting: as torch runs by default, and as this
# project's train.py sets it (`unit_scaling/host_memory.py`), which this side always runs.
TORCH_SIDES = {"default": "torch", "keep_freed": "torch, kept memory"}


# ----------------------------------------------------------------------------- torch side
# Runs in the torch environment: imports nothing from this repository.


def torch_worker(shape: dict, warmup: int, keep_freed: bool) -> None:
    """Builds and compiles the reference step, then answers `{"steps": n}` lines on
    stdin with `{"wall": [...], "cpu": [...]}` (seconds per step) on stdout.
    `keep_freed`: glibc's malloc set as this project's `train.py` sets it."""
    if keep_freed:  # by path: this interpreter must not import this repository's package
        keep_freed = runpy.run_path(str(HOST_MEMORY))["keep_freed_memory"]()
    import torch
    import unit_scaling as uu  # the PyTorch library, not this repository

    torch.manual_seed(0)
    model = uu.TransformerDecoder(hidden_size=shape["d_model"], vocab_size=shape["vocab"],
                                  layers=shape["layers"], heads=shape["heads"], dropout_p=0.0)
    optimizer = uu.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq_len"]))
    loss_fn = torch.compile(model.loss)
    optimizer_step = torch.compile(optimizer.step)

    def step() -> None:
        loss_fn(ids).backward()
        optimizer_step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        step()
    info = {"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "unit_scaling": getattr(uu, "__version__", "?"),
            "num_params": sum(p.numel() for p in model.parameters()),
            "compile_and_warmup_s": time.perf_counter() - start, "keep_freed": keep_freed,
            "compiled": ["model.loss (forward + backward)", "optimizer.step"]}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        n = json.loads(line)["steps"]
        wall, cpu = [], []
        for _ in range(n):
            w, c = time.perf_counter(), time.process_time()
            step()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def check_torch_python(python: str | None) -> str:
    """The torch interpreter, or SystemExit with how to provide one."""
    how = ("make one with `python3.11 -m venv /work/torchvenv && /work/torchvenv/bin/pip "
           "install torch --index-url https://download.pytorch.org/whl/cpu && "
           "/work/torchvenv/bin/pip install unit-scaling==0.3.5 numpy`, then pass "
           "--torch_python /work/torchvenv/bin/python (or set TORCH_PYTHON)")
    if not python:
        raise SystemExit("vs_torch_reference: no torch environment given: " + how)
    probe = subprocess.run(
        [python, "-I", "-c", "import torch, unit_scaling, importlib.metadata as m; "
         "print(torch.__version__, m.version('unit-scaling'))"],
        capture_output=True, text=True)
    if probe.returncode:
        raise SystemExit(f"vs_torch_reference: {python} cannot import torch and unit_scaling "
                         f"({probe.stderr.strip().splitlines()[-1] if probe.stderr else ''}): "
                         + how)
    version = probe.stdout.split()[-1]
    if version != "0.3.5":
        print(f"warning: unit-scaling {version} in {python}, not the 0.3.5 this compares to",
              file=sys.stderr)
    return python


# ----------------------------------------------------------------------------- this side


def jax_benches(shape: dict, params: Sequence[str], overrides: Sequence[str]):
    """One `speed.Bench` (compiled train step) per parametrization at `shape`."""
    from benchmarks import speed

    fields = {"train.global_batch_size": shape["batch"], "data.seq_len": shape["seq_len"],
              "data.vocab_size": shape["vocab"], "model.d_model": shape["d_model"],
              "model.num_layers": shape["layers"], "model.num_heads": shape["heads"],
              "model.mlp_dim": 4 * shape["d_model"]}
    for item in overrides:
        key, _, value = item.partition("=")
        fields[key.strip()] = value.strip()
    spec = "configs/causal_lm.py:tiny"
    return [speed.compile_step(speed.load(spec, p, "fp32", fields, False), label=spec)
            for p in params]


def time_jax(bench, steps: int) -> dict:
    wall, cpu = [], []
    for _ in range(steps):
        c = time.process_time()
        wall.append(bench.run_step())
        cpu.append(time.process_time() - c)
    return {"wall": wall, "cpu": cpu}


# ----------------------------------------------------------------------------- the run


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def measure(args: argparse.Namespace) -> dict:
    """Runs the interleaved rounds; returns the result dict (see `summarize`)."""
    import jax

    shape = dict(SHAPE, **{k: getattr(args, k) for k in SHAPE if getattr(args, k) is not None})
    params = args.params.split(",")
    from benchmarks.ab_trees import LineWorker

    torch_sides = {TORCH_SIDES[m]: m for m in args.torch_malloc.split(",")}
    workers = {}
    try:
        for side, malloc in torch_sides.items():
            workers[side] = LineWorker(
                [args.torch_python, "-I", __file__, "--torch_worker", "--shape", json.dumps(shape),
                 "--warmup", str(args.warmup)] + (["--keep_freed"] if malloc == "keep_freed" else []))
            if malloc == "keep_freed" and not workers[side].info["keep_freed"]:
                raise SystemExit(f"error: the {side!r} side could not set glibc's malloc "
                                 "(not glibc?); run with --torch_malloc default")
        benches = jax_benches(shape, params, args.override)
        for bench in benches:
            bench.state = bench.init()
            time_jax(bench, args.warmup)
        sides = [f"jax {b.param}" for b in benches] + list(torch_sides)
        rounds = []
        for r in range(args.rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            row = {"round": r, "load_1min": os.getloadavg()[0], "order": order}
            for side in order:
                if side in workers:
                    row[side] = workers[side].run(args.steps)
                else:
                    row[side] = time_jax(benches[sides.index(side)], args.steps)
            rounds.append(row)
            print(f"round {r}: load {row['load_1min']:.1f}, " + ", ".join(
                f"{s} {statistics.median(row[s]['wall']) * 1e3:.0f} ms" for s in sides),
                flush=True)
        info = {side: worker.info for side, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    tokens = shape["batch"] * shape["seq_len"]
    return summarize(rounds, sides, list(torch_sides), tokens, {
        "shape": shape, "params": params, "overrides": list(args.override),
        "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
        "torch": info, "jax": jax.__version__,
        "jax_num_params": {b.param: b.row["num_params"] for b in benches},
        "jax_keep_freed": args.jax_keep_freed,
        "jax_compile_s": {b.param: b.row["compile_s"] for b in benches},
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
    })


def summarize(rounds: list[dict], sides: Sequence[str], references: Sequence[str], tokens: int,
              meta: dict) -> dict:
    """Median tokens/s of each side, and the median over rounds of each JAX side's
    paired ratio to each torch side (`references`; wall and CPU seconds)."""
    result = dict(meta, tokens_per_step=tokens, rounds_data=rounds, sides={})

    def paired(side: str, ref: str, clock: str) -> list[float]:
        return [statistics.median(r[ref][clock]) / statistics.median(r[side][clock]) for r in rounds]

    for side in sides:
        wall = [t for r in rounds for t in r[side]["wall"]]
        cpu = [t for r in rounds for t in r[side]["cpu"]]
        entry = {"tokens_per_s": tokens / statistics.median(wall),
                 "step_ms": statistics.median(wall) * 1e3,
                 "cpu_s_per_step": statistics.median(cpu)}
        if side not in references:
            entry["ratio_to"] = {ref: {"wall": statistics.median(paired(side, ref, "wall")),
                                       "wall_rounds": paired(side, ref, "wall"),
                                       "cpu": statistics.median(paired(side, ref, "cpu"))}
                                 for ref in references}
        result["sides"][side] = entry
    loads = [r["load_1min"] for r in rounds]
    result["load_1min"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    return result


def markdown(result: dict, command: str) -> str:
    shape, infos = result["shape"], result["torch"]
    torch_info = next(iter(infos.values()))
    refs = list(infos)
    lines = [
        f"Command: `{command}`", "",
        f"Machine: {result['cpu']}, {result['cpu_count']} CPU cores; jax {result['jax']}, torch "
        f"{torch_info['torch']} ({torch_info['threads']} threads), unit-scaling "
        f"{torch_info['unit_scaling']}; {result['date']}. Load average (1 min) over the rounds: "
        f"{result['load_1min']['min']:.1f} to {result['load_1min']['max']:.1f} (median "
        f"{result['load_1min']['median']:.1f}) on {result['cpu_count']} cores.", "",
        f"Shape: causal LM, d_model {shape['d_model']}, {shape['layers']} layers, "
        f"{shape['heads']} heads, SwiGLU {4 * shape['d_model']}, vocab {shape['vocab']}, "
        f"batch {shape['batch']} x seq {shape['seq_len']}, float32, full train step (forward, "
        f"backward, AdamW). {result['rounds']} interleaved rounds of {result['steps_per_round']} "
        f"steps per side after {result['warmup']} warm-up steps. Torch: "
        f"`unit_scaling.TransformerDecoder` ({torch_info['num_params']:,} parameters), "
        f"torch.compile of {' and '.join(torch_info['compiled'])} (compile + warm-up "
        + ", ".join(f"{i['compile_and_warmup_s']:.0f} s" for i in infos.values()) + "). JAX: "
        "`configs/causal_lm.py` at that shape, the step `train.py` runs, with glibc's malloc "
        + ("set as `train.py` sets it (`unit_scaling/host_memory.py`: one arena, freed "
           "memory kept; \"torch, kept memory\" is the reference with the same setting) "
           if result.get("jax_keep_freed") else "as it comes (`host_memory` did not apply) ")
        + f"({', '.join(f'{p} {n:,}' for p, n in result['jax_num_params'].items())} parameters).",
        "", "| side | step ms | tokens/s | " + " | ".join(
            f"ratio to {ref} (wall) | ratio to {ref} (CPU s)" for ref in refs) + " |",
        "|---|---|---|" + "---|---|" * len(refs)]
    for side, e in result["sides"].items():
        ratios = e.get("ratio_to", {})
        cells = [f"{ratios[ref]['wall']:.2f} | {ratios[ref]['cpu']:.2f}" if ref in ratios
                 else "- | -" for ref in refs]
        lines.append(f"| {side} | {e['step_ms']:.0f} | {e['tokens_per_s']:.0f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Ratios are medians over rounds of the paired per-round ratio (> 1: this "
              "project is faster); tokens/s are medians over all timed steps. Per-round wall "
              "ratios: " + "; ".join(
                  f"{s} to {ref}: " + ", ".join(f"{x:.2f}" for x in r["wall_rounds"])
                  for s, e in result["sides"].items() for ref, r in e.get("ratio_to", {}).items())
              + "."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch_python", default=os.environ.get("TORCH_PYTHON"),
                        help="python of an environment with torch and unit-scaling==0.3.5 "
                             "(default: $TORCH_PYTHON)")
    parser.add_argument("--torch_malloc", default=",".join(TORCH_SIDES),
                        help="the reference's glibc malloc settings to time, comma list of "
                             + " / ".join(TORCH_SIDES) + " (default: both)")
    parser.add_argument("--params", default="umup",
                        help="this project's parametrizations to time (comma list)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 steps, 1 warm-up")
    for key in SHAPE:
        parser.add_argument(f"--{key}", type=int, help=f"default {SHAPE[key]}")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field of the JAX side, e.g. model.attention_impl=xla")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="vs_torch_reference_cpu")
    parser.add_argument("--torch_worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--keep_freed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 3, 2, 1
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--rounds and --steps must be >= 1, --warmup >= 0")
    unknown = set(args.torch_malloc.split(",")) - set(TORCH_SIDES)
    if unknown:
        parser.error(f"--torch_malloc: unknown {sorted(unknown)}; use {', '.join(TORCH_SIDES)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.torch_worker:
        torch_worker(json.loads(args.shape), args.warmup, args.keep_freed)
        return {}
    sys.path.insert(0, str(REPO))
    from unit_scaling import host_memory

    args.jax_keep_freed = host_memory.keep_freed_memory()  # as train.py: before JAX's client
    args.torch_python = check_torch_python(args.torch_python)
    argv = sys.argv[1:] if argv is None else list(argv)
    shown, skip = [], False  # the command without the (machine-specific) torch path
    for a in argv:
        if not skip and not a.startswith("--torch_python"):
            shown.append(a)
        skip = a == "--torch_python"
    command = shlex.join(["python", "benchmarks/vs_torch_reference.py", *shown])
    result = measure(args)
    result["command"] = command
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result, command)
    with open(base + ".md", "w") as f:
        f.write(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
