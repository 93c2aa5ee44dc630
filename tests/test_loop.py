"""The training loop on a toy model: resume after SIGTERM equals an uninterrupted run
(bitwise on CPU), a non-finite loss stops the run and keeps the last good checkpoint."""

import os
import signal

import ml_collections
import numpy as np
import pytest

from tests.test_train_infra import train_config
from tests.test_train_step import Toy
from unit_scaling.train import loop, metrics


class Batches:
    """A deterministic iterator with grain-style get_state/set_state."""

    def __init__(self, kill_at=None, nan_at=None, shard=(0, 1), loss_mult=1.0):
        self.index, self.kill_at, self.nan_at, self.loss_mult = 0, kill_at, nan_at, loss_mult
        self.shard = shard  # (process_index, process_count): rows of the global batch

    def __next__(self):
        self.index += 1
        if self.index == self.kill_at:
            os.kill(os.getpid(), signal.SIGTERM)
        rng = np.random.default_rng(self.index)
        x = rng.normal(size=(16, 4)).astype(np.float32)
        scale = np.inf if self.index == self.nan_at else self.loss_mult
        batch = {"x": x, "y": np.sin(x.sum(-1)), "scale": np.full((16,), scale, np.float32)}
        index, count = self.shard
        return {k: np.split(v, count)[index] for k, v in batch.items()}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def config(**train):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = {"name": "toy"}
    c.param = "sp"
    c.data = {"vocab_size": 0}
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1, "rules": [["batch", ["data", "fsdp"]]]}
    c.train = train_config(steps=10, warmup_steps=2, global_batch_size=16, log_every=1,
                           eval_every=0, eval_batches=1, checkpoint_every=5,
                           keep_checkpoints=3, rms_every=5, profile_start=0,
                           profile_steps=0)
    c.train.update(train)
    return c


def make_task_factory(batches):
    def make_task(cfg):
        return loop.Task(
            model=Toy(), train_batches=batches, eval_batches=None,
            get_data_state=batches.get_state, set_data_state=batches.set_state,
            optimizer_parts=lambda params: {}, flops_per_step=1e6, tokens_per_batch=16,
        )
    return make_task


def losses(workdir):
    return {r["step"]: r["train/loss"] for r in metrics.read_metrics(workdir)}


def test_resume_after_sigterm_is_bitwise_identical(tmp_path):
    full = loop.run(config(), str(tmp_path / "full"), make_task_factory(Batches()))
    assert "rms/grads/Dense_0/kernel" in full and full["perf/tflops_per_s"] > 0

    workdir = str(tmp_path / "resumed")
    loop.run(config(), workdir, make_task_factory(Batches(kill_at=4)))
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
    loop.run(cfg, str(tmp_path), make_task_factory(Batches(loss_mult=1e4)))
    assert max(losses(str(tmp_path))) == 14
