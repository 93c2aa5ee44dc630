"""Flax linen modules built from the ops of a `Parametrization` (`unit_scaling.ops`).

Every module is a `ScaledModule`: a required keyword `parametrization` (sp, unit or
umup) and a `precision` (`unit_scaling.precision.Precision`: compute and parameter
dtypes, matmul formats; float32 by default). It creates its parameters as `ScaledParam`
boxes (logical axis names + u-μP role + depth) and constrains its key activations with
logical names (see `partitioning.DEFAULT_RULES`). The transformer layer and stack built
from them are in `unit_scaling.models.transformer`.
"""

from unit_scaling._extras import require

require("flax", "unit_scaling.nn", "flax")

from unit_scaling.nn.attention import MultiHeadAttention
from unit_scaling.nn.dropout import Dropout
from unit_scaling.nn.embedding import Embedding
from unit_scaling.nn.linear import Linear, LinearReadout
from unit_scaling.nn.mlp import MLP
from unit_scaling.nn.module import ScaledModule
from unit_scaling.nn.norm import LayerNorm, RMSNorm, make_norm
from unit_scaling.nn.partitioning import DEFAULT_RULES, constrain
from unit_scaling.nn.positions import apply_rope, sinusoidal
from unit_scaling.params import make_param

__all__ = [
    "DEFAULT_RULES", "Dropout", "Embedding", "LayerNorm", "Linear", "LinearReadout", "MLP",
    "MultiHeadAttention", "RMSNorm", "ScaledModule", "apply_rope", "constrain", "make_norm",
    "make_param", "sinusoidal",
]
