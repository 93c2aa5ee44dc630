"""The transformer MLP: GELU (`wi` -> gelu -> `wo`) or SwiGLU (`wi`, `wg` -> silu_glu -> `wo`)."""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unit_scaling.formats import FormatPolicy
from unit_scaling.nn.linear import DEFAULT_PARAMETRIZATION, Linear
from unit_scaling.nn.partitioning import constrain
from unit_scaling.parametrization import Parametrization

ACTIVATIONS = ("gelu", "swiglu")


class MLP(nn.Module):
    """x `[batch, len, d]` -> `[batch, len, d]` through a hidden `[batch, len, mlp_dim]`.

    Kernels: `wi` (and `wg` for SwiGLU) `[d, mlp_dim]` ("embed", "mlp"), `wo`
    `[mlp_dim, d]` ("mlp", "embed"), all role "weight". unit/umup: every linear has
    constraint None, which is exact here because the forward and backward scales of
    the chain mirror each other (`wi` fwd d^-1/2 / bwd m^-1/2, `wo` fwd m^-1/2 / bwd
    d^-1/2: the products agree), so gradients stay proportional to the true ones;
    the activation uses `act_mult`. `high_precision_out`: `wo` ignores `formats` (the
    u-μP "critical" down-projection stays in the compute dtype under FP8).
    """

    mlp_dim: int
    activation: str = "gelu"
    use_bias: bool = True
    high_precision_out: bool = False
    parametrization: Parametrization = DEFAULT_PARAMETRIZATION
    formats: Optional[FormatPolicy] = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    depth: Optional[int] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is unknown; set it to one of {ACTIVATIONS}"
            )
        d = x.shape[-1]
        constraint = None if self.parametrization.unit_scaled else "to_output_scale"
        common = dict(use_bias=self.use_bias, constraint=constraint,
                      parametrization=self.parametrization, dtype=self.dtype,
                      param_dtype=self.param_dtype, depth=self.depth)
        h = Linear(self.mlp_dim, kernel_axes=("embed", "mlp"), formats=self.formats,
                   checkpoint_tag="mlp_in", name="wi", **common)(x)
        h = constrain(h, ("batch", "length", "mlp"))
        if self.activation == "swiglu":
            g = Linear(self.mlp_dim, kernel_axes=("embed", "mlp"), formats=self.formats,
                       checkpoint_tag="mlp_gate", name="wg", **common)(x)
            h = self.parametrization.silu_glu(h, g)
        else:
            h = self.parametrization.gelu(h)
        out_formats = None if self.high_precision_out else self.formats
        y = Linear(d, kernel_axes=("mlp", "embed"), formats=out_formats,
                   checkpoint_tag="mlp_out", name="wo", **common)(h)
        return constrain(y, ("batch", "length", "embed"))
