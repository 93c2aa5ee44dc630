"""Dense layers: `Linear` (hidden matmuls) and `LinearReadout` (the final projection).

Both run `ops.linear` / `ops.readout` on a `[fan_in, features]` kernel, so the same
module is a plain dense layer under `sp` and a unit-scaled one under `unit`/`umup`
(forward fan_in^-1/2, readout fan_in^-1). Matmul operands follow the precision's
`formats`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

from unit_scaling.nn.module import ScaledModule


class Linear(ScaledModule):
    """`y = x @ kernel + bias`, scaled per the parametrization.

    Shapes: x `[..., fan_in]` -> y `[..., features]`; kernel `[fan_in, features]`
    (logical `kernel_axes`, role "weight"), bias `[features]` (role "bias", init 0).
    Scales (unit/umup): forward fan_in^-1/2; input gradient fan_out^-1/2 under
    `constraint`; kernel/bias gradient batch^-1/2. `critical`: a u-μP critical matmul,
    kept in the compute dtype under `Precision.high_precision_critical`.
    """

    features: int
    use_bias: bool = True
    kernel_axes: tuple[Optional[str], Optional[str]] = ("embed", "mlp")
    constraint: Optional[str] = "to_output_scale"
    checkpoint_tag: Optional[str] = None
    critical: bool = False

    def _params(self, fan_in: int, role: str):
        dtype = self.precision.dtype
        kernel = self.scaled_param("kernel", self.parametrization.kernel_init(fan_in),
                                   (fan_in, self.features), self.kernel_axes, role)
        bias = None
        if self.use_bias:
            bias = self.scaled_param("bias", nn.initializers.zeros, (self.features,),
                                     (self.kernel_axes[-1],), "bias").astype(dtype)
        return kernel.astype(dtype), bias

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self._params(x.shape[-1], "weight")
        y = self.ops.linear(x.astype(self.precision.dtype), kernel, bias,
                            self.precision.matmul_formats(self.critical), self.constraint)
        return checkpoint_name(y, self.checkpoint_tag) if self.checkpoint_tag else y


class LinearReadout(Linear):
    """The readout (logits) layer: kernel role "output"; unit/umup use
    `U.linear_readout` (forward fan_in^-1: logits RMS fan_in^-1/2 at init, the μP
    readout). Kernel axes default to `("embed", "vocab")`."""

    kernel_axes: tuple[Optional[str], Optional[str]] = ("embed", "vocab")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self._params(x.shape[-1], "output")
        return self.ops.readout(x.astype(self.precision.dtype), kernel, bias,
                                self.precision.formats)
