"""The training loop on a toy model: resume after SIGTERM equals an uninterrupted run
(bitwise on CPU), a non-finite loss stops the run and keeps the last good checkpoint."""

import dataclasses
import json
import os
import signal

import numpy as np
import pytest

from tests.helpers import Batches, make_task_factory, toy_loop_config as config
from unit_scaling.train import loop, metrics


def losses(workdir):
    return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir)}


def test_resume_after_sigterm_is_bitwise_identical(tmp_path):
    full = loop.run(config(), str(tmp_path / "full"), make_task_factory(Batches()))
    assert "rms/grads/Dense_0/kernel" in full and full["perf/tflops_per_s"] > 0

    workdir = str(tmp_path / "resumed")
    with pytest.raises(loop.Preempted, match="preempted by SIGTERM: saved step 4") as e:
        loop.run(config(), workdir, make_task_factory(Batches(kill_at=4)))
    assert e.value.exit_code == loop.EXIT_PREEMPTED == 143
    assert max(losses(workdir)) == 4  # stopped after saving step 4
    assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))
    loop.run(config(), workdir, make_task_factory(Batches()))
    full_losses, resumed = losses(str(tmp_path / "full")), losses(workdir)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == full_losses[step], step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLossError, match=r"train/loss.*last good checkpoint is step 5"):
        loop.run(config(), str(tmp_path), make_task_factory(Batches(nan_at=7)))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]


def test_dynamic_loss_scale_skips_overflowing_steps_and_resumes(tmp_path):
    # A loss of ~1e4 times 2^120 overflows float32: those steps skip their update and
    # halve the scale until the scaled loss and gradients are finite; the run goes on.
    cfg = config(loss_scale="dynamic", loss_scale_value=2.0**120, steps=12)
    loop.run(cfg, str(tmp_path), make_task_factory(Batches(loss_mult=1e4)))
    rows = {r["step"]: r for r in metrics.read_metrics(str(tmp_path))}
    scales = [rows[s]["train/loss_scale"] for s in range(1, 13)]
    assert rows[1]["train/grads_finite"] == 0.0 and scales[:2] == [2.0**120, 2.0**119]
    assert scales == sorted(scales, reverse=True) and rows[12]["train/grads_finite"] == 1.0
    assert np.isfinite(rows[12]["train/loss"]) and scales[-1] >= 2.0**100
    # The checkpointed state (a DynamicLossScale among arrays) restores and goes on.
    cfg.train.steps = 14
    cfg.train.allow_resume_changes = True
    loop.run(cfg, str(tmp_path), make_task_factory(Batches(loss_mult=1e4)))
    assert max(losses(str(tmp_path))) == 14


# ------------------------------------------------------------- faults and resumes
# Each test injects one fault and asserts what is on disk and what the error says.

from unit_scaling.errors import ConfigError  # noqa: E402
from unit_scaling.train import checkpoint, rundir  # noqa: E402


def checkpoints(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = checkpoint.ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 10:
            raise OSError(28, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", save)
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
        loop.run(config(), str(tmp_path), make_task_factory(Batches()))
    message = str(e.value)
    assert f"could not save step 10 in {tmp_path}/checkpoints" in message
    assert "No space left on device" in message and "GB free" in message
    assert "step 5, is intact" in message
    assert checkpoints(tmp_path) == [5]
    monkeypatch.undo()  # the disk has room again: the same command resumes from step 5
    loop.run(config(), str(tmp_path), make_task_factory(Batches()))
    assert checkpoints(tmp_path) == [5, 10]


def test_save_comes_before_eval_and_an_empty_eval_split_fails_at_start(tmp_path, monkeypatch):
    events = []
    real_save = checkpoint.Checkpointer.save
    monkeypatch.setattr(checkpoint.Checkpointer, "save",
                        lambda self, step, *a, **k: events.append(("save", step)) or real_save(self, step, *a, **k))

    def with_eval(eval_batches):
        def make_task(cfg):
            return dataclasses.replace(make_task_factory(Batches())(cfg), eval_batches=eval_batches)
        return make_task

    def eval_batches():
        events.append(("eval", len(events)))
        return iter([Batches().__next__()])

    loop.run(config(eval_every=5), str(tmp_path / "ok"), with_eval(eval_batches))
    order = [e[0] for e in events[1:]]  # events[0]: the start-up check of the eval split
    assert order == ["save", "eval", "save", "eval"], events

    with pytest.raises(ConfigError, match="eval split is empty.*eval_fraction"):
        loop.run(config(eval_every=5), str(tmp_path / "empty"), with_eval(lambda: iter([])))
    assert not os.path.exists(tmp_path / "empty" / "metrics.jsonl")  # failed before step 1


def test_ctrl_c_saves_and_reports_an_interrupt(tmp_path):
    class Interrupting(Batches):
        def __next__(self):
            if self.index + 1 == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return super().__next__()

    with pytest.raises(loop.Preempted, match="SIGINT: saved step 3") as e:
        loop.run(config(), str(tmp_path), make_task_factory(Interrupting()))
    assert e.value.exit_code == loop.EXIT_INTERRUPTED == 130
    assert checkpoints(tmp_path) == [3]


def test_resume_refuses_a_changed_trajectory_unless_allowed(tmp_path, capsys):
    loop.run(config(steps=5), str(tmp_path), make_task_factory(Batches()))
    before = (tmp_path / "config.json").read_text()
    changed = config(steps=8, lr=2e-3)
    with pytest.raises(ConfigError) as e:
        loop.run(changed, str(tmp_path), make_task_factory(Batches()))
    assert "train.steps: 5 -> 8" in str(e.value) and "train.lr: 0.001 -> 0.002" in str(e.value)
    assert "allow_resume_changes=true" in str(e.value)
    assert (tmp_path / "config.json").read_text() == before  # a refused resume writes nothing
    workers = config(steps=5)
    workers.data.num_workers = 2  # the saved iterator state needs the same count
    with pytest.raises(ConfigError, match=r"data.num_workers: 0 -> 2.*saved data-iterator state"):
        loop.run(workers, str(tmp_path), make_task_factory(Batches()))
    changed.train.allow_resume_changes = True
    loop.run(changed, str(tmp_path), make_task_factory(Batches()))
    assert "resuming with a changed config: train.lr: 0.001 -> 0.002" in capsys.readouterr().err
    assert '"steps": 8' in (tmp_path / "config.json").read_text()


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    with pytest.raises(loop.NonFiniteLossError):  # steps 1-6 logged, checkpoint at 5
        loop.run(config(), str(tmp_path), make_task_factory(Batches(nan_at=7)))
    assert max(losses(tmp_path)) == 6
    loop.run(config(), str(tmp_path), make_task_factory(Batches()))
    steps = [r["step"] for r in metrics.read_metrics(str(tmp_path))]
    assert steps == list(range(1, 11))


def test_one_run_per_workdir(tmp_path, caplog):
    import socket
    import subprocess

    workdir = rundir.RunDir(tmp_path)
    workdir.lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": 0}))
    with pytest.raises(rundir.RunDirError, match=f"in use by process {os.getppid()}"):
        loop.run(config(steps=2), str(tmp_path), make_task_factory(Batches()))
    assert not os.path.exists(tmp_path / "config.json")
    dead = subprocess.Popen(["true"])
    dead.wait()
    workdir.lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0}))
    loop.run(config(steps=2), str(tmp_path), make_task_factory(Batches()))
    assert f"stale lock of process {dead.pid}" in caplog.text
    assert not workdir.lock_path.exists()  # released at the end


def test_corrupt_latest_checkpoint_names_the_step_and_the_fix(tmp_path):
    loop.run(config(), str(tmp_path), make_task_factory(Batches()))
    for root, _, files in os.walk(tmp_path / "checkpoints" / "10" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    resume = config(steps=12, allow_resume_changes=True)
    with pytest.raises(checkpoint.CheckpointRestoreError) as e:
        loop.run(resume, str(tmp_path), make_task_factory(Batches()))
    message = str(e.value)
    assert "checkpoint step 10" in message and "--config.train.restore_step=5" in message
    assert len(message) < 800 and "Traceback" not in message
    resume.train.restore_step = 5
    loop.run(resume, str(tmp_path), make_task_factory(Batches()))
    assert checkpoints(tmp_path) == [5, 10, 12]  # 10 saved anew by the resumed run
    assert os.listdir(tmp_path / "skipped_checkpoints") == ["10"]
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == list(range(1, 13))


@pytest.mark.parametrize("setting,match", [
    (dict(grad_accum=0), "config.train.grad_accum=0 must be >= 1"),
    (dict(preemption_check_every=0), "config.train.preemption_check_every=0 must be >= 1"),
    (dict(restore_step=7), "restore_step=7: no checkpoint at that step"),
])
def test_bad_loop_settings_fail_before_training(tmp_path, setting, match):
    with pytest.raises(ConfigError, match=match):
        loop.run(config(**setting), str(tmp_path), make_task_factory(Batches()))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_workdir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(rundir.RunDirError, match="is a file"):
        loop.run(config(), str(tmp_path / "run"), make_task_factory(Batches()))


def test_a_file_url_workdir_trains_and_resumes(tmp_path):
    url = "file://" + str(tmp_path / "run")
    loop.run(config(steps=5), url, make_task_factory(Batches()))
    loop.run(config(steps=5), url, make_task_factory(Batches()))  # nothing left: resumes at 5
    assert checkpoints(tmp_path / "run") == [5] and max(losses(url)) == 5
    assert (tmp_path / "run" / "config.json").exists() and not os.path.exists("file:")
