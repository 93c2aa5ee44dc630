"""Scale records: the statistics of one tensor, forward or backward, as a plain dataclass.

A `ScaleRecord` describes one tensor of a traced function (an argument, a parameter, an
intermediate value) in one direction:

- `kind="forward"`: statistics of the tensor's value.
- `kind="backward"`: statistics of the gradient of the function's output with respect
  to that tensor (the cotangent that arrives at it in the backward pass).

The statistics (`tensor_stats`) are computed in float32 over all elements:

- `rms`: `sqrt(mean(x^2))`, the "scale" unit scaling keeps close to 1.
- `abs_max`, `abs_min_nonzero` (NaN when every element is zero), `frac_zero`,
  `frac_nonfinite` (inf or NaN).
- For each of FP8 E4M3 (OCP E4M3FN, max 448, min normal 2^-6), FP8 E5M2 (max 57344,
  min normal 2^-14) and FP16 (max 65504, min normal 2^-14): `frac_above_max_<f>`, the
  fraction with `|x| > max` (would saturate or overflow), and `frac_below_normal_<f>`,
  the fraction with `0 < |x| < min_normal` (subnormal or flushed to zero).

Records round-trip through `to_json`/`from_json` and `to_csv`/`from_csv`; `to_rows`
gives plain dicts for pandas or a table printer.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling import formats as formats_lib

# Short name -> format, in the order the statistics and the plot use.
FORMATS: dict[str, formats_lib.FPFormat] = {
    "e4m3": formats_lib.E4M3FN,
    "e5m2": formats_lib.E5M2,
    "fp16": formats_lib.FP16,
}

STAT_FIELDS: tuple[str, ...] = (
    "rms",
    "abs_max",
    "abs_min_nonzero",
    "frac_zero",
    "frac_nonfinite",
) + tuple(
    f"frac_{bound}_{fmt}" for fmt in FORMATS for bound in ("above_max", "below_normal")
)


@dataclasses.dataclass
class ScaleRecord:
    """Statistics of one tensor in one direction (see the module docstring).

    Attributes:
      name: unique within one tracking run, stable across runs of the same graph:
        `<scope>/<op>:<k>` for an intermediate (k counts that op in that scope), the
        module path for a module output, the pytree path for an argument or parameter.
        Scan iterations appear as `[i]` after the scanned scope.
      kind: "forward" (the value) or "backward" (its gradient).
      op: what produced the tensor: a primitive name (`mul`, `dot_general`), a
        `custom_vjp:<fn>`/`custom_jvp:<fn>` call, `U.<op>` for a call of
        `unit_scaling.functional`, `module` for a Flax module output, `tag:<name>`
        for a `checkpoint_name`-tagged value, `arg` or `param`.
      role: "input" (a function argument), "param" (a model parameter),
        "activation" (anything computed).
      index: position in graph (execution) order; the forward and backward record
        of one tensor share it.
      shape, dtype: of the tensor (its gradient has the same).
      scope: the JAX name stack where the tensor was computed (Flax module path, the
        root module's class name removed in the model view).
      source: `file:line (function)` of the user code that produced it, where JAX
        kept it.
      layer: the group for the model view: a scan iteration (`layers[3]`), a module
        path component like `layers_3`, else the top scope component or "".
      iteration: the scan iteration index (the position in the stacked outputs),
        None outside a scan.
      inputs: names of the tensors this one was computed from (for a `U.<op>`: the
        op's inputs, whose backward records are the op's input gradients).
    """

    name: str
    kind: str
    op: str
    role: str
    index: int
    shape: tuple[int, ...]
    dtype: str
    rms: float
    abs_max: float
    abs_min_nonzero: float
    frac_zero: float
    frac_nonfinite: float
    frac_above_max_e4m3: float
    frac_below_normal_e4m3: float
    frac_above_max_e5m2: float
    frac_below_normal_e5m2: float
    frac_above_max_fp16: float
    frac_below_normal_fp16: float
    scope: str = ""
    source: str = ""
    layer: str = ""
    iteration: Optional[int] = None
    inputs: tuple[str, ...] = ()


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ScaleRecord))


def tensor_stats(x: jax.Array) -> dict[str, jax.Array]:
    """The statistics of `x` (any shape, any float dtype) as float32 scalars.

    See the module docstring for their definitions. Traceable: call it under `jit`
    (or `vmap` it over a stacked leading axis for per-iteration statistics).
    """
    a = jnp.abs(x.astype(jnp.float32)).reshape(-1)
    nonzero = a > 0
    stats = {
        "rms": jnp.sqrt(jnp.mean(jnp.square(a))),
        "abs_max": jnp.max(a),
        "abs_min_nonzero": jnp.where(
            jnp.any(nonzero), jnp.min(jnp.where(nonzero, a, jnp.inf)), jnp.nan
        ),
        "frac_zero": jnp.mean(~nonzero),
        "frac_nonfinite": jnp.mean(~jnp.isfinite(a)),
    }
    for short, fmt in FORMATS.items():
        stats[f"frac_above_max_{short}"] = jnp.mean(a > fmt.max)
        stats[f"frac_below_normal_{short}"] = jnp.mean(nonzero & (a < fmt.min_normal))
    return {k: v.astype(jnp.float32) for k, v in stats.items()}


def segment_stats(tensors: list[jax.Array]) -> dict[str, jax.Array]:
    """`tensor_stats` of every row of every `[rows, n]` tensor in `tensors`, at once.

    Returns float32 arrays with one entry per row, rows of all tensors concatenated in
    order. One set of segment reductions over the concatenation keeps the compiled
    program small however many tensors there are (the analysis of a model measures
    hundreds).
    """
    sizes = [t.shape[1] for t in tensors]
    rows = [t.shape[0] for t in tensors]
    starts = np.cumsum([0] + rows)
    total = int(starts[-1])
    a = jnp.concatenate([jnp.abs(t.astype(jnp.float32)).reshape(-1) for t in tensors])
    ids = jnp.concatenate(
        [
            (jax.lax.broadcasted_iota(jnp.int32, (r, n), 0) + int(s0)).reshape(-1)
            for r, n, s0 in zip(rows, sizes, starts)
        ]
    )
    count = np.repeat(np.asarray(sizes, np.float32), rows)

    def seg(op, x):
        return op(x, ids, num_segments=total, indices_are_sorted=True)

    nonzero = a > 0
    indicators = [~nonzero, ~jnp.isfinite(a)]
    for fmt in FORMATS.values():
        indicators += [a > fmt.max, nonzero & (a < fmt.min_normal)]
    # One reduction per indicator rather than one over a stacked [N, 8] copy.
    fractions = [seg(jax.ops.segment_sum, i.astype(jnp.float32)) / count for i in indicators]
    min_nonzero = seg(jax.ops.segment_min, jnp.where(nonzero, a, jnp.inf))
    stats = {
        "rms": jnp.sqrt(seg(jax.ops.segment_sum, jnp.square(a)) / count),
        "abs_max": seg(jax.ops.segment_max, a),
        "abs_min_nonzero": jnp.where(jnp.isinf(min_nonzero), jnp.nan, min_nonzero),
        "frac_zero": fractions[0],
        "frac_nonfinite": fractions[1],
    }
    for i, short in enumerate(FORMATS):
        stats[f"frac_above_max_{short}"] = fractions[2 + 2 * i]
        stats[f"frac_below_normal_{short}"] = fractions[3 + 2 * i]
    return stats


# ------------------------------------------------------------------------- tables


def to_rows(records: Iterable[ScaleRecord]) -> list[dict[str, Any]]:
    """Records as plain dicts (one per record, keys = `FIELDS`), e.g. for
    `pandas.DataFrame(to_rows(records))`."""
    return [dataclasses.asdict(r) for r in records]


def from_rows(rows: Iterable[dict[str, Any]]) -> list[ScaleRecord]:
    """Inverse of `to_rows`; also accepts the rows of `to_json`/`to_csv` output."""
    records = []
    for row in rows:
        unknown = set(row) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown ScaleRecord fields {sorted(unknown)}")
        row = dict(row)
        row["shape"] = tuple(int(s) for s in row.get("shape", ()))
        row["inputs"] = tuple(row.get("inputs", ()))
        records.append(ScaleRecord(**row))
    return records


def to_json(records: Sequence[ScaleRecord], path: Optional[str] = None) -> str:
    """Records as a JSON list of objects (written to `path` if given); returns the text.

    Non-finite statistics are written as the tokens `NaN`/`Infinity`, which Python's
    `json` and pandas read back.
    """
    text = json.dumps(to_rows(records), indent=1)
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    return text


def from_json(text_or_path: str) -> list[ScaleRecord]:
    """Reads records from JSON text or from a path to a `.json` file."""
    if not text_or_path.lstrip().startswith("["):
        with open(text_or_path) as f:
            text_or_path = f.read()
    return from_rows(json.loads(text_or_path))


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return "|".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def to_csv(records: Sequence[ScaleRecord], path: Optional[str] = None) -> str:
    """Records as CSV (header = `FIELDS`; shape as `4|8`, inputs `|`-separated)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(FIELDS)
    for r in records:
        writer.writerow([_csv_cell(getattr(r, f)) for f in FIELDS])
    text = buf.getvalue()
    if path is not None:
        with open(path, "w") as f:
            f.write(text)
    return text


_FLOAT_FIELDS = set(STAT_FIELDS)


def from_csv(text_or_path: str) -> list[ScaleRecord]:
    """Reads records from CSV text (as written by `to_csv`) or from a `.csv` path."""
    if "\n" not in text_or_path:
        with open(text_or_path) as f:
            text_or_path = f.read()
    rows = []
    for raw in csv.DictReader(io.StringIO(text_or_path)):
        row: dict[str, Any] = {}
        for key, cell in raw.items():
            if key in _FLOAT_FIELDS:
                row[key] = float(cell)
            elif key == "index":
                row[key] = int(cell)
            elif key == "iteration":
                row[key] = int(cell) if cell else None
            elif key in ("shape", "inputs"):
                parts = tuple(p for p in cell.split("|") if p)
                row[key] = tuple(int(p) for p in parts) if key == "shape" else parts
            else:
                row[key] = cell
        rows.append(row)
    return from_rows(rows)


def log2(value: float) -> float:
    """`log2(value)`, NaN for non-positive or non-finite values (for plotting)."""
    if not (value > 0) or not math.isfinite(value):
        return math.nan
    return math.log2(value)
