"""Metrics: TensorBoard (tensorboardX), `metrics.jsonl`, console; FLOPs and MFU.

Only process 0 writes. `metrics.jsonl` holds one JSON object per logged step, e.g.
`{"step": 100, "train/loss": 3.2, "train/lr": 1e-3, "perf/step_s": 0.21, ...}`, so a
run can be read back with `pandas.read_json(path, lines=True)` without TensorBoard.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Optional

import jax
import numpy as np

from unit_scaling.train.rundir import RunDir

# Dense peak FLOP/s per chip for 16-bit matmuls (FP8: twice that on Hopper), from the
# vendors' datasheets. Matched against `jax.devices()[0].device_kind`, first hit wins.
PEAK_FLOPS = (
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
    ("A100", 312e12),
    ("H100", 989e12),  # SXM, bf16 dense
    ("H200", 989e12),
)


def peak_flops_per_device(device_kind: str, fp8: bool = False) -> Optional[float]:
    """Peak dense FLOP/s of one device, or None when unknown (CPU, other GPUs)."""
    for name, peak in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peak * (2 if fp8 and name in ("H100", "H200") else 1)
    return None


@dataclasses.dataclass(frozen=True)
class TransformerShape:
    """What the FLOP count needs to know about a model."""

    num_layers: int
    d_model: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    vocab_size: int
    glu: bool  # SwiGLU: three MLP matmuls instead of two
    causal: bool


def train_flops_per_step(
    shape: TransformerShape,
    batch: int,
    seq_len: int,
    readout_tokens: Optional[int] = None,
    extra_matmul_flops: float = 0.0,
) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), as MaxText.

    Counts the matmuls only: QKV and output projections, the MLP, attention scores and
    values (`4 B S^2 H Dh` per layer, halved when causal), and the readout on
    `readout_tokens` tokens (default all `B*S`; BERT's MLM head sees only the masked
    positions: pass `B*P` and its dense layer in `extra_matmul_flops`). The embedding
    lookup is free.
    """
    tokens = batch * seq_len
    d, h, dh = shape.d_model, shape.num_heads, shape.head_dim
    qkv_out = 2 * tokens * d * (3 * h * dh) + 2 * tokens * h * dh * d
    mlp = 2 * tokens * d * shape.mlp_dim * (3 if shape.glu else 2)
    attention = 4 * batch * seq_len**2 * h * dh * (0.5 if shape.causal else 1.0)
    readout = 2 * (tokens if readout_tokens is None else readout_tokens) * d * shape.vocab_size
    forward = shape.num_layers * (qkv_out + mlp + attention) + readout + extra_matmul_flops
    return 3.0 * forward


class MetricWriter:
    """Writes scalars to TensorBoard, `WORKDIR/metrics.jsonl` and the console."""

    def __init__(self, workdir: "str | RunDir", enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_dir = RunDir(workdir)
        self.jsonl_path = self.run_dir.metrics_path
        self.tensorboard_dir = str(self.run_dir.tensorboard)
        self._tb = None
        if self.enabled:
            import tensorboardX  # deferred: costs ~1 s to import

            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            self._tb = tensorboardX.SummaryWriter(self.tensorboard_dir)

    def truncate(self, last_step: int) -> int:
        """After a resume from `last_step`: drops the `metrics.jsonl` rows logged after
        it (by the interrupted run), so every step appears once. Returns how many."""
        return self.run_dir.truncate_metrics(last_step) if self.enabled else 0

    def write(self, step: int, scalars: Mapping[str, float], console: bool = True) -> None:
        if not self.enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        # JSON has no NaN/inf: write them as strings so they stay visible.
        row = {k: v if math.isfinite(v) else str(v) for k, v in values.items()}
        self.run_dir.append_metrics({"step": int(step), **row})
        for key, value in values.items():
            self._tb.add_scalar(key, value, int(step))
        self._tb.flush()
        if console:
            logging.info(
                "step %d: %s", step, ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(values.items()))
            )

    def write_text(self, tag: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(tag, text)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `WORKDIR/metrics.jsonl` (`RunDir.read_metrics`)."""
    return RunDir(workdir).read_metrics()
