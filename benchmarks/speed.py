r"""Speed of the full train step under sp, unit and umup, in fp32, bf16 and fp8.

  python benchmarks/speed.py --real_fp8       # CPU: tiny BERT + tiny causal LM, 10-20 min, 2 cores
  python benchmarks/speed.py --configs configs/bert.py:tiny --params sp,umup --precisions bf16 \
      --steps 20 --batch_size 16 --override model.num_layers=4
  python benchmarks/speed.py --gpu_suite --out benchmarks/results/h100   # one 80 GB GPU

For every config and precision the script builds the training step exactly as
`train.py` does (`unit_scaling.train.trainer.build`: the task, the optimizer from
the config, the sharded train state, the jitted and donated
`step.make_train_step`), compiles it once per parametrization, and runs it on one fixed
batch. The three parametrizations are timed interleaved: every round runs one step of
each (in a rotating order), so that a machine whose load changes during the run slows
all three alike, and the cost of unit scaling is the median over rounds of the paired
ratio `step time / sp step time`. If the three train states would not fit in device
memory together (estimated from the compiled steps), they are timed one after another.

Reported per row (`speed.json`, `speed.md` in `--out`): compile seconds (lower +
compile of the step), median step milliseconds over `--steps` steps after `--warmup`
(blocking on every step's outputs), tokens/s, model FLOPs per step and TFLOP/s
(`metrics.train_flops_per_step`: matmuls only, fwd + bwd), MFU where the device's peak
is known, the fraction of this machine's own dense matmul peak the step achieves
("MFU vs matmul", also on CPU: `matmul_peak` times plain `a @ b` in the row's compute
dtype at the step's projection shapes, in the same run just before the group's steps,
and takes the best FLOP/s), XLA's own FLOP count, memory per device (`compiled.memory_analysis()`:
arguments + outputs + temporaries - donated aliases, i.e. what one step needs
resident; and the device allocator's `peak_bytes_in_use` where the backend has it,
which is the process's high-water mark so far, not the row's), and for fp8 the number
of float8 GEMMs: those the program asks for (StableHLO `dot_general`s whose operands
are float8 or upcast from it, per call) and those left in the compiled HLO (`dot`s or
cuBLAS matmul custom calls with float8 operands). On CPU XLA converts float8 operands
to float32 before its GEMMs, so the compiled count is 0 there.

Batches are random tokens with the pipeline's fields, shapes and dtypes (no corpus,
no tokenizer): speed does not depend on the token values, and base-size tokenizers
take long to train. `--real_data` uses one batch of the config's own pipeline instead.
`--gpu_suite` runs the presets of the papers' GPU experiments in bf16 and real fp8,
with per-device batch sizes chosen to fit an 80 GB GPU (not yet run on one: lower
them with `--batch_size` if they do not fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import flax.linen as nn
import jax
import numpy as np

from configs import common
from configs.common import load_config
from experiments.report import machine, markdown_table
from unit_scaling import host_memory
from unit_scaling.data import pipeline as pipeline_lib
from unit_scaling.precision import Precision
from unit_scaling.train import metrics as metrics_lib
from unit_scaling.train import tasks
from unit_scaling.train import trainer as trainer_lib

DEFAULT_CONFIGS = "configs/bert.py:tiny,configs/causal_lm.py:tiny"

# (config, overrides): the BERT recipe's two phases (seq 128 with 20 predictions, seq
# 512 with 80) and two GPT-3 sizes at seq 1024. Batch sizes are per single GPU, chosen
# so that three train states plus one step's activations fit in 80 GB.
GPU_SUITE = (
    ("configs/bert.py:base", {"data.seq_len": 128, "train.global_batch_size": 256}),
    ("configs/bert.py:base", {"data.seq_len": 512, "data.max_predictions_per_seq": 80,
                              "train.global_batch_size": 64}),
    ("configs/bert.py:large", {"data.seq_len": 128, "train.global_batch_size": 128}),
    ("configs/bert.py:large", {"data.seq_len": 512, "data.max_predictions_per_seq": 80,
                               "train.global_batch_size": 32}),
    ("configs/causal_lm.py:350m", {"train.global_batch_size": 8}),
    ("configs/causal_lm.py:1.3b", {"train.global_batch_size": 4}),
)


# ----------------------------------------------------------------------------- data


def synthetic_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
    """One per-process batch of random tokens with the fields, shapes and dtypes of
    `config.data.objective`'s pipeline (every position a real token, no padding)."""
    rng = np.random.default_rng(seed)
    batch_size = pipeline_lib.per_process_batch_size(config.train.global_batch_size,
                                                      jax.process_count())
    seq_len, vocab = config.data.seq_len, config.data.vocab_size
    shape = (batch_size, seq_len)
    ids = lambda *shape: rng.integers(5, vocab, shape, dtype=np.int32)
    if config.data.objective == "causal_lm":
        return {
            "input_ids": ids(*shape), "targets": ids(*shape),
            "segment_ids": np.ones(shape, np.int32),  # one document per row
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy(),
            "weights": np.ones(shape, np.float32),
        }
    if config.data.objective == "mlm_nsp":
        predictions = config.data.max_predictions_per_seq
        positions = np.sort(np.stack([rng.choice(np.arange(1, seq_len), predictions, replace=False)
                                      for _ in range(batch_size)]), axis=1).astype(np.int32)
        return {
            "input_ids": ids(*shape),
            "segment_ids": np.broadcast_to(np.arange(seq_len) >= seq_len // 2, shape).astype(
                np.int32),  # sentence A, then B
            "input_mask": np.ones(shape, np.int32),
            "masked_lm_positions": positions, "masked_lm_ids": ids(batch_size, predictions),
            "masked_lm_weights": np.ones((batch_size, predictions), np.float32),
            "next_sentence_label": rng.integers(0, 2, (batch_size,), dtype=np.int32),
        }
    raise ValueError(f"config.data.objective={config.data.objective!r}: synthetic batches exist "
                     "for mlm_nsp and causal_lm only; pass --real_data")


class _RepeatBatch:
    """An endless iterator over one batch, with the pipeline iterator's interface."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.batch

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state

    def close(self) -> None:
        pass


def _synthetic_pipeline(config, split: str = "train", **unused):
    """`make_pretraining_pipeline`'s (iterator, DataInfo) without corpus or tokenizer."""
    batch = synthetic_batch(config)
    info = pipeline_lib.DataInfo(
        objective=config.data.objective, tokenizer=None, vocab_size=config.data.vocab_size,
        tokenizer_vocab_size=config.data.vocab_size, seq_len=config.data.seq_len,
        batch_size=len(batch["input_ids"]), global_batch_size=config.train.global_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), num_documents=0,
        element_spec={k: (v.shape, v.dtype) for k, v in batch.items()},
    )
    return _RepeatBatch(batch), info


def make_task(config, real_data: bool = False) -> tasks.Task:
    """`tasks.make_task(config)`, on synthetic batches unless `real_data`."""
    # Only the pipeline is swapped: model and FLOPs stay the trainer's.
    return tasks.make_task(config, pipeline=None if real_data else _synthetic_pipeline)


# ----------------------------------------------------------------------------- the limit


def step_matmul_shapes(config, devices: int = 1) -> list[tuple[int, int, int]]:
    """The `(M, K, N)` of the matmuls that dominate `config`'s train step, per device
    (data parallel: `M` = the device's tokens): the QKV projection `(d, 3d)`, the
    attention output `(d, d)`, the MLP up `(d, mlp)` and down `(mlp, d)` projections,
    and the readout `(d, vocab)` on the tokens it sees (BERT: the masked positions).
    Their backward matmuls have the same sizes, transposed."""
    model, data = config.model, config.data
    batch = max(config.train.global_batch_size // devices, 1)
    tokens = batch * data.seq_len
    d, mlp = model.d_model, model.mlp_dim
    readout = batch * data.max_predictions_per_seq if data.objective == "mlm_nsp" else tokens
    shapes = [(tokens, d, 3 * d), (tokens, d, d), (tokens, d, mlp), (tokens, mlp, d),
              (readout, d, data.vocab_size)]
    return list(dict.fromkeys(shapes))


def matmul_peak(dtype, shapes: Sequence[tuple[int, int, int]], repeats: int = 5) -> dict:
    """This machine's dense matmul FLOP/s (one device) in `dtype`: `a @ b` jitted at each
    `(M, K, N)`, the fastest of `repeats` timed calls after one warm-up, `2 M K N` FLOPs.
    Returns {"flops_per_s": the best over shapes, "dtype", "shape": where, "by_shape":
    [[M, K, N, FLOP/s], ...]}."""
    device = jax.devices()[0]
    matmul = jax.jit(lambda a, b: a @ b)
    by_shape = []
    for m, k, n in shapes:
        a, b = (jax.device_put(np.random.default_rng(i).standard_normal(shape, np.float32)
                               .astype(dtype), device) for i, shape in ((0, (m, k)), (1, (k, n))))
        matmul(a, b).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = min(best, time.perf_counter() - start)
        by_shape.append([m, k, n, 2.0 * m * k * n / best])
    top = max(by_shape, key=lambda row: row[3])
    return {"flops_per_s": top[3], "dtype": np.dtype(dtype).name, "shape": top[:3],
            "by_shape": by_shape}


# ----------------------------------------------------------------------------- fp8 in HLO

_HLO_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\([^)]*\)|\S+)\s+([\w\-]+)\((.*)$")


def count_fp8_gemms(hlo_text: str) -> tuple[int, int]:
    """`(float8 GEMMs, all GEMMs)` in an XLA HLO module's text (`compiled.as_text()`).

    A GEMM is a `dot` (also inside fusions, e.g. Triton GEMMs) or a custom call whose
    target names a matmul or GEMM (cuBLAS `__cublas$gemm`, `__cublas$lt$matmul$f8`,
    ...); it is float8 when one of its operands has an `f8e*` type, or its target
    says f8. Operand types are looked up from their defining instruction (HLO prints
    operands by name) or read inline where the text has them.
    """
    types: dict[str, str] = {}
    fp8 = total = 0
    for line in hlo_text.splitlines():
        match = _HLO_INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, rest = match.groups()
        types[name] = shape
        target = re.search(r'custom_call_target="([^"]*)"', rest)
        is_gemm = op == "dot" or (op == "custom-call" and target is not None
                                  and re.search(r"matmul|gemm", target.group(1), re.IGNORECASE))
        if not is_gemm:
            continue
        total += 1
        operands = rest.split(")", 1)[0]
        operand_types = [types.get(n, "") for n in re.findall(r"%([\w.\-]+)", operands)]
        if "f8e" in operands or any(t.startswith("f8e") for t in operand_types) or (
                target is not None and "f8" in target.group(1)):
            fp8 += 1
    return fp8, total


_STABLEHLO_OP = re.compile(r"^\s*(%[\w#:]+) = (?:stablehlo|mhlo)\.(\w+) (.*)$")
_NAME = r'("[^"]+"|[\w$.\-]+)'  # a symbol, quoted when it has other characters
_FUNC = re.compile(r"func\.func (?:public |private )?@" + _NAME + r"\(")
_FUNC_ARG = re.compile(r"(%arg\d+): (tensor<[^>]*>)")
# Ops through which a float8 value stays a float8 value for XLA's GEMM rewriter.
_F8_PRESERVING = ("convert", "transpose", "reshape", "broadcast_in_dim", "copy")


def count_fp8_matmuls_requested(stablehlo_text: str) -> int:
    """`dot_general`s in StableHLO (`jit(f).lower(...).as_text()`) whose operands are
    all float8 values, directly or upcast/transposed from float8: the forward's
    float8-input matmuls and the backward's matmuls of upcast float8 operands, which
    XLA's GPU GEMM rewriter can fuse into FP8 GEMMs.

    A function (a nested `jax.jit`, such as the FP8 matmul's forward and backward)
    counts once per call site, from `main`; a loop body (`scan_layers`) counts once.
    """
    functions: dict[str, list] = {}  # name -> [its own fp8 dots, callees]
    current: list = [0, []]
    f8: set[str] = set()  # SSA values of the current function that are float8
    for line in stablehlo_text.splitlines():
        function = _FUNC.search(line)
        if function:
            current = functions.setdefault(function.group(1), [0, []])
            f8 = {name for name, t in _FUNC_ARG.findall(line) if "xf8E" in t}
            continue
        current[1] += re.findall(r"\bcall @" + _NAME + r"\(", line)
        match = _STABLEHLO_OP.match(line)
        if not match:
            continue
        result, op, rest = match.groups()
        operands = re.findall(r"%[\w#]+", rest.split(":", 1)[0])
        result_type = rest.rsplit("->", 1)[-1] if "->" in rest else rest.rsplit(":", 1)[-1]
        if "xf8E" in result_type or (op in _F8_PRESERVING and operands and operands[0] in f8):
            f8.add(result)
        else:
            f8.discard(result)
        if op == "dot_general" and len(operands) >= 2 and all(o in f8 for o in operands[:2]):
            current[0] += 1

    @functools.cache
    def total(name: str) -> int:
        own, callees = functions.get(name, (0, []))
        return own + sum(total(callee) for callee in callees)

    return total("main")


# ----------------------------------------------------------------------------- one step


@dataclasses.dataclass
class Bench:
    """One parametrization's compiled train step, its inputs, and what is known of it
    before running (the row)."""

    param: str
    compiled: Any  # jax.stages.Compiled: (state, batch) -> (state, metrics)
    init: Any  # () -> a new TrainState on the mesh
    batch: dict
    row: dict
    mesh: Any
    rules: tuple
    state: Any = None
    times: list = dataclasses.field(default_factory=list)

    def run_step(self) -> float:
        """Runs one step (donating the state) and returns its wall seconds."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            start = time.perf_counter()
            self.state, metrics = self.compiled(self.state, self.batch)
            jax.block_until_ready((self.state, metrics))
            return time.perf_counter() - start


def compile_step(config, real_data: bool = False, label: str = "") -> Bench:
    """Compiles `config`'s train step as `loop.run` builds it (`trainer.build`; state
    not yet made); `label` names the config in the row."""
    train = config.train
    trainer = trainer_lib.build(config, functools.partial(make_task, real_data=real_data))
    trainer.close()
    task, batch = trainer.task, trainer.global_batch(trainer.first)
    abstract_state = trainer.abstract_state()
    with trainer.context():
        start = time.perf_counter()
        lowered = trainer.train_step.lower(abstract_state, batch)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start

    def make_state():
        with trainer.context():
            return trainer.init(batch)

    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one per module
    fp8_gemms, gemms = count_fp8_gemms(compiled.as_text())
    row = {
        "config": label, "objective": config.data.objective,
        "batch": train.global_batch_size, "seq_len": config.data.seq_len,
        "tokens_per_step": task.tokens_per_batch, "precision": config.precision,
        "real_fp8": bool(config.model.real_fp8 and config.precision == "fp8"),
        "param": config.param,
        "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state.params))),
        "compile_s": compile_s, "model_flops_per_step": task.flops_per_step,
        "xla_flops_per_step": (cost or {}).get("flops"),
        "peak_flops": metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, fp8=task.fp8),
        "fp8_gemms_compiled": fp8_gemms, "gemms_compiled": gemms,
        "fp8_matmuls_requested": count_fp8_matmuls_requested(lowered.as_text()),
    }
    if memory is not None:  # bytes; outputs alias the donated state, counted once
        row.update(argument_bytes=memory.argument_size_in_bytes,
                   output_bytes=memory.output_size_in_bytes,
                   temp_bytes=memory.temp_size_in_bytes, alias_bytes=memory.alias_size_in_bytes)
        row["xla_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return Bench(param=config.param, compiled=compiled, init=make_state, batch=batch, row=row,
                 mesh=trainer.mesh, rules=trainer.rules)


# ----------------------------------------------------------------------------- timing


def fits_together(benches: Sequence[Bench], fraction: float = 0.9) -> bool:
    """Whether all the states plus the largest step's temporaries fit in device memory
    (always True where the backend reports no limit, e.g. CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if not limit or any("xla_bytes" not in b.row for b in benches):
        return True
    resident = sum(b.row["argument_bytes"] for b in benches)
    transient = max(b.row["xla_bytes"] - b.row["argument_bytes"] for b in benches)
    return resident + transient <= fraction * limit


def time_steps(benches: Sequence[Bench], steps: int, warmup: int, interleave: bool = True) -> str:
    """Fills each bench's `times` with `steps` step durations (seconds) after `warmup`
    untimed steps; returns "interleaved" or "sequential"."""
    if interleave and fits_together(benches):
        for bench in benches:
            bench.state = bench.init()
        for i in range(warmup + steps):
            # Rotate the order so that no parametrization always follows the same one.
            for bench in benches[i % len(benches):] + benches[:i % len(benches)]:
                seconds = bench.run_step()
                if i >= warmup:
                    bench.times.append(seconds)
        for bench in benches:
            bench.state = None
        return "interleaved"
    for bench in benches:
        bench.state = bench.init()
        bench.times = [bench.run_step() for _ in range(warmup + steps)][warmup:]
        bench.state = None  # frees the state before the next one is made
    return "sequential"


def summarize(benches: Sequence[Bench], timing: str, peak: dict | None = None) -> list[dict]:
    """The rows of one (config, precision) group, with times, the ratio to sp and, with
    `peak` (`matmul_peak`), the fraction of the machine's matmul peak achieved."""
    sp = next((b for b in benches if b.param == "sp"), None)
    stats = jax.devices()[0].memory_stats() or {}
    rows = []
    for bench in benches:
        row = dict(bench.row, timing=timing, step_times_s=bench.times)
        step_s = statistics.median(bench.times)
        q1, _, q3 = (statistics.quantiles(bench.times, n=4) if len(bench.times) > 1
                     else (step_s,) * 3)
        row.update(step_s=step_s, step_spread=(q3 - q1) / step_s,
                   tokens_per_s=row["tokens_per_step"] / step_s)
        if sp is not None:
            # Paired per round when interleaved: each ratio compares steps run moments apart.
            pairs = (zip(bench.times, sp.times) if timing == "interleaved"
                     else [(step_s, statistics.median(sp.times))])
            row["ratio_to_sp"] = statistics.median(t / s for t, s in pairs)
        if row["model_flops_per_step"]:
            row["tflops_per_s"] = row["model_flops_per_step"] / step_s / 1e12
            if row["peak_flops"]:
                peak = row["peak_flops"] * jax.device_count()
                row["mfu"] = row["model_flops_per_step"] / step_s / peak
            if peak is not None:
                row["matmul_peak"] = peak
                row["matmul_mfu"] = row["model_flops_per_step"] / step_s / (
                    peak["flops_per_s"] * jax.device_count())
        if "peak_bytes_in_use" in stats:
            row["device_peak_bytes"] = stats["peak_bytes_in_use"]  # process high-water mark
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- CLI


def split_configs(text: str) -> list[str]:
    """"a.py:tiny,param=unit,b.py:x" -> ["a.py:tiny,param=unit", "b.py:x"]: a new
    config starts at every item naming a .py file."""
    configs: list[str] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if ".py" in item or not configs:
            configs.append(item)
        else:
            configs[-1] += "," + item
    return configs


def apply_overrides(config, overrides: dict[str, Any]) -> None:
    """Sets dotted fields, e.g. {"train.global_batch_size": "8"}; a string value is
    converted to the field's type (`configs.common.convert`: 8, 0.1, true/false)."""
    for key, value in overrides.items():
        *path, leaf = key.removeprefix("config.").split(".")
        node = config
        for part in path:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"--override {key}: config has no field {key!r}")
        node[leaf] = common.convert(key, value, node[leaf]) if isinstance(value, str) else value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma list of config files with their argument (a new one starts "
                             "at each item naming a .py file)")
    parser.add_argument("--params", default="sp,unit,umup")
    parser.add_argument("--precisions", default="fp32,bf16,fp8")
    parser.add_argument("--real_fp8", action="store_true",
                        help="fp8 casts to float8 dtypes (config.model.real_fp8), not simulated")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per parametrization")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch_size", type=int, help="config.train.global_batch_size")
    parser.add_argument("--seq_len", type=int, help="config.data.seq_len")
    parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                        help="any config field, e.g. model.scan_layers=True (repeatable)")
    parser.add_argument("--sequential", action="store_true",
                        help="time the parametrizations one after another, not interleaved")
    parser.add_argument("--real_data", action="store_true",
                        help="a batch from the config's pipeline instead of random tokens")
    parser.add_argument("--gpu_suite", action="store_true",
                        help="BERT base/large at seq 128 and 512, causal LM 350m and 1.3b, in "
                             "bf16 and real fp8 (replaces --configs and --precisions)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="speed", help="output files NAME.json and NAME.md")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def groups(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(config spec, overrides) of every model to benchmark."""
    shared = {}
    if args.batch_size:
        shared["train.global_batch_size"] = args.batch_size
    if args.seq_len:
        shared["data.seq_len"] = args.seq_len
    for item in args.override:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override {item!r}: expected FIELD=VALUE")
        shared[key.strip()] = value.strip()
    suite = GPU_SUITE if args.gpu_suite else [(spec, {}) for spec in split_configs(args.configs)]
    return [(spec, {**overrides, **shared}) for spec, overrides in suite]


def load(spec: str, param: str, precision: str, overrides: dict, real_fp8: bool):
    config = load_config(f"{spec},param={param},precision={precision}")
    apply_overrides(config, overrides)
    config.model.real_fp8 = real_fp8
    return config


def run(args: argparse.Namespace) -> list[dict]:
    """Compiles and times every (config, precision, param); returns the rows."""
    params = args.params.split(",")
    precisions = "bf16,fp8" if args.gpu_suite else args.precisions
    rows = []
    for spec, overrides in groups(args):
        for precision in precisions.split(","):
            real_fp8 = args.real_fp8 or args.gpu_suite
            configs = [load(spec, p, precision, overrides, real_fp8) for p in params]
            benches = [compile_step(config, args.real_data, spec) for config in configs]
            peak = matmul_peak(Precision.from_name(precision).dtype,
                               step_matmul_shapes(configs[0], jax.device_count()))
            timing = time_steps(benches, args.steps, args.warmup, interleave=not args.sequential)
            rows += summarize(benches, timing, peak)
            for row in rows[-len(benches):]:
                ratio = row.get("ratio_to_sp", float("nan"))
                print(f"{spec} {precision} {row['param']}: compile {row['compile_s']:.1f} s, "
                      f"step {row['step_s'] * 1e3:.1f} ms, {ratio:.2f} x sp, "
                      f"{row.get('matmul_mfu', float('nan')):.1%} of the {peak['dtype']} matmul peak "
                      f"({peak['flops_per_s'] / 1e9:.1f} GFLOP/s)", flush=True)
            del benches  # frees the compiled steps before the next group compiles
    return rows


COLUMNS = ("config", "batch x seq", "precision", "param", "compile s", "step ms", "spread",
           "ratio to sp", "tokens/s", "TFLOP/s", "MFU", "matmul peak TFLOP/s",
           "MFU vs matmul", "XLA GiB", "device peak GiB", "fp8 GEMMs")


def table(rows: Sequence[dict]) -> str:
    """The markdown table of `rows` (see COLUMNS)."""
    gib = 2.0**30
    cells = [{
        "config": r["config"], "batch x seq": f"{r['batch']} x {r['seq_len']}",
        "precision": r["precision"] + (" (real)" if r["real_fp8"] else
                                       " (sim)" if r["precision"] == "fp8" else ""),
        "param": r["param"], "compile s": r["compile_s"], "step ms": r["step_s"] * 1e3,
        "spread": f"{r['step_spread']:.0%}", "ratio to sp": r.get("ratio_to_sp"),
        "tokens/s": r["tokens_per_s"], "TFLOP/s": r.get("tflops_per_s"), "MFU": r.get("mfu"),
        "matmul peak TFLOP/s": r["matmul_peak"]["flops_per_s"] / 1e12 if "matmul_peak" in r
        else None,
        "MFU vs matmul": r.get("matmul_mfu"),
        "XLA GiB": r["xla_bytes"] / gib if "xla_bytes" in r else None,
        "device peak GiB": r["device_peak_bytes"] / gib if "device_peak_bytes" in r else None,
        "fp8 GEMMs": (f"{r['fp8_gemms_compiled']} of {r['gemms_compiled']} "
                      f"({r['fp8_matmuls_requested']} asked)") if r["precision"] == "fp8" else None,
    } for r in rows]
    formats = {"compile s": ".1f", "step ms": ".1f", "ratio to sp": ".2f", "tokens/s": ".0f",
               "TFLOP/s": ".3g", "MFU": ".1%", "matmul peak TFLOP/s": ".3g",
               "MFU vs matmul": ".1%", "XLA GiB": ".3g", "device peak GiB": ".3g"}
    return markdown_table(cells, COLUMNS, formats)


def write(rows: Sequence[dict], args: argparse.Namespace, command: str,
          notes: Sequence[str] = ()) -> dict[str, str]:
    """Writes `NAME.json` (every row, with all step times) and `NAME.md`."""
    os.makedirs(args.out, exist_ok=True)
    paths = {ext: os.path.join(args.out, f"{args.name}.{ext}") for ext in ("json", "md")}
    where = machine()
    with open(paths["json"], "w") as f:
        json.dump({"command": command, "machine": where, "steps": args.steps,
                   "warmup": args.warmup, "notes": list(notes), "rows": list(rows)}, f, indent=1)
    header = (
        f"Command: `{command}`\n\nMachine: {where}\n\n"
        f"Full train step (forward, backward, optimizer update), median of {args.steps} steps "
        f"after {args.warmup} warm-up steps; `spread` is the interquartile range over the "
        "median. The parametrizations of one model and precision are timed interleaved (one "
        "step each per round), and `ratio to sp` is the median over rounds of the paired ratio, "
        "so that load from other processes on a shared machine cancels out of it; the absolute "
        "times carry that noise. `XLA GiB`: arguments + outputs + temporaries - donated aliases "
        "of the compiled step. `fp8 GEMMs`: float8 GEMMs in the compiled HLO, of all GEMMs "
        "there (and the float8 matmuls the program asked for). `MFU vs matmul`: model FLOP/s "
        "over this machine's dense matmul peak in the row's compute dtype, measured in this run "
        "just before the group's steps at the step's projection shapes (`matmul peak`; the "
        "best of them); `MFU` is over the accelerator's datasheet peak, where known.\n\n"
        + "".join(f"{note}\n\n" for note in notes)
    )
    with open(paths["md"], "w") as f:
        f.write(header + table(rows))
    return paths


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; returns {"rows", "paths", "markdown"}."""
    args = parse_args(argv)
    kept = host_memory.keep_freed_memory()  # as train.py: before JAX's CPU client exists
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/speed.py", *argv])
    load = os.getloadavg()[0]
    rows = run(args)
    # What else ran on the machine: the absolute times depend on it, the ratios less.
    notes = [f"Load average (1 min): {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the "
             + f"end, on {os.cpu_count()} CPU cores. glibc malloc: "
             + ("one arena, freed memory kept (`unit_scaling/host_memory.py`, as train.py)."
                if kept else "as it comes.")]
    peaks = {(r["config"], r["precision"]): r["matmul_peak"] for r in rows if "matmul_peak" in r}
    notes += [f"Matmul peak, {config} {precision}: {p['flops_per_s'] / 1e9:.1f} GFLOP/s in "
              f"{p['dtype']} at (M, K, N) = {tuple(p['shape'])} (of "
              + ", ".join(f"{tuple(s[:3])} {s[3] / 1e9:.1f}" for s in p["by_shape"]) + ")."
              for (config, precision), p in peaks.items()]
    sequential = sorted({f"{r['config']} {r['precision']}" for r in rows
                         if r["timing"] == "sequential"})
    if sequential:
        notes.append("Timed one after another (the three train states did not fit in device "
                     f"memory together): {', '.join(sequential)}.")
    paths = write(rows, args, command, notes)
    markdown = table(rows)
    print(markdown)
    return {"rows": rows, "paths": paths, "markdown": markdown}


if __name__ == "__main__":
    main()
