"""Scale analysis: the RMS (and range statistics) of every tensor, forward and backward.

- `track_scales(fn)(*args)`: records for every intermediate of any JAX function.
- `track_model_scales(model, variables, *batch)`: named tensors of a Flax model
  (parameters and their gradients, module outputs, `checkpoint_name` tags) by layer.
- `plot_scales(records, path)`: the scale plot (log2 RMS per tensor, forward and
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
from unit_scaling.analysis.model import track_model_scales
from unit_scaling.analysis.plot import plot_scales
from unit_scaling.analysis.cli import analyse, write_outputs

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
