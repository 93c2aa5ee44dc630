"""Dense layers: `Linear` (hidden matmuls) and `LinearReadout` (the final projection).

Both run `Parametrization.linear` / `.readout` on a `[fan_in, features]` kernel, so the
same module is a plain dense layer under `sp` and a unit-scaled one under `unit`/`umup`
(forward fan_in^-1/2, readout fan_in^-1). Matmul operands follow `formats`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from unit_scaling.formats import FormatPolicy
from unit_scaling.nn.partitioning import make_param
from unit_scaling.parametrization import Parametrization

DEFAULT_PARAMETRIZATION = Parametrization("umup")


class Linear(nn.Module):
    """`y = x @ kernel + bias`, scaled per the parametrization.

    Shapes: x `[..., fan_in]` -> y `[..., features]`; kernel `[fan_in, features]`
    (logical `kernel_axes`, role "weight"), bias `[features]` (role "bias", init 0).
    Scales (unit/umup): forward fan_in^-1/2; input gradient fan_out^-1/2 under
    `constraint`; kernel/bias gradient batch^-1/2.
    """

    features: int
    use_bias: bool = True
    kernel_axes: tuple[Optional[str], Optional[str]] = ("embed", "mlp")
    constraint: Optional[str] = "to_output_scale"
    checkpoint_tag: Optional[str] = None
    parametrization: Parametrization = DEFAULT_PARAMETRIZATION
    formats: Optional[FormatPolicy] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depth: Optional[int] = None

    def _params(self, fan_in: int, role: str):
        kernel = make_param(
            self, "kernel", self.parametrization.kernel_init(fan_in), (fan_in, self.features),
            self.kernel_axes, role, self.depth, self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = make_param(
                self, "bias", nn.initializers.zeros, (self.features,),
                (self.kernel_axes[-1],), "bias", self.depth, self.param_dtype,
            )
        return kernel.astype(self.dtype), None if bias is None else bias.astype(self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self._params(x.shape[-1], "weight")
        y = self.parametrization.linear(
            x.astype(self.dtype), kernel, bias, self.formats, self.constraint
        )
        return checkpoint_name(y, self.checkpoint_tag) if self.checkpoint_tag else y


class LinearReadout(Linear):
    """The readout (logits) layer: kernel role "output"; unit/umup use
    `U.linear_readout` (forward fan_in^-1: logits RMS fan_in^-1/2 at init, the μP
    readout). Kernel axes default to `("embed", "vocab")`."""

    kernel_axes: tuple[Optional[str], Optional[str]] = ("embed", "vocab")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self._params(x.shape[-1], "output")
        return self.parametrization.readout(x.astype(self.dtype), kernel, bias, self.formats)
