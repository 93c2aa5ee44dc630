"""`ScaledModule`: the base of the library's layers, with the two fields that say how
they compute."""

import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax

from unit_scaling.ops import StandardOps
from unit_scaling.parametrization import Parametrization
from unit_scaling.params import make_param
from unit_scaling.precision import Precision


class ScaledModule(nn.Module):
    """A Flax module whose ops and initialisers come from a `Parametrization`.

    Keyword-only fields, shared by every layer of `unit_scaling.nn`:
      parametrization: required ("sp", "unit" or "umup": the same layer code for all
        three). Its `depth` (set by `Parametrization.in_stack`) goes into the boxes of
        the parameters the layer creates.
      precision: compute dtype, parameter dtype and matmul formats (default: float32,
        no quantisation).
    """

    parametrization: Parametrization = dataclasses.field(kw_only=True)
    precision: Precision = dataclasses.field(default=Precision(), kw_only=True)

    @property
    def ops(self) -> StandardOps:
        """The parametrization's ops (`Parametrization.ops`)."""
        return self.parametrization.ops

    def scaled_param(
        self,
        name: str,
        init: Callable[..., jax.Array],
        shape: Sequence[int],
        names: Sequence[Optional[str]],
        role: str,
        fan_in: Optional[int] = None,
        lr_mult: float = 1.0,
    ) -> jax.Array:
        """`make_param` with this layer's depth and parameter dtype (the value is
        returned in the parameter dtype)."""
        return make_param(self, name, init, shape, names, role, self.parametrization.depth,
                          self.precision.param_dtype, fan_in=fan_in, lr_mult=lr_mult)
