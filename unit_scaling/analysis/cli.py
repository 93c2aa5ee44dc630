"""Command line and one-call analysis: records + `scales.json`, `scales.csv`, `scales.png`.

    python -m unit_scaling.analysis --config configs/bert.py:base,param=unit --out DIR
    python -m unit_scaling.analysis --config configs/bert.py:tiny --compare param=sp,unit,umup --out DIR
    python -m unit_scaling.analysis --config configs/causal_lm.py:tiny --config.data.seq_len=64 \
        --batch_size 2 --out DIR
    python -m unit_scaling.analysis --workdir runs/bert-tiny --out DIR     # a checkpoint
    python -m unit_scaling.analysis --config configs/bert.py:large --dry_run  # names, shapes, memory

What the command does. `--config FILE.py:ARG` is loaded as train.py loads it
(`ml_collections.config_flags`, so `--config.model.d_model=256`-style overrides work).
`config.train.global_batch_size` is set to `--batch_size` (default 4: the statistics need
only a few sequences) and `grad_accum` to 1. `unit_scaling.train.tasks.make_task(config)`
builds the model and the training data; the first batch is drawn. The parameters are
the config's init (`train.step.init_variables`, as `loop.run`: a run's step 0) or, with
`--workdir`, restored from the run's latest checkpoint (`--step` for another): only the
parameters are read, onto one device, whatever mesh the run used. The analysed
function is `model.apply({"params": params}, batch, deterministic=True)` (its loss),
forward and backward (`track_model_scales`); the records are written as
`OUT/scales.json` (a list of `ScaleRecord` rows: `name`, `kind` forward/backward, `rms`,
`abs_max`, ...), `OUT/scales.csv` and the plot `OUT/scales.png`.

`--workdir` alone uses the run's `config.json`; with `--config` as well, that config
builds the model (its shapes must match the checkpoint; param/precision may differ, e.g.
to look at a trained model under fp8).

`--compare KEY=a,b,c` analyses one run per value, drawn side by side in `scales.png`;
`scales.json/.csv` hold the first run, `scales_KEY_a.json/.csv` each run. A KEY without
a dot is an argument of `get_config` (`param=sp,unit,umup`, `precision=fp32,fp8`,
`size=tiny,mini`), one with a dot a config field (`model.d_model=64,128`, applied like
`--config.model.d_model=64`).

`--dry_run` does all of it abstractly (`jax.eval_shape`: no parameter or activation is
allocated; the data pipeline still produces one real batch) and prints the parameter
count and the memory the tracked tensors would take: a check that a size goes through,
and whether it fits, before running it.

Memory. The analysis holds every parameter, its gradient, and every measured tensor's
value and gradient at once (no remat), in float32 copies for the statistics. At batch
4, seq_len 128 that is about 5x the parameter bytes for BERT base/large (base: ~2.5 GB,
large: ~7 GB); causal 1.3b at seq_len 1024 is ~30 GB: use `--batch_size 1` and/or
`--config.data.seq_len=256` on small machines (the model is not sized down otherwise).

Layering. `unit_scaling.analysis` depends on neither `unit_scaling.train` nor
`unit_scaling.data` at import time: `analyse`/`track_*` work on any Flax model or
function. Only the command line's `config_inputs` imports `unit_scaling.train` (`tasks`
and `step`; and orbax for `--workdir`), inside the function, when the command runs; that
keeps the entry point `python -m unit_scaling.analysis` next to the library without
making the library depend on the trainer. `main(argv, inputs=...)` takes another `inputs` for
models that are not built by `make_task`.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from unit_scaling.analysis.model import track_model_scales
from unit_scaling.analysis.plot import plot_scales
from unit_scaling.analysis.records import ScaleRecord, to_csv, to_json
from unit_scaling.analysis.tracking import _FAST_COMPILE, track_scales


def write_outputs(
    records: Optional[Sequence[ScaleRecord]],
    out: str,
    compare: Optional[dict[str, Sequence[ScaleRecord]]] = None,
    title: str = "",
    max_rows: Optional[int] = 400,
) -> dict[str, str]:
    """Writes `out/scales.json`, `out/scales.csv` (of `records`, or of the first run in
    `compare` when `records` is None), `scales_<run>.json/.csv` for every compared run,
    and `out/scales.png` (single or compare plot). Returns {file kind: path}."""
    os.makedirs(out, exist_ok=True)
    compare = dict(compare or {})
    main = records if records is not None else next(iter(compare.values()), None)
    if main is None:
        raise ValueError("write_outputs needs records or a non-empty compare dict")
    paths = {
        "json": os.path.join(out, "scales.json"),
        "csv": os.path.join(out, "scales.csv"),
        "png": os.path.join(out, "scales.png"),
    }
    to_json(main, paths["json"])
    to_csv(main, paths["csv"])
    for run, run_records in compare.items():
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run)
        paths[f"json:{run}"] = os.path.join(out, f"scales_{safe}.json")
        paths[f"csv:{run}"] = os.path.join(out, f"scales_{safe}.csv")
        to_json(run_records, paths[f"json:{run}"])
        to_csv(run_records, paths[f"csv:{run}"])
    plot_scales(records, paths["png"], compare or None, title=title, max_rows=max_rows)
    return paths


def analyse(
    fn_or_model: Any,
    *args: Any,
    out: Optional[str] = None,
    title: str = "",
    **kwargs: Any,
) -> list[ScaleRecord]:
    """Tracks `fn_or_model` on `args` and, with `out`, writes the three files there.

    A Flax module: `args = (variables, *batch)` and the model view
    (`track_model_scales`, keyword arguments go to `apply` unless they are its own).
    Anything else: `track_scales(fn)(*args)` (keyword arguments go to `track_scales`).
    """
    if isinstance(fn_or_model, nn.Module):
        if not args:
            raise ValueError("analyse(model, variables, *batch): variables missing")
        records = track_model_scales(fn_or_model, *args, **kwargs)
    else:
        records = track_scales(fn_or_model, **kwargs)(*args)
    if out is not None:
        write_outputs(records, out, title=title)
    return records


# ---------------------------------------------------------------------- command line

_PROG = "python -m unit_scaling.analysis"


def _flag_values(argv: Sequence[str]):
    """A private absl FlagValues (not the global FLAGS: `main` may run many times in a
    process, and importing this module defines no flags) parsed from `argv`."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    full = [_PROG, *argv]
    config_flags.DEFINE_config_file(
        "config", None, "Config file[:arg], e.g. configs/bert.py:tiny,param=unit.",
        flag_values=fv, lock_config=True, sys_argv=full)
    flags.DEFINE_string("out", None, "Output directory for scales.json/.csv/.png.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Restore the parameters of this training run.", flag_values=fv)
    flags.DEFINE_integer("step", None, "With --workdir: this checkpoint step (default: latest).", flag_values=fv)
    flags.DEFINE_string("compare", None, "KEY=a,b,c: one run per value, drawn side by side.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 4, "Sequences in the analysed batch.", flag_values=fv)
    flags.DEFINE_integer("seed", None, "Init seed (default config.seed, as training).", flag_values=fv)
    flags.DEFINE_enum("detail", "modules", ["modules", "ops"], "Record granularity.", flag_values=fv)
    flags.DEFINE_integer("max_rows", 400, "Rows drawn in the plot (0: all).", flag_values=fv)
    flags.DEFINE_bool("dry_run", False, "Trace abstractly: names, shapes, memory; no files.", flag_values=fv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
        print(f"{__doc__}\nflags:\n{fv.get_help()}")
        raise SystemExit(0)
    try:
        rest = fv(full)
    except flags.Error as e:
        raise SystemExit(f"{_PROG}: {e}") from None
    if len(rest) > 1:
        raise SystemExit(f"{_PROG}: unexpected arguments {rest[1:]}")
    return fv


def _config_index(argv: Sequence[str]) -> Optional[int]:
    """Index in argv of the token that holds --config's value."""
    for i, arg in enumerate(argv):
        if re.match(r"^--?config=", arg):
            return i
        if re.match(r"^--?config$", arg) and i + 1 < len(argv):
            return i + 1
    return None


def _with_config(argv: Sequence[str], spec: str) -> list[str]:
    """`argv` with --config's value replaced by `spec`."""
    argv = list(argv)
    i = _config_index(argv)
    argv[i] = f"--config={spec}" if argv[i].lstrip("-").startswith("config=") else spec
    return argv


def compare_specs(config_spec: str, compare: Optional[str]) -> dict[str, str]:
    """`--compare key=a,b,c` -> {"key=a": spec with `,key=a` set, ...} (a `get_config`
    argument key); without `--compare`, {"": config_spec}."""
    if not compare:
        return {"": config_spec}
    key, values = _split_compare(compare)
    path, _, arg = config_spec.partition(":")
    parts = [p for p in arg.split(",") if p and not p.startswith(f"{key}=")]
    return {f"{key}={v}": f"{path}:{','.join(parts + [f'{key}={v}'])}" for v in values}


def _split_compare(compare: str) -> tuple[str, list[str]]:
    key, sep, values = compare.partition("=")
    items = [v for v in values.split(",") if v]
    if not sep or not key or not items:
        raise SystemExit(f"--compare must look like key=a,b,c, got {compare!r}")
    return key, items


def _run_argvs(argv: Sequence[str], compare: Optional[str]) -> dict[str, list[str]]:
    """{run name: the argv of that run}: `--compare` rewritten into --config's
    argument (plain key) or an appended `--config.KEY=v` override (dotted key)."""
    if not compare:
        return {"": list(argv)}
    key, values = _split_compare(compare)
    if _config_index(argv) is None:
        raise SystemExit("--compare needs --config (a checkpoint has one parametrization)")
    if "." in key:
        return {f"{key}={v}": [*argv, f"--config.{key}={v}"] for v in values}
    token = argv[_config_index(argv)]
    spec = token.split("=", 1)[1] if token.lstrip("-").startswith("config=") else token
    return {run: _with_config(argv, s) for run, s in compare_specs(spec, compare).items()}


def load_run_config(workdir: str):
    """The ConfigDict a training run wrote to `WORKDIR/config.json` (`RunDir`)."""
    from unit_scaling.train.rundir import RunDir, RunDirError

    try:
        return RunDir(workdir).read_config()
    except RunDirError as e:
        raise SystemExit(str(e)) from None


def restore_params(workdir: str, abstract_params: Any, step: Optional[int] = None) -> tuple[Any, int]:
    """`(params, step)`: only the parameters of a run's checkpoint (latest, or `step`),
    restored onto the first local device in the shapes and dtypes of `abstract_params`
    (whatever mesh wrote them; the optimizer state is not read)."""
    from unit_scaling.train.rundir import RunDir, RunDirError

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params)
    try:
        return RunDir(workdir).restore_params(step, target)
    except RunDirError as e:
        raise SystemExit(f"{e} (different shapes? drop --config to use the run's config.json)"
                         if "cannot be restored" in str(e) else str(e)) from None


def config_inputs(
    config, workdir: Optional[str] = None, seed: Optional[int] = None, abstract: bool = False,
    step: Optional[int] = None,
) -> tuple[nn.Module, Any, Any]:
    """(model, variables, batch) for a config: the config's model at init (or restored
    from `workdir`) and the first batch of its training data (`make_task`).

    `abstract`: variables are `jax.ShapeDtypeStruct`s (`eval_shape` of the init), for a
    dry run; nothing is restored."""
    try:
        from unit_scaling.train import step as step_lib, tasks  # noqa: WPS433 (only the command needs train)
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"--config needs unit_scaling.train ({e})") from e

    task = tasks.make_task(config)
    try:
        batch = next(iter(task.train_batches))
    finally:
        task.close()
    seed = config.get("seed", 0) if seed is None else seed

    def init(batch):  # the run's init (`loop.run`'s step 0)
        return nn.meta.unbox(step_lib.init_variables(task.model, batch, seed)[0])

    if abstract:
        return task.model, jax.eval_shape(init, batch), batch
    if workdir:
        abstract_params = jax.eval_shape(init, batch)["params"]
        params, _ = restore_params(workdir, abstract_params, step)
        return task.model, {"params": params}, batch
    variables = jax.jit(init, compiler_options=_FAST_COMPILE)(batch)
    if getattr(task, "init_params", None) is not None:  # fine-tuning: the pretrained encoder
        variables = {**variables, "params": task.init_params(variables["params"])}
    return task.model, variables, batch


def _analysis_config(config, batch_size: int):
    """The config with `--batch_size` sequences per batch and no accumulation."""
    if batch_size < 1:
        raise SystemExit(f"--batch_size={batch_size} must be >= 1")
    config = config.copy_and_resolve_references()
    config.unlock()
    config.train.global_batch_size = batch_size
    config.train.grad_accum = 1
    return config


def _nbytes(records: Sequence[ScaleRecord]) -> int:
    """Bytes of the tensors the records describe (values; gradients have the same)."""
    return sum(
        int(np.prod(r.shape, dtype=np.int64)) * np.dtype(r.dtype).itemsize
        for r in records if r.kind == "forward"
    )


def _summary(run: str, records: Sequence[ScaleRecord], variables: Any) -> dict[str, Any]:
    params = jax.tree.leaves(variables.get("params", variables))
    n_params = sum(int(np.prod(p.shape, dtype=np.int64)) for p in params)
    param_bytes = sum(int(np.prod(p.shape, dtype=np.int64)) * np.dtype(p.dtype).itemsize for p in params)
    acts = [r for r in records if r.role == "activation"]
    summary = {
        "run": run, "tensors": len(records) // 2, "parameters": n_params,
        "parameter_bytes": param_bytes, "tracked_bytes": 2 * _nbytes(records),
        "activation_bytes": 2 * _nbytes(acts),
    }
    finite = [r for r in records if np.isfinite(r.rms) and r.rms > 0]
    if finite:
        far = sorted(finite, key=lambda r: -abs(np.log2(r.rms)))[:3]
        summary["farthest"] = [f"{r.name} ({r.kind}) rms=2^{np.log2(r.rms):.1f}" for r in far]
    return summary


def main(argv: Optional[Sequence[str]] = None, inputs: Callable = config_inputs) -> dict[str, Any]:
    """Runs the command line (module docstring; `--help`); returns the written paths
    (`{"json", "csv", "png", ...}`) or, with `--dry_run`, `{"summary": [per run]}`.

    `inputs(config, workdir, seed, abstract, step) -> (model, variables, batch)` builds
    what is analysed (replaceable for tests and other model families).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    fv = _flag_values(argv)
    if fv.config is None and not fv.workdir:
        raise SystemExit(f"{_PROG}: give --config FILE.py[:ARG] and/or --workdir RUN (see --help)")
    if not fv.out and not fv.dry_run:
        raise SystemExit(f"{_PROG}: give --out DIR (or --dry_run)")
    if fv.compare and fv.workdir:
        raise SystemExit("--compare cannot be combined with --workdir (one checkpoint, one config)")
    runs: dict[str, list[ScaleRecord]] = {}
    summaries = []
    title = fv["config"].config_filename if fv.config is not None else fv.workdir
    for run, run_argv in _run_argvs(argv, fv.compare).items():
        run_fv = fv if not run else _flag_values(run_argv)
        config = run_fv.config if run_fv.config is not None else load_run_config(fv.workdir)
        config = _analysis_config(config, fv.batch_size)
        model, variables, batch = inputs(config, fv.workdir, fv.seed, fv.dry_run, fv.step)
        runs[run] = track_model_scales(
            model, variables, batch, detail=fv.detail, abstract=fv.dry_run, deterministic=True)
        summaries.append(_summary(run or title, runs[run], variables))
        s = summaries[-1]
        print(f"{s['run']}: {s['tensors']} tensors, {s['parameters']:,} parameters "
              f"({s['parameter_bytes'] / 2**20:.1f} MiB), tracked values+gradients "
              f"{s['tracked_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
        for line in s.get("farthest", []):
            print(f"  far from unit scale: {line}", file=sys.stderr)
    if fv.dry_run:
        return {"summary": summaries}
    if fv.workdir:
        title += f" ({fv.workdir})" if fv.config is not None else ""
    max_rows = fv.max_rows or None
    if len(runs) == 1:
        return write_outputs(next(iter(runs.values())), fv.out, title=title, max_rows=max_rows)
    return write_outputs(None, fv.out, compare=runs, title=title, max_rows=max_rows)
