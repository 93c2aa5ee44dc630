"""Two processes on localhost (jax.distributed, gloo CPU collectives, 4 devices each)
train exactly like one process with 8 devices, and stop together on a SIGTERM that
only one of them receives."""

import os
import socket
import subprocess
import sys

from tests import helpers
from unit_scaling.train import loop, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(workdir: str, *extra: str) -> list[tuple[int, str]]:
    """Runs the two workers on `workdir`; their (exit status, output)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multihost_worker", str(i), "2", str(port), workdir, *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    return [(p.returncode, out) for p, out in ((p, p.communicate(timeout=240)[0]) for p in procs)]


def test_two_processes_match_one(tmp_path):
    single = str(tmp_path / "single")
    loop.run(helpers.toy_loop_config(), single, helpers.make_task_factory(helpers.Batches()))

    multi = str(tmp_path / "multi")
    for returncode, out in two_processes(multi):
        assert returncode == 0, out[-3000:]
    one = {r["step"]: r["train/loss"] for r in metrics.read_metrics(single)}
    two = {r["step"]: r["train/loss"] for r in metrics.read_metrics(multi)}
    assert sorted(two) == sorted(one)
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-6 * max(1.0, abs(one[step])), step


def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path):
    """Only process 0 gets SIGTERM (at batch 3); process 1 learns it through the
    flag all-gathered every `preemption_check_every` = 2 steps, so both save step 4
    together and exit 143. Without the agreement process 1 would train on alone and
    hang in the next collective."""
    workdir = str(tmp_path / "multi")
    results = two_processes(workdir, "3")
    for i, (returncode, out) in enumerate(results):
        assert returncode == loop.EXIT_PREEMPTED, out[-3000:]
        assert f"process {i}: preempted by SIGTERM: saved step 4" in out, out[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    assert max(r["step"] for r in metrics.read_metrics(workdir)) == 4
