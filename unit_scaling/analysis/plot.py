"""The scale plot: log2 RMS of every tensor, forward and backward, against FP8/FP16 ranges.

One row per tensor (record name) in graph order, top to bottom. The left panel shows the
forward values, the right panel their gradients, on a shared row axis. A marker is the
log2 RMS; a faint bar spans log2 of the smallest non-zero to the largest magnitude
(single-run mode). Shaded bands: the normal range `[min_normal, max]` of FP16, FP8 E5M2
and FP8 E4M3 (unit scaling aims to keep every tensor's RMS near 0 on this axis, well
inside the E4M3 band). Compare mode draws several runs with different markers, slightly
offset within each row.

Uses matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from unit_scaling.analysis.records import FORMATS, ScaleRecord, log2  # noqa: E402

_BANDS = (  # (format key, legend label, colour, alpha); alpha 0: drawn as edges only
    ("e5m2", "FP8 E5M2 normal range", "#55a868", 0.12),
    ("e4m3", "FP8 E4M3 normal range", "#dd8452", 0.18),
    ("fp16", "FP16 normal range", "#4c72b0", 0.0),
)
_RUN_STYLES = (
    ("o", "#1f77b4"),
    ("s", "#d62728"),
    ("^", "#2ca02c"),
    ("D", "#9467bd"),
    ("v", "#ff7f0e"),
    ("P", "#8c564b"),
)
_ROLE_COLOURS = {"param": "#c44e52", "input": "#8172b2", "activation": "#1f77b4"}


def _row_names(runs: dict[str, Sequence[ScaleRecord]]) -> list[str]:
    """Names in graph order: the first run's order, other runs' new names after the
    name that precedes them in their own run."""
    order: list[str] = []
    for records in runs.values():
        names = sorted({(r.index, r.name) for r in records})
        previous = None
        for _, name in names:
            if name not in order:
                at = order.index(previous) + 1 if previous in order else len(order)
                order.insert(at, name)
            previous = name
    return order


def plot_scales(
    records: Optional[Sequence[ScaleRecord]],
    path: str,
    compare: Optional[dict[str, Sequence[ScaleRecord]]] = None,
    *,
    title: str = "",
    max_rows: Optional[int] = 400,
    show_range: bool = True,
) -> plt.Figure:
    """Writes the scale plot of `records` (or of the runs in `compare`) to `path` (PNG).

    Args:
      records: one run's records (`track_scales` / `track_model_scales`); may be None
        when `compare` is given.
      path: output file (the extension picks the format; `.png` recommended).
      compare: `{run name: records}`, e.g. `{"sp": ..., "unit": ..., "umup": ...}`;
        rows are matched by record name; `records`, if also given, is drawn first as
        run "this".
      title: figure title.
      max_rows: draw at most this many rows (the first ones in graph order; the title
        says how many were left out). None: all.
      show_range: draw the min-non-zero..max magnitude bar (single-run mode).

    Returns:
      The matplotlib figure (already saved and closed).
    """
    runs: dict[str, Sequence[ScaleRecord]] = {}
    if records is not None:
        runs["this" if compare else ""] = records
    runs.update(compare or {})
    if not runs or not any(runs.values()):
        raise ValueError("plot_scales needs records (or a compare dict of runs)")
    names = _row_names(runs)
    n_total = len(names)
    if max_rows is not None and n_total > max_rows:
        names = names[:max_rows]
    row = {n: i for i, n in enumerate(names)}
    n = len(names)

    font = max(4.0, min(9.0, 500.0 / max(n, 1)))
    height = max(3.0, 0.3 + n * font / 60.0 + 1.7)
    label_width = min(4.5, 0.8 + max(len(s) for s in names) * font / 110.0)
    fig, axes = plt.subplots(
        1, 2, sharey=True, figsize=(label_width + 9.0, height), constrained_layout=True
    )

    multi = len(runs) > 1
    draw_range = show_range and not multi
    xs = []
    for records_ in runs.values():
        for r in records_:
            if r.name in row:
                xs.append(log2(r.rms))
                if draw_range:
                    xs += [log2(r.abs_max), log2(r.abs_min_nonzero)]
    finite = [x for x in xs if not math.isnan(x)]
    lo = max(min(finite + [-16.0]) - 1.5, -64.0)
    hi = min(max(finite + [17.0]) + 1.0, 64.0)

    offsets = [0.0] if not multi else [
        (i - (len(runs) - 1) / 2) * min(0.7 / len(runs), 0.25) for i in range(len(runs))
    ]
    for ax, kind in zip(axes, ("forward", "backward")):
        for key, label, colour, alpha in _BANDS:
            fmt = FORMATS[key]
            edges = (math.log2(fmt.min_normal), math.log2(fmt.max))
            if alpha:
                ax.axvspan(*edges, color=colour, alpha=alpha, lw=0)
            else:  # FP16's range almost equals E5M2's: mark its edges instead
                for edge in edges:
                    ax.axvline(edge, color=colour, lw=1.0, ls=":")
        ax.axvline(0.0, color="0.35", lw=0.8, ls="--")
        for (run, records_), offset, (marker, colour) in zip(runs.items(), offsets, _RUN_STYLES * 8):
            pts = [r for r in records_ if r.kind == kind and r.name in row]
            ys = [row[r.name] + offset for r in pts]
            if draw_range:
                for r, y in zip(pts, ys):
                    a, b = log2(r.abs_min_nonzero), log2(r.abs_max)
                    if not (math.isnan(a) or math.isnan(b)):
                        ax.plot([a, b], [y, y], color="0.55", alpha=0.35, lw=1.0, solid_capstyle="butt")
            colours = [colour if multi else _ROLE_COLOURS.get(r.role, colour) for r in pts]
            shown = [i for i, r in enumerate(pts) if r.rms > 0 and math.isfinite(r.rms)]
            ax.scatter(
                [log2(pts[i].rms) for i in shown], [ys[i] for i in shown],
                s=max(4.0, font * 2.2), marker=marker, c=[colours[i] for i in shown],
                label=run or None, zorder=3, linewidths=0,
            )
            # All-zero (or non-finite) tensors: hollow markers at the left edge.
            hidden = [i for i in range(len(pts)) if i not in set(shown)]
            if hidden:
                ax.scatter(
                    [lo + 0.4] * len(hidden), [ys[i] for i in hidden], s=max(4.0, font * 2.2),
                    marker=marker, facecolors="none", edgecolors=[colours[i] for i in hidden],
                    linewidths=0.8, zorder=3, clip_on=False,
                )
        # Light separators between layers.
        layers = {}
        for records_ in runs.values():
            for r in records_:
                if r.name in row:
                    layers.setdefault(r.name, r.layer)
        for i in range(1, n):
            if layers.get(names[i]) != layers.get(names[i - 1]):
                ax.axhline(i - 0.5, color="0.8", lw=0.5)
        ax.set_xlim(lo, hi)
        ax.set_title(f"{kind} (gradients)" if kind == "backward" else "forward (values)", fontsize=10)
        ax.set_xlabel("log2 RMS", fontsize=9)
        ax.grid(axis="x", color="0.85", lw=0.5)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_yticks(range(n))
    axes[0].set_yticklabels(names, fontsize=font)
    axes[0].set_ylim(n - 0.5, -0.5)

    handles = [
        Patch(color=c, alpha=a * 2, label=l) if a else Line2D([], [], color=c, ls=":", label=l)
        for _, l, c, a in _BANDS
    ]
    if multi:
        handles = axes[0].get_legend_handles_labels()[0] + handles
    else:
        handles += [
            Line2D([], [], marker="o", ls="", color=c, label=role)
            for role, c in _ROLE_COLOURS.items()
            if any(r.role == role for r in records)
        ]
    any_hidden = any(not (r.rms > 0 and math.isfinite(r.rms)) for rs in runs.values() for r in rs)
    if any_hidden:
        handles.append(
            Line2D([], [], marker="o", ls="", markerfacecolor="none", color="0.3",
                   label="at left edge: RMS 0 or not finite")
        )
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=min(len(handles), 7), frameon=False)
    full_title = title
    if n < n_total:
        full_title = f"{title}  (first {n} of {n_total} tensors)".strip()
    if full_title:
        fig.suptitle(full_title, fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig
