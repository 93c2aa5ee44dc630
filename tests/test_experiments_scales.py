"""experiments/scales_at_init.py: the summary of synthetic records (shares, spreads,
zero tensors), and one end-to-end run on a one-layer tiny BERT."""

import json
import math
import os

import numpy as np
import pytest

from experiments import scales_at_init
from tests.helpers import BERT_FLAGS as BERT, DATA_FLAGS as DATA, SMALL_MODEL_FLAGS as SMALL_MODEL
from unit_scaling.analysis import STAT_FIELDS, ScaleRecord


def record(name, kind, role, rms):
    stats = {f: 0.0 for f in STAT_FIELDS if f != "rms"}
    return ScaleRecord(name=name, kind=kind, op="x", role=role, index=0, shape=(2,),
                       dtype="float32", rms=rms, **stats)


def test_summarise_shares_and_spread():
    fwd = [2.0**-2, 2.0**-1, 1.0, 2.0, 2.0**3]  # 3 of 5 in [1/2, 2] (both ends count)
    bwd = [2.0**-10, 2.0**-6, 1.0, 2.0**0.5]  # 2 of 4
    records = ([record(f"a{i}", "forward", "activation", v) for i, v in enumerate(fwd)]
               + [record(f"a{i}", "backward", "activation", v) for i, v in enumerate(bwd)]
               + [record("w", "forward", "param", 1.0), record("w", "backward", "param", 2.0**-5),
                  record("b", "forward", "param", 0.0), record("b", "backward", "param", 0.25)])
    row = scales_at_init.summarise(records)
    assert row["tensors"] == 7 and row["zero"] == 1 and row["nonfinite"] == 0
    assert (row["n_fwd"], row["n_bwd"], row["n_params"], row["n_pgrads"], row["n_all"]) == (5, 4, 1, 2, 12)
    assert row["in_fwd"] == pytest.approx(3 / 5)
    assert row["in_bwd"] == pytest.approx(2 / 4)
    assert row["in_params"] == 1.0 and row["in_pgrads"] == 0.0
    assert row["in_all"] == pytest.approx(6 / 12)
    logs = np.log2(fwd)
    assert row["std_fwd"] == pytest.approx(np.std(logs))
    assert (row["min_fwd"], row["max_fwd"]) == (-2.0, 3.0)
    assert row["p5_fwd"] == pytest.approx(np.percentile(logs, 5))
    assert row["p95_bwd"] == pytest.approx(np.percentile(np.log2(bwd), 95))
    assert (row["min_pgrads"], row["max_pgrads"]) == (-5.0, -2.0)
    assert row["std_params"] == 0.0
    # Outliers: activations only, grouped over layers, farthest first.
    layered = [record(f"stack/layer_{i}/attn_out", "forward", "activation", 2.0**(2 + i))
               for i in range(3)] + [record("loss", "forward", "activation", 8.0)]
    notes = scales_at_init.outliers(layered + records)
    assert notes[0] == "a0 (bwd): log2 RMS -10.0"
    assert "stack/layer_*/attn_out (fwd, 3x): log2 RMS 2.0..4.0" in notes
    assert not any(n.startswith(("w ", "b ")) for n in notes)


def test_main_end_to_end(tmp_path):
    out, runs = tmp_path / "results", tmp_path / "runs"
    rows = scales_at_init.main([
        "--models", "tiny=configs/bert.py:tiny", "--params", "sp,unit", "--batch_size", "2", "--seq_len", "0",
        "--max_rows", "50", "--out", str(out), "--runs", str(runs), "--",
        *DATA, *BERT, *SMALL_MODEL, "--config.model.num_layers=1"])
    assert [r["param"] for r in rows] == ["sp", "unit"]
    assert sorted(os.listdir(out)) == ["results.json", "results.md", "tiny.png"]
    assert 20_000 < os.path.getsize(out / "tiny.png") < 1_000_000
    assert os.path.exists(runs / "tiny" / "scales_param_unit.json")
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert saved["command"].startswith("python -m experiments.scales_at_init --models tiny=")
    for row in saved["rows"]:
        assert row["tensors"] > 20 and row["nonfinite"] == 0
        assert all(0.0 <= row[f"in_{g}"] <= 1.0 for g in scales_at_init.GROUPS)
        assert math.isfinite(row["std_all"])
    by_param = {r["param"]: r for r in rows}
    # The claim at small scale: unit scaling puts more gradients near RMS 1 than SP.
    assert by_param["unit"]["in_pgrads"] > by_param["sp"]["in_pgrads"]
    with open(out / "results.md") as f:
        text = f.read()
    assert text.count("| tiny | unit |") == 2  # both tables name the parametrization
    assert "Share with RMS in [1/2, 2]" in text and "![tiny](tiny.png)" in text
