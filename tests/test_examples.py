"""The examples run as a user runs them (`python examples/NAME.py`) and learn."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,needs", [("plain_jax_mlp", None), ("equinox_transformer", "equinox"),
                                        ("flax_nnx_or_linen", "flax")])
def test_example_runs_and_learns(name, needs):
    if needs:
        pytest.importorskip(needs)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
    result = subprocess.run([sys.executable, f"{name}.py"], cwd=os.path.join(ROOT, "examples"),
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", result.stdout)]
    assert len(losses) >= 8 and losses[-1] < 0.7 * losses[0], result.stdout[-2000:]
