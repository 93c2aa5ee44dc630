"""The inspection CLI: `python -m unit_scaling.data --config ... --stats`."""

import json
import os
import subprocess
import sys

import pytest

from configs.common import REPO
from tests.helpers import SMALL_CORPUS


def run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # UNIT_SCALING_CACHE_DIR: the test cache
    done = subprocess.run(
        [sys.executable, "-m", "unit_scaling.data", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


SMALL = [
    f"--config.data.corpus={SMALL_CORPUS}",
    "--config.data.vocab_size=1000",
    "--config.data.tokenizer=bpe",
    "--config.data.seq_len=64",
]


@pytest.mark.parametrize("objective", ["bert", "causal_lm"])
def test_stats_json_is_the_last_line(objective):
    extra = ["--config.data.max_predictions_per_seq=10"] if objective == "bert" else []
    lines = run_cli(
        f"--config=configs/{objective}.py:tiny",
        *SMALL,
        *extra,
        "--stats",
        "--batches=30",
        "--show=2",
    )
    result = json.loads(lines[-1])
    assert result["examples_per_s"] > 0 and result["batches_per_s"] > 0
    assert result["seq_len"] == 64 and result["num_batches"] == 30
    if objective == "bert":
        assert lines[0].startswith("--- example 0:")
        assert any(line.startswith("A: ") for line in lines)
        assert abs(result["mask_fraction"] - 0.15) < 0.02
        assert abs(result["mask_token_fraction"] - 0.8) < 0.05
        assert abs(result["random_token_fraction"] - 0.1) < 0.04
        assert abs(result["kept_fraction"] - 0.1) < 0.04
        assert 0.35 < result["nsp_positive_fraction"] < 0.6
        assert 0 <= result["padding_fraction"] < 0.3
    else:
        assert lines[0].startswith("--- row 0:")
        assert result["packing_efficiency"] > 0.9
        assert abs(result["padding_fraction"] + result["packing_efficiency"] - 1) < 1e-4


def test_bad_config_value_fails_with_the_field():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "unit_scaling.data",
            "--config=configs/bert.py:tiny",
            "--config.data.seq_len=4",
            "--stats",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "data.seq_len=4 is too small" in done.stderr
