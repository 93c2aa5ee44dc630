"""Command line and one-call analysis: records + `scales.json`, `scales.csv`, `scales.png`.

    python -m unit_scaling.analysis --config configs/bert.py:tiny,param=unit --out DIR
    python -m unit_scaling.analysis --config configs/bert.py:tiny --compare param=sp,unit,umup --out DIR

`analyse(fn_or_model, *args, out=DIR)` is the library form: it tracks a function
(`track_scales`) or a Flax module (`track_model_scales`, `args = (variables, *batch)`)
and writes the three files.

The `--config` path builds the config's model at init and one batch of its data through
`unit_scaling.train.tasks.make_task(config)` (imported only when the command runs, so
this package never depends on `train`/`data`), then analyses
`model.apply(variables, batch, deterministic=True)` (a `(loss, metrics)` pair).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn

from unit_scaling.analysis.model import track_model_scales
from unit_scaling.analysis.plot import plot_scales
from unit_scaling.analysis.records import ScaleRecord, to_csv, to_json
from unit_scaling.analysis.tracking import track_scales


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


def load_config(spec: str):
    """`path/to/config.py[:arg]` -> `get_config(arg)` of that file (as `config_flags`)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config: no file {path!r} (expected path/to/config.py[:arg])")
    spec_ = importlib.util.spec_from_file_location(f"_analysis_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def compare_specs(config_spec: str, compare: Optional[str]) -> dict[str, str]:
    """`--compare key=a,b,c` -> {"key=a": spec with `,key=a` set, ...}; without
    `--compare`, {"": config_spec}."""
    if not compare:
        return {"": config_spec}
    key, sep, values = compare.partition("=")
    if not sep or not values:
        raise SystemExit(f"--compare must look like key=a,b,c, got {compare!r}")
    path, _, arg = config_spec.partition(":")
    parts = [p for p in arg.split(",") if p and not p.startswith(f"{key}=")]
    return {
        f"{key}={v}": f"{path}:{','.join(parts + [f'{key}={v}'])}" for v in values.split(",")
    }


def config_inputs(config, workdir: Optional[str], seed: int) -> tuple[nn.Module, Any, Any]:
    """(model, variables, batch) for a config: the config's model at init (or restored
    from `workdir`) and one batch of its training data."""
    try:
        from unit_scaling.train import tasks  # noqa: WPS433 (only the CLI needs train)
    except ImportError as e:
        raise SystemExit(
            "--config needs unit_scaling.train.tasks.make_task(config) -> Task (model, "
            f"train_batches), which is not available yet ({e}). Use analyse() from "
            "Python meanwhile."
        ) from e
    import jax

    task = tasks.make_task(config)
    batch = next(iter(task.train_batches))
    if workdir:
        raise SystemExit("--workdir (analysing a checkpoint) is not wired yet; drop it to analyse at init")
    variables = task.model.init({"params": jax.random.key(seed)}, batch, deterministic=True)
    return task.model, nn.meta.unbox(variables), batch


def main(argv: Optional[Sequence[str]] = None, inputs: Callable = config_inputs) -> dict[str, str]:
    """Runs the command line (see the module docstring); returns the written paths.

    `inputs(config, workdir, seed) -> (model, variables, batch)` builds what is analysed
    (replaceable for tests and other model families).
    """
    parser = argparse.ArgumentParser(prog="python -m unit_scaling.analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg], e.g. configs/bert.py:tiny,param=unit")
    parser.add_argument("--out", required=True, help="output directory for scales.json/.csv/.png")
    parser.add_argument("--workdir", default=None, help="restore parameters from this training run")
    parser.add_argument("--compare", default=None, help="key=a,b,c: one run per value, drawn side by side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detail", choices=("modules", "ops"), default="modules")
    parser.add_argument("--max-rows", type=int, default=400)
    args = parser.parse_args(argv)
    runs = {}
    for run, spec in compare_specs(args.config, args.compare).items():
        model, variables, batch = inputs(load_config(spec), args.workdir, args.seed)
        runs[run] = track_model_scales(model, variables, batch, detail=args.detail, deterministic=True)
        print(f"{run or args.config}: {len(runs[run]) // 2} tensors", file=sys.stderr)
    if len(runs) == 1:
        return write_outputs(next(iter(runs.values())), args.out, title=args.config, max_rows=args.max_rows)
    return write_outputs(None, args.out, compare=runs, title=args.config, max_rows=args.max_rows)
