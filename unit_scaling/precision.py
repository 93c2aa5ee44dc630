"""`Precision`: how a model's numbers are stored and multiplied, one frozen dataclass.

A config names a precision ("fp32", "bf16", "fp16", "fp8") plus a few flags;
`Precision.from_name` turns them into what the layers read: the compute dtype, the
parameter dtype, the `formats.FormatPolicy` of the linear layers' matmuls (None: no
quantisation), that of the two attention matmuls, and whether the u-μP "critical"
matmuls (attention output projection, MLP down-projection) stay in the compute dtype.

`LossScaling` holds the loss-scaling defaults (none; 2^15; double after 2000 good
steps). They are not a field of `Precision`, and no precision implies a loss scale:
whether a run needs one depends on the parametrization as much as on the precision
(unit scaling and u-μP need none in any of these; SP in fp16/fp8 may), and SP without
one is itself a measured baseline (`experiments/low_precision.py`). The config's
`train.loss_scale*` fields take their defaults from it (`configs/common.py`), and
`train.optimizer.make_loss_scale` turns them into a `jmp` loss scale.

Imports only jax and `unit_scaling.formats`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from unit_scaling import formats as formats_lib

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
LOSS_SCALES = ("none", "static", "dynamic")
PARAM_DTYPES = ("float32", "bfloat16")
_COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16,
                   "fp8": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Precision:
    """What the layers compute in (the default is plain float32).

    Fields:
      dtype: the compute dtype (activations, and parameters as the ops see them).
      param_dtype: the dtype parameters are stored and updated in.
      formats: the FormatPolicy of every linear layer's matmul, or None.
      attention_formats: the FormatPolicy of the two attention matmuls, or None.
      high_precision_critical: the critical matmuls (`matmul_formats(critical=True)`)
        ignore `formats` and run in the compute dtype.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    formats: Optional[formats_lib.FormatPolicy] = None
    attention_formats: Optional[formats_lib.FormatPolicy] = None
    high_precision_critical: bool = False

    def matmul_formats(self, critical: bool = False) -> Optional[formats_lib.FormatPolicy]:
        """The FormatPolicy of a linear layer's matmul; None for a `critical` one under
        `high_precision_critical`."""
        return None if critical and self.high_precision_critical else self.formats

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        real_fp8: bool = False,
        high_precision_critical: bool = False,
        fp8_attention: bool = False,
        param_dtype: str = "float32",
    ) -> "Precision":
        """The precision `name` with the config's flags.

        - "fp32": float32, no quantisation.
        - "bf16": bfloat16 compute.
        - "fp16": float16 compute (unit scaling keeps values in range without a loss scale).
        - "fp8": bfloat16 compute and `formats.FP8` (E4M3 forward operands, E5M2 output
          gradients) on the linear layers; simulated unless `real_fp8` (float8 casts
          that XLA lowers to FP8 GEMMs on H100). `fp8_attention` quantises the two
          attention matmuls too; `high_precision_critical` keeps the critical ones out.
        Parameters stay in `param_dtype` ("float32" or "bfloat16") in every case.
        """
        if name not in PRECISIONS:
            raise ValueError(f"precision={name!r} is unknown; set precision to one of {PRECISIONS}")
        if param_dtype not in PARAM_DTYPES:
            raise ValueError(
                f"param_dtype={param_dtype!r} is unknown; set param_dtype to one of {PARAM_DTYPES}"
            )
        policy = None
        if name == "fp8":
            policy = dataclasses.replace(formats_lib.FP8, real=bool(real_fp8))
        return cls(
            dtype=_COMPUTE_DTYPES[name], param_dtype=jnp.dtype(param_dtype), formats=policy,
            attention_formats=policy if fp8_attention else None,
            high_precision_critical=high_precision_critical,
        )


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """How the loss is multiplied before the backward pass (the SP fp16/fp8 baselines).

    Fields (config: `train.loss_scale`, `train.loss_scale_value`, `train.loss_scale_period`):
      kind: "none" (unit scaling and u-μP need none), "static" (multiply the loss by
        `value`, divide the gradients by it) or "dynamic" (start at `value`, halve it
        and skip the step on non-finite gradients, double it after `period` finite ones).
      value: 2^15, the static scale of the unit-scaling paper's FP16/FP8 SP baselines:
        it lifts SP's smallest gradients (RMS ~1e-7 at batch 64) above E5M2's 2^-16
        flush point while the largest stay far below FP16's 65504.
      period: 2000 good steps before a dynamic scale doubles (the usual mixed-precision
        setting, jmp's and PyTorch's GradScaler's).
    """

    kind: str = "none"
    value: float = 2.0**15
    period: int = 2000

    def __post_init__(self) -> None:
        if self.kind not in LOSS_SCALES:
            raise ValueError(f"config.train.loss_scale={self.kind!r}: use one of {LOSS_SCALES}")
        if not self.value > 0:
            raise ValueError(f"config.train.loss_scale_value={self.value!r}: must be > 0 "
                             "(2^15 is the usual start)")
        if self.period < 1:
            raise ValueError(f"config.train.loss_scale_period={self.period!r}: must be >= 1")
