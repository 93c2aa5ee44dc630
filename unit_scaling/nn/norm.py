"""LayerNorm and RMSNorm over the last axis (statistics in float32)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from unit_scaling.nn.module import ScaledModule


class LayerNorm(ScaledModule):
    """LayerNorm of x `[..., d]` -> `[..., d]` in the compute dtype.

    Gain `scale` `[d]` (init 1) and `bias` `[d]` (init 0), each optional, both role
    "norm" and `lr_mult` (u-μP). Forward is plain (normalised outputs are unit-scaled
    already); unit/umup scale the gain/bias gradients by batch^-1/2.
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    axis_name: Optional[str] = "embed"
    lr_mult: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = bias = None
        if self.use_scale:
            scale = self.scaled_param("scale", nn.initializers.ones, (d,), (self.axis_name,),
                                      "norm", lr_mult=self.lr_mult)
        if self.use_bias:
            bias = self.scaled_param("bias", nn.initializers.zeros, (d,), (self.axis_name,),
                                     "norm", lr_mult=self.lr_mult)
        return self.ops.layer_norm(x.astype(self.precision.dtype), scale, bias, self.epsilon)


class RMSNorm(ScaledModule):
    """RMSNorm of x `[..., d]`: `x / rms(x) * scale`, gain optional (`use_scale`).

    Gain `scale` `[d]` (init 1, role "norm", `lr_mult`); unit/umup scale its gradient
    by batch^-1/2.
    """

    epsilon: float = 1e-6
    use_scale: bool = True
    axis_name: Optional[str] = "embed"
    lr_mult: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = None
        if self.use_scale:
            scale = self.scaled_param("scale", nn.initializers.ones, (x.shape[-1],),
                                      (self.axis_name,), "norm", lr_mult=self.lr_mult)
        return self.ops.rms_norm(x.astype(self.precision.dtype), scale, self.epsilon)


def make_norm(kind: str, **kwargs: Any) -> nn.Module:
    """"layer_norm" -> LayerNorm, "rms_norm" -> RMSNorm (ValueError otherwise)."""
    if kind == "layer_norm":
        return LayerNorm(**kwargs)
    if kind == "rms_norm":
        kwargs.pop("use_bias", None)
        return RMSNorm(**kwargs)
    raise ValueError(f"norm={kind!r} is unknown; set norm to 'layer_norm' or 'rms_norm'")
