"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 devices each)
train exactly like one process with 8 devices."""

import os
import socket
import subprocess
import sys

from tests import test_loop
from unit_scaling.train import loop, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single = str(tmp_path / "single")
    loop.run(test_loop.config(), single, test_loop.make_task_factory(test_loop.Batches()))

    multi, port = str(tmp_path / "multi"), free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_worker", str(i), "2", str(port), multi],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    one = {r["step"]: r["train/loss"] for r in metrics.read_metrics(single)}
    two = {r["step"]: r["train/loss"] for r in metrics.read_metrics(multi)}
    assert sorted(two) == sorted(one)
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-6 * max(1.0, abs(one[step])), step
