"""The experiments' shared result writers."""

import json
import math

import matplotlib.pyplot as plt

from experiments import report


def test_markdown_table_formats_and_missing_cells():
    rows = [{"param": "sp", "loss": 2.3456}, {"param": "umup", "loss": math.nan}, {"param": "x"}]
    text = report.markdown_table(rows, ["param", "loss"], {"loss": ".2f"})
    assert text.splitlines() == ["| param | loss |", "|---|---|", "| sp | 2.35 |",
                                 "| umup | - |", "| x | - |"]


def test_write_results_records_command_and_machine(tmp_path):
    paths = report.write_results(str(tmp_path), [{"a": 1}], "| a |\n", "python -m x --y")
    saved = json.loads(open(paths["json"]).read())
    assert saved["rows"] == [{"a": 1}] and saved["command"] == "python -m x --y"
    assert "jax" in saved["machine"]
    assert open(paths["md"]).read().startswith("Command: `python -m x --y`")


def test_series_and_plot(tmp_path):
    metrics = [{"step": 1, "train/loss": 3.0}, {"step": 2, "eval/loss": 2.5},
               {"step": 3, "train/loss": 2.0}]
    assert report.series(metrics, "train/loss") == ([1, 3], [3.0, 2.0])
    fig, ax = plt.subplots()
    report.plot_curves(ax, {"run": report.series(metrics, "train/loss")}, "loss")
    assert report.save_figure(fig, str(tmp_path / "f.png")).endswith("f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
