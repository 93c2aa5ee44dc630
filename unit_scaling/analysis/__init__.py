"""Scale analysis: the RMS (and range statistics) of every tensor, forward and backward.

- `track_scales(fn)(*args)`: records for every intermediate of any JAX function.
- `track_model_scales(model, variables, *batch)` (needs Flax): named tensors of a Flax model
  (parameters and their gradients, module outputs, `checkpoint_name` tags) by layer.
- `plot_scales(records, path)` (needs matplotlib): the scale plot (log2 RMS per tensor, forward and
  backward, FP8/FP16 normal ranges shaded), optionally comparing several runs.
- `to_json`/`to_csv`/`to_rows` and `from_json`/`from_csv`: plain tables.
- `python -m unit_scaling.analysis`: the command line (see `unit_scaling.analysis.cli`).
"""

from unit_scaling.analysis.records import (
    FIELDS,
    FORMATS,
    STAT_FIELDS,
    ScaleRecord,
    from_csv,
    from_json,
    from_rows,
    tensor_stats,
    to_csv,
    to_json,
    to_rows,
)
from unit_scaling.analysis.tracking import Trace, trace_scales, track_scales

# Imported on first use, so that `track_scales` needs only jax: the Flax model view and
# the command line need the `[flax]` extra, the plots matplotlib (`[analysis]`).
_LAZY = {
    "track_model_scales": ("unit_scaling.analysis.model", "flax", ("flax",)),
    "plot_scales": ("unit_scaling.analysis.plot", "analysis", ("matplotlib",)),
    "analyse": ("unit_scaling.analysis.cli", "flax", ("flax", "matplotlib")),
    "write_outputs": ("unit_scaling.analysis.cli", "flax", ("flax", "matplotlib")),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    from unit_scaling._extras import require

    module, extra, needs = _LAZY[name]
    require("all" if len(needs) > 1 else extra, f"unit_scaling.analysis.{name}", *needs)
    value = globals()[name] = getattr(importlib.import_module(module), name)
    return value


__all__ = [
    "FIELDS",
    "analyse",
    "plot_scales",
    "track_model_scales",
    "write_outputs",
    "FORMATS",
    "STAT_FIELDS",
    "ScaleRecord",
    "Trace",
    "from_csv",
    "from_json",
    "from_rows",
    "tensor_stats",
    "to_csv",
    "to_json",
    "to_rows",
    "trace_scales",
    "track_scales",
]
