"""The sweep runner's grid, commands and result collection."""

import json

import pytest

from experiments import sweep


def test_grid_commands_split_arg_and_overrides(capsys):
    sweep.main(["--config", "configs/causal_lm.py:tiny", "--grid", "param=sp,umup",
                "--grid", "config.train.lr=1e-3,1e-2", "--workdir", "runs/s", "--print",
                "--", "--config.train.steps=5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert "--config=configs/causal_lm.py:tiny,param=umup" in lines[3]
    assert "--config.train.lr=1e-2" in lines[3] and lines[3].endswith("--config.train.steps=5")
    assert "--workdir=runs/s/param=umup,train.lr=1e-2" in lines[3]


def test_train_flags_after_double_dash_are_split_off():
    assert sweep.split_train_flags(("--steps", "5", "--", "--config.seed=1")) == (
        ["--steps", "5"], ["--config.seed=1"])
    assert sweep.split_train_flags(["--help"]) == (["--help"], [])


def test_bad_grid_axis():
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        sweep.parse_grid(["lr"])


def test_collect_and_finished(tmp_path):
    run = tmp_path / "param=umup,train.lr=0.01"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"steps": 2}}))
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    assert not sweep.finished(str(run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/loss": 2.5}\n')
    assert sweep.finished(str(run))
    (row,) = sweep.collect(str(tmp_path))
    assert row["param"] == "umup" and row["train.lr"] == "0.01" and row["train/loss"] == 2.5
