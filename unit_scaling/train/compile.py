r"""Plan a pod before renting it: compile the full train step ahead of time for a target
topology and print what each device needs.

  python -m unit_scaling.train.compile --config configs/bert.py:base --topology v5e-64
  python -m unit_scaling.train.compile --config configs/causal_lm.py:1.3b --topology h100-8 \
      --config.mesh.data=1 --config.mesh.fsdp=-1

The step is the one `train.py` runs (`trainer.build`: the mesh from `config.mesh`, the
sharded train state, the jitted and donated train step), lowered with abstract inputs
(`jax.ShapeDtypeStruct`s) and compiled, without data: the batch comes from the
objective's `element_spec`, so no corpus is read and no tokenizer trained.

Printed per device: the parameters and the optimizer state (their shards under the
config's shardings), the activations saved for the backward pass (the residuals of the
model's loss, divided over the batch shards: an estimate), XLA's temporaries of the
step (activations, gradients and scratch), their total (arguments + outputs +
temporaries - donated buffers, from `compiled.memory_analysis()`) and whether it fits
the chip's HBM; the FLOPs of a step (the model's matmul count for all devices, and
XLA's count for one device) and a lower bound on the step time at the chip's peak;
the collectives in the compiled program.

`--topology CHIP-N`: CHIP one of `CHIPS` (HBM per chip), N as the cloud names the
slice: TensorCores for v4 and v5p (two per chip, one JAX device each: v5p-128 is 64
devices), chips for v5e, v6e and GPUs (v5e-16, h100-8). The devices are stood in for
by as many CPU devices of this machine (this program makes them), with the
topology's mesh shape: the sharding, the collectives and the sizes are the target's,
while the memory and FLOP numbers are those of XLA's CPU compiler for that program
(its fusion and scheduling differ from the TPU and GPU compilers': an estimate, not
the target's exact figure). Compiling against the TPU compiler itself (JAX's TPU
topology descriptions) needs libtpu on this machine and is not done here.

Exit status 2 with one `error:` line for an unknown topology or a config that cannot
work on it (a mesh that does not divide, a batch that does not split).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from unit_scaling.data import pipeline as pipeline_lib
from unit_scaling import errors
from unit_scaling.errors import ConfigError
from unit_scaling.train import metrics as metrics_lib
from unit_scaling.train import tasks as tasks_lib
from unit_scaling.train import trainer as trainer_lib

GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator: its `device_kind` (as `metrics.peak_flops_per_device` knows it),
    HBM per JAX device, and how many of the topology name's units make one device."""

    kind: str
    hbm_gib: float
    units_per_device: int = 1


CHIPS = {
    "v4": Chip("TPU v4", 32, 2),
    "v5e": Chip("TPU v5e", 16),
    "v5p": Chip("TPU v5p", 95, 2),
    "v6e": Chip("TPU v6e", 32),
    "a100": Chip("A100", 80),
    "h100": Chip("H100", 80),
    "h200": Chip("H200", 141),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    devices: int

    @property
    def hbm_bytes(self) -> float:
        return self.chip.hbm_gib * GIB


def parse_topology(name: str) -> Topology:
    """`Topology` of a name like "v5e-16" (see the module docstring); ConfigError else."""
    match = re.fullmatch(r"([a-z0-9]+)-([0-9]+)", name.strip().lower())
    chip = CHIPS.get(match.group(1)) if match else None
    if chip is None:
        raise ConfigError(
            f"--topology {name!r} is unknown; use CHIP-N with CHIP one of "
            f"{', '.join(CHIPS)} and N its TensorCores (v4, v5p) or chips, e.g. v5e-16")
    units = int(match.group(2))
    if units < 1 or units % chip.units_per_device:
        raise ConfigError(
            f"--topology {name!r}: N={units} must be a positive multiple of "
            f"{chip.units_per_device} ({match.group(1)} names count TensorCores, "
            f"{chip.units_per_device} per chip)")
    return Topology(name, chip, units // chip.units_per_device)


# ----------------------------------------------------------------------------- inputs


def shapes_pipeline(config, split: str = "train", **unused):
    """`make_pretraining_pipeline`'s (iterator, DataInfo), with batches of zeros of the
    objective's `element_spec`: no corpus, no tokenizer."""
    objective = pipeline_lib.OBJECTIVES.get(config.data.objective)
    if objective is None:
        raise ConfigError(
            f"config.data.objective={config.data.objective!r}: the compile plan takes "
            f"the pretraining objectives {tuple(pipeline_lib.OBJECTIVES)}")
    objective.validate(config.data)
    batch_size = pipeline_lib.per_process_batch_size(config.train.global_batch_size,
                                                      jax.process_count())
    spec = objective.element_spec(config.data, batch_size)
    batch = {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()}
    vocab = int(config.data.vocab_size)
    info = pipeline_lib.DataInfo(
        objective=objective.name, tokenizer=None, vocab_size=vocab,
        tokenizer_vocab_size=vocab, seq_len=int(config.data.seq_len), batch_size=batch_size,
        global_batch_size=config.train.global_batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), num_documents=0, element_spec=spec)
    return itertools.repeat(batch), info


def use_cpu_devices(count: int) -> None:
    """Makes this process's JAX backend `count` CPU devices (before it starts)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    jax.config.update("jax_platforms", "cpu")


# ----------------------------------------------------------------------------- analysis

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute", "collective-broadcast")
_COLLECTIVE = re.compile(r"\s(%s)(?:-start)?\(" % "|".join(COLLECTIVES))


def count_collectives(hlo_text: str) -> dict[str, int]:
    """{collective: how many} in a compiled HLO module's text (an async pair counts
    once, at its `-start`)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _COLLECTIVE.finditer(hlo_text):
        counts[match.group(1)] += 1
    return {name: n for name, n in counts.items() if n}


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree`'s sharded abstract arrays (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def saved_activation_bytes(model, params, batch) -> Optional[int]:
    """Global bytes of the residuals the loss's backward pass keeps (its inputs
    excluded), under the model's remat policy; None where this JAX lacks the tool."""
    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError:  # a private helper of `jax.ad_checkpoint.print_saved_residuals`
        return None

    def loss(params, batch):
        return model.apply({"params": params}, batch, deterministic=False,
                           rngs={"dropout": jax.random.key(0)})[0]

    return sum(int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize
               for aval, source in saved_residuals(loss, params, batch)
               if not source.startswith("from the argument"))


def plan(config, topology: str | Topology) -> dict:
    """Compiles `config`'s train step for `topology` on as many of this process's
    devices; returns the per-device memory, FLOPs and collectives (bytes, FLOPs)."""
    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = jax.devices()
    if len(devices) < topo.devices:
        raise ConfigError(
            f"--topology {topo.name} needs {topo.devices} devices and this process has "
            f"{len(devices)}; run `python -m unit_scaling.train.compile`, which makes them "
            "on the CPU")
    make_task = functools.partial(tasks_lib.make_task, pipeline=shapes_pipeline)
    trainer = trainer_lib.build(config, make_task, devices=devices[:topo.devices])
    trainer.close()
    state = trainer.abstract_state()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
             for k, v in trainer.global_batch(trainer.first).items()}
    with trainer.context():
        start = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        activations = saved_activation_bytes(trainer.task.model, state.params, batch)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    shards = trainer.mesh.shape["data"] * trainer.mesh.shape["fsdp"]
    peak = metrics_lib.peak_flops_per_device(topo.chip.kind)
    flops = trainer.task.flops_per_step
    result = {
        "topology": topo.name, "chip": topo.chip.kind, "devices": topo.devices,
        "hbm_bytes": topo.hbm_bytes, "mesh": dict(trainer.mesh.shape),
        "stand_in": f"{topo.devices} x {devices[0].device_kind}",
        "compile_s": compile_s,
        "params_bytes": device_bytes(state.params),
        "params_global_bytes": sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                                   for x in jax.tree.leaves(state.params)),
        "optimizer_bytes": device_bytes(state.opt_state),
        # Residuals are split over the batch (data x fsdp); `tensor` splits only some
        # (the heads' and the MLP's, not the residual stream's): with tensor > 1 the
        # per-device bytes lie between these two.
        "activation_bytes": None if activations is None else activations / shards,
        "activation_bytes_min": (None if activations is None else
                                 activations / (shards * trainer.mesh.shape["tensor"])),
        "model_flops_per_step": flops, "xla_flops_per_device": cost.get("flops"),
        "ideal_step_s": flops / (peak * topo.devices) if flops and peak else None,
        "collectives": count_collectives(compiled.as_text()),
    }
    if memory is not None:
        result.update(
            argument_bytes=memory.argument_size_in_bytes,
            output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
            alias_bytes=memory.alias_size_in_bytes)
        result["total_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                 + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
        result["fits"] = result["total_bytes"] <= topo.hbm_bytes
    return result


def _activations(result: dict, size: Callable) -> str:
    """The saved activations' line: one number, or a range where `tensor` splits some."""
    most, least = result["activation_bytes"], result.get("activation_bytes_min")
    if most is None or least is None or least == most:
        return f"{size(most)}  (saved for the backward; part of the temporaries)"
    return (f"{size(least)} to {size(most)}  (saved for the backward; tensor="
            f"{result['mesh']['tensor']} splits the heads' and the MLP's, not the stream's)")


def report(result: dict) -> str:
    """The plan as lines of text."""
    def size(n):
        if n is None:
            return "unknown"
        return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2.0**20:.2f} MiB"

    mesh = " ".join(f"{axis}={n}" for axis, n in result["mesh"].items())
    lines = [
        f"topology {result['topology']}: {result['devices']} x {result['chip']} "
        f"({result['hbm_bytes'] / GIB:g} GiB HBM each), mesh {mesh}",
        f"compiled in {result['compile_s']:.1f} s on {result['stand_in']} standing in for "
        "them (XLA's CPU compiler: memory and FLOPs estimate the target's)",
        "per device:",
        f"  parameters          {size(result['params_bytes'])}  (of "
        f"{size(result['params_global_bytes'])} in all)",
        f"  optimizer state     {size(result['optimizer_bytes'])}",
        f"  activations         {_activations(result, size)}",
        f"  temporaries         {size(result.get('temp_bytes'))}",
        f"  total               {size(result.get('total_bytes'))}  (arguments + outputs + "
        "temporaries - donated)",
    ]
    if "fits" in result:
        share = result["total_bytes"] / result["hbm_bytes"]
        lines.append(f"  fits in HBM: {'yes' if result['fits'] else 'NO'} ({share:.0%} of "
                     f"{result['hbm_bytes'] / GIB:g} GiB)")
    flops = result["model_flops_per_step"]
    xla = result["xla_flops_per_device"]
    lines.append("FLOPs per step: model " + (f"{flops:.3e}" if flops else "unknown")
                 + " (all devices), XLA " + (f"{xla:.3e}" if xla else "unknown")
                 + " (one device)")
    if result["ideal_step_s"]:
        lines.append(f"step time at the chip's peak: >= {result['ideal_step_s'] * 1e3:.3g} ms")
    collectives = ", ".join(f"{k} {n}" for k, n in result["collectives"].items())
    lines.append(f"collectives per step: {collectives or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> None:
    """The command line (see the module docstring)."""
    from absl import app, flags
    from ml_collections import config_flags


    config = config_flags.DEFINE_config_file("config", None, "Config file[:arg].",
                                             lock_config=True)
    topology = flags.DEFINE_string("topology", None, "CHIP-N, e.g. v5e-16, v5p-128, h100-8.")
    flags.mark_flags_as_required(["config", "topology"])

    @errors.reported
    def run(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        topo = parse_topology(topology.value)
        use_cpu_devices(topo.devices)
        print(report(plan(config.value, topo)))

    app.run(run, argv=argv or sys.argv, flags_parser=errors.flags_parser)


if __name__ == "__main__":
    main()
