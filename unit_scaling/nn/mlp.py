"""The transformer MLP: GELU (`wi` -> gelu -> `wo`) or SwiGLU (`wi`, `wg` -> silu_glu -> `wo`)."""

from __future__ import annotations

import flax.linen as nn
import jax

from unit_scaling.nn.linear import Linear
from unit_scaling.nn.module import ScaledModule
from unit_scaling.nn.partitioning import constrain

ACTIVATIONS = ("gelu", "swiglu")


class MLP(ScaledModule):
    """x `[batch, len, d]` -> `[batch, len, d]` through a hidden `[batch, len, mlp_dim]`.

    Kernels: `wi` (and `wg` for SwiGLU) `[d, mlp_dim]` ("embed", "mlp"), `wo`
    `[mlp_dim, d]` ("mlp", "embed"), all role "weight". unit/umup: every linear has
    constraint None, which is exact here because the forward and backward scales of
    the chain mirror each other (`wi` fwd d^-1/2 / bwd m^-1/2, `wo` fwd m^-1/2 / bwd
    d^-1/2: the products agree), so gradients stay proportional to the true ones;
    the activation uses `act_mult`. `wo` is a critical matmul: under
    `Precision.high_precision_critical` it stays in the compute dtype under FP8.
    """

    mlp_dim: int
    activation: str = "gelu"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r} is unknown; set it to one of {ACTIVATIONS}"
            )
        d = x.shape[-1]
        common = dict(use_bias=self.use_bias, constraint=None,
                      parametrization=self.parametrization, precision=self.precision)
        h = Linear(self.mlp_dim, kernel_axes=("embed", "mlp"), checkpoint_tag="mlp_in",
                   name="wi", **common)(x)
        h = constrain(h, ("batch", "length", "mlp"))
        if self.activation == "swiglu":
            g = Linear(self.mlp_dim, kernel_axes=("embed", "mlp"), checkpoint_tag="mlp_gate",
                       name="wg", **common)(x)
            h = self.ops.silu_glu(h, g)
        else:
            h = self.ops.gelu(h)
        y = Linear(d, kernel_axes=("mlp", "embed"), checkpoint_tag="mlp_out", critical=True,
                   name="wo", **common)(h)
        return constrain(y, ("batch", "length", "embed"))
