"""`RunDir`: the workdir layout through etils.epath, so remote URLs (gs://) work; the
lock; metrics truncation. Remote storage is faked by an epath backend that maps
`gs://BUCKET/...` onto a local directory (no network)."""

import json
import os
import socket

import ml_collections
import pytest
from etils.epath import testing as epath_testing

from unit_scaling.train import metrics
from unit_scaling.train.rundir import RunDir, RunDirError, short_reason


def fake_gcs(root):
    """Every epath operation on `gs://...` lands in `root/...` instead."""

    def local(path):
        path = os.fspath(path)
        return os.path.join(root, path[len("gs://"):]) if path.startswith("gs://") else path

    def on_paths(count):
        def fn(original, *args, **kwargs):
            args = [local(a) if i < count else a for i, a in enumerate(args)]
            return original(*args, **kwargs)
        return fn

    one, two = on_paths(1), on_paths(2)
    return epath_testing.mock_epath(
        open=one, exists=one, isdir=one, listdir=one, glob=one, makedirs=one, mkdir=one,
        remove=one, rmtree=one, stat=one, walk=one, rename=two, replace=two, copy=two)


def test_remote_workdir_goes_through_epath(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "fake-gcs"
    with fake_gcs(str(bucket)):
        run = RunDir("gs://bucket/run")
        assert str(run.checkpoints) == "gs://bucket/run/checkpoints" and run.remote
        run.check_usable()
        config = checkpoint_config()
        run.write_config(config)
        assert run.read_config().train.steps == 10
        for step in (1, 2, 3):
            run.append_metrics({"step": step, "train/loss": 1.0 / step})
        assert run.truncate_metrics(2) == 1
        assert [r["step"] for r in run.read_metrics()] == [1, 2]
        (run.checkpoints / "5").mkdir(parents=True)
        (run.checkpoints / "10.orbax-checkpoint-tmp-1").mkdir()
        assert run.checkpoint_steps() == [5]
        with run.lock():
            holder = json.loads((bucket / "bucket" / "run" / "lock").read_text())
            assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert not (bucket / "bucket" / "run" / "lock").exists()
        assert "unknown" in run.free_space()
    assert (bucket / "bucket" / "run" / "config.json").exists()
    assert not (tmp_path / "gs:").exists()  # the old bug: ./gs:/bucket/run on local disk


def checkpoint_config():
    return ml_collections.ConfigDict({"train": {"steps": 10}, "data": {"corpus": "kjv"}})


def test_local_paths_are_absolute_and_metrics_read_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = RunDir("runs/a")
    assert str(run) == str(tmp_path / "runs" / "a") and not run.remote
    run.check_usable()
    writer = metrics.MetricWriter(run, enabled=True)
    writer.write(1, {"train/loss": 2.0}, console=False)
    writer.write(2, {"train/loss": float("nan")}, console=False)
    writer.close()
    assert metrics.read_metrics("runs/a") == [{"step": 1, "train/loss": 2.0},
                                              {"step": 2, "train/loss": "nan"}]
    assert os.listdir(run.tensorboard)


def test_lock_held_on_another_host_says_how_to_clear_it(tmp_path):
    run = RunDir(tmp_path)
    run.lock_path.write_text(json.dumps({"host": "other-host", "pid": 123, "started": 0}))
    with pytest.raises(RunDirError, match=r"in use by process 123 on host other-host.*delete .*lock"):
        with run.lock():
            pass
    assert json.loads(run.lock_path.read_text())["host"] == "other-host"  # left alone


def test_missing_and_empty_workdirs_name_the_problem(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        RunDir(tmp_path / "nope").read_config()
    with pytest.raises(RunDirError, match="no config.json"):
        RunDir(tmp_path).read_config()
    with pytest.raises(RunDirError, match="has no checkpoint"):
        RunDir(tmp_path).restore_params()



def test_a_workdir_that_cannot_be_written_is_refused(tmp_path):
    # (Permission bits do not stop root, who runs the CI: fake the failing write.)
    def no_writes(original, path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise PermissionError(13, "Permission denied")
        return original(path, mode, *args, **kwargs)

    with epath_testing.mock_epath(open=no_writes):
        with pytest.raises(RunDirError, match=r"is not writable \(Permission denied\)"):
            RunDir(tmp_path / "run").check_usable()


def fake_run(path, objective, steps=()):
    run = RunDir(path)
    run.check_usable()
    run.write_config(ml_collections.ConfigDict({"data": {"objective": objective}}))
    for step in steps:
        (run.checkpoints / str(step)).mkdir(parents=True)
    return str(path)


def test_init_from_must_be_a_pretraining_run_with_a_checkpoint(tmp_path):
    from unit_scaling.errors import ConfigError
    from unit_scaling.train import tasks

    config = ml_collections.ConfigDict({"init_from": fake_run(tmp_path / "lm", "causal_lm", [2])})
    with pytest.raises(ConfigError, match="trained 'causal_lm'.*from an 'mlm_nsp' pretraining run"):
        tasks.check_init_from(config)
    config.init_from = fake_run(tmp_path / "bert", "mlm_nsp")
    with pytest.raises(ConfigError, match="has no checkpoint in .*checkpoints"):
        tasks.check_init_from(config)
    config.init_from = fake_run(tmp_path / "bert2", "mlm_nsp", [2])
    tasks.check_init_from(config)  # a finished pretraining run passes


def test_short_reason_keeps_the_os_error_of_a_long_or_chained_message():
    """tensorstore's messages run to hundreds of characters with the OS error inside
    ("File too large [os_error_code=27]"); a save can also surface as another error
    raised from it. The one-line reason keeps the OS error either way."""
    long = ValueError("OUT_OF_RANGE: Error writing in OCDBT at " + "a" * 400
                      + ": Failed to write 9 bytes: File too large [os_error_code='27'] "
                      + "[source locations='" + "b" * 300 + "']")
    assert "File too large" in short_reason(long) and len(short_reason(long)) < 400
    try:
        try:
            raise long
        except ValueError as cause:
            raise RuntimeError("Event loop is closed") from cause
    except RuntimeError as e:
        assert short_reason(e) == "RuntimeError: Event loop is closed [File too large]"
    assert short_reason(OSError("disk full")) == "OSError: disk full"
    # The zarr driver's variant: the spec between the OS error and its code.
    spec = ValueError("OUT_OF_RANGE: Error opening \"zarr\" driver: " + "c" * 400
                      + ": Failed to write 7 bytes to file 7: File too large [tensorstore_spec="
                      + "'{\\\"path\\\":\\\"" + "d" * 300 + "\\\",\\\"shape\\\":[512]}'] "
                      + "[os_error_code='27']")
    assert short_reason(spec).endswith(" [File too large]"), short_reason(spec)
