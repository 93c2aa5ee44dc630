"""From a `Trace` to records: which values are reported, under which names.

`op_entries` picks the values of the `track_scales` view (arguments, then one entry per
unit output: a `unit_scaling.functional` call, or an equation; see `tracking.py`) and
`make_records` names them (scope, scan iterations as `[i]`, op and count) and turns
their statistics into `ScaleRecord`s. The model view (`model.py`) builds its entries
with the same helpers (`escapes`, `make_records`).
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from unit_scaling.analysis.interpreter import Trace, Value
from unit_scaling.analysis.records import STAT_FIELDS, ScaleRecord

DEFAULT_LAYER_REGEX = r"^(?:layers?|blocks?|h)_?\d+$"


def escapes(value: Value, unit) -> bool:
    """Whether `value` is used outside the unit `unit(scope, group) -> hashable`."""
    own = unit(value.scope, value.group)
    return value.is_output or any(unit(s, g) != own for s, g in value.consumers)


def iteration_names(
    value: Value, strip_root: Optional[str] = None
) -> list[tuple[tuple[str, ...], Optional[int], tuple]]:
    """Per iteration of the enclosing scans: (scope components with `[i]` labels,
    outermost iteration index or None, graph-order key)."""
    out = []
    for flat, its in enumerate(np.ndindex(*value.stack) if value.stack else [()]):
        comps = list(value.scope)
        for (pos, has_label), t in reversed(list(zip(value.scan_slots, its))):
            if has_label and pos < len(comps):
                comps[pos] = f"{comps[pos]}[{t}]"
            else:
                comps.insert(min(pos, len(comps)), f"scan[{t}]")
        if strip_root and comps and comps[0] == strip_root:
            comps = comps[1:]
        if strip_root and comps and comps[0].startswith(strip_root + "."):
            comps[0] = comps[0][len(strip_root) + 1 :]  # a method of the root module
        order = list(value.order)
        for pos, t in reversed(list(zip(value.scan_pos, its))):
            order.insert(pos, t)
        out.append((tuple(comps), its[0] if its else None, tuple(order)))
    return out


def layer_of(comps: Sequence[str], regex: str = DEFAULT_LAYER_REGEX) -> str:
    """The layer a tensor belongs to: the first scope component that is a scan
    iteration (`name[i]`) or matches `regex` (`layers_3`, `block2`, `h_0`), else the
    first component, else ""."""
    pattern = re.compile(regex)
    for c in comps:
        if c.endswith("]") or pattern.match(c):
            return c
    return comps[0] if comps else ""


def make_records(
    trace: Trace,
    entries: Sequence[tuple[str, str, Optional[str], Sequence[str]]],
    *,
    strip_root: Optional[str] = None,
    layer_regex: str = DEFAULT_LAYER_REGEX,
) -> list[ScaleRecord]:
    """Records for `entries` = (value key, op, suffix or None, input keys), graph order.

    The record name is the value's scope (with `[i]` scan labels, `strip_root`
    removed) followed by `/<suffix>` (by `:k` alone if the suffix starts with `:`);
    with no suffix, by `/<op>:<k>` where k counts that op in that scope in graph order.
    """
    rows = []
    for key, op, suffix, inputs in entries:
        for flat, (comps, it, order) in enumerate(iteration_names(trace.values[key], strip_root)):
            rows.append((order, key, flat, op, suffix, comps, it, inputs))
    rows.sort(key=lambda r: r[0])
    counts: dict[tuple, int] = {}
    names: dict[tuple[str, int], str] = {}
    for order, key, flat, op, suffix, comps, it, inputs in rows:
        if suffix is None:
            count_key = (comps, op)
            counts[count_key] = counts.get(count_key, -1) + 1
            suffix = f"{op}:{counts[count_key]}"
        name = "/".join(comps)
        if suffix.startswith(":") or not name:
            name += suffix
        elif suffix:
            name += "/" + suffix
        names[(key, flat)] = name

    def input_name(k, flat, stack):
        if (k, flat) in names and trace.values[k].stack == stack:
            return names[(k, flat)]
        return names.get((k, 0))

    records = []
    for index, (order, key, flat, op, _, comps, it, inputs) in enumerate(rows):
        v = trace.values[key]
        input_names = [input_name(k, flat, v.stack) for k in inputs]
        for kind, stats in (("forward", trace.forward[key]), ("backward", trace.backward[key])):
            records.append(
                ScaleRecord(
                    name=names[(key, flat)],
                    kind=kind,
                    op=op,
                    role=v.role,
                    index=index,
                    shape=v.shape,
                    dtype=v.dtype,
                    **{f: float(stats[f][flat]) for f in STAT_FIELDS},
                    scope="/".join(comps) if v.role == "activation" else "",
                    source=v.source,
                    layer=layer_of(comps, layer_regex),
                    iteration=it,
                    inputs=tuple(n for n in input_names if n is not None),
                )
            )
    return records


def _same_scale(trace: Trace, a: str, b: str, rtol: float = 1e-6) -> bool:
    """Whether values `a` and `b` have equal forward and backward RMS everywhere."""
    if trace.values[a].stack != trace.values[b].stack:
        return False
    return all(
        np.allclose(s[a]["rms"], s[b]["rms"], rtol=rtol, atol=0.0, equal_nan=True)
        for s in (trace.forward, trace.backward)
    )


def op_entries(
    trace: Trace, granularity: str = "op", prune_same_scale: bool = True
) -> list[tuple[str, str, Optional[str], tuple[str, ...]]]:
    """The entries (see `make_records`) of the `track_scales` view: arguments, then one
    entry per unit output (see the module docstring for what a unit is)."""
    if granularity not in ("op", "eqn"):
        raise ValueError(f"granularity must be 'op' or 'eqn', got {granularity!r}")
    redirect: dict[str, str] = {}
    entries = []

    def resolve(keys):
        out = []
        for k in keys:
            while k in redirect:
                k = redirect[k]
            if k not in out:
                out.append(k)
        return tuple(out)

    for key, v in sorted(trace.values.items(), key=lambda kv: kv[1].order):
        if key not in trace.forward:  # not measured (empty, or not selected)
            continue
        if v.role == "input":
            entries.append((key, "arg", "", ()))
            continue
        if granularity == "op" and v.group >= 0:
            if not escapes(v, lambda scope, group: group):
                continue
            op = trace.group_ops[v.group]
            inputs = resolve(
                k for k in trace.group_inputs[v.group] if trace.values[k].group != v.group
            )
        else:
            op = v.op
            inputs = resolve(v.inputs)
            if (
                prune_same_scale
                and len(inputs) == 1
                and not v.is_output
                and v.tag is None
                and _same_scale(trace, key, inputs[0])
            ):
                redirect[key] = inputs[0]
                continue
        entries.append((key, op, None, inputs))
    return entries
