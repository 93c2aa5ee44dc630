"""What every experiment writes: a markdown table, the same rows as JSON, loss curves.

Experiments keep their results under `experiments/results/NAME/` (`results.json`,
`results.md`, figures), small enough to commit; the runs themselves go to `runs/`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on a training box
import matplotlib.pyplot as plt  # noqa: E402


def _cell(value: Any, fmt: Optional[str]) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str],
                   formats: Optional[Mapping[str, str]] = None) -> str:
    """A GitHub markdown table of `columns` (missing or NaN cells print as `-`);
    `formats` maps a column to a format spec, e.g. `{"loss": ".3f"}`."""
    formats = formats or {}
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), formats.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    """One line naming the machine and software, for the results' provenance."""
    import jax

    devices = jax.devices()
    return (f"{len(devices)} x {devices[0].device_kind} ({platform.machine()}, "
            f"{os.cpu_count()} CPU cores), jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")


def write_results(out_dir: str, rows: Sequence[Mapping[str, Any]], markdown: str,
                  command: str) -> dict[str, str]:
    """Writes `results.json` (rows, command, machine) and `results.md` (the command,
    the machine and `markdown`) into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"),
             "md": os.path.join(out_dir, "results.md")}
    where = machine()
    with open(paths["json"], "w") as f:
        json.dump({"command": command, "machine": where, "rows": list(rows)}, f, indent=1)
    with open(paths["md"], "w") as f:
        f.write(f"Command: `{command}`\n\nMachine: {where}\n\n{markdown}")
    return paths


def plot_curves(ax, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                ylabel: str, title: str = "", log_x: bool = False,
                style: Optional[Callable[[str], dict]] = None) -> None:
    """One line per `label -> (xs, ys)` on `ax`; `style(label)` gives plot kwargs."""
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, **(style(label) if style else {}))
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """`(steps, values)` of `key` in a run's metrics rows (`metrics.read_metrics`)."""
    pairs = [(m["step"], m[key]) for m in metrics if key in m]
    return [s for s, _ in pairs], [v for _, v in pairs]


def save_figure(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
