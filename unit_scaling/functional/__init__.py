"""Unit-scaled ops: `import unit_scaling.functional as U`.

Every op is `scale_bwd` on each input -> the plain JAX op -> `scale_fwd` on the output,
with scales chosen from static shapes so that, for unit-normal inputs and output
gradients, the output and every input gradient have RMS close to 1 (Blake et al., 2023).
Where unit scale is not the target (`linear_readout`'s output, a loss), the docstring says
what it is instead. Each docstring states shapes, the forward scale, the backward scales
and the default constraint.

Names and argument meanings follow the PyTorch reference `unit_scaling.functional`
0.3.5, with JAX conventions: a dense kernel is `(fan_in, fan_out)`; attention tensors are
`[batch, seq, heads, head_dim]`; dropout takes an explicit PRNG key and `deterministic`.

**Batch of the weight gradients, and `jax.vmap`.** The gradients of parameters (the
kernel and bias of `linear`/`linear_readout`, the `embedding` table, the `layer_norm` and
`rms_norm` gains and bias) are sums over rows, scaled by `B^-1/2` (`(V/B)^1/2` for the
table) where `B` counts every row summed into the parameter: the rows of the shapes the
op sees, times the size of every `jax.vmap` axis over which the parameter is shared
(the input is batched, the parameter is not). A model written per example and vmapped
has its per-example shapes; the vmapped axes are found in the backward pass
(`scale.share_over_vmap`, a `jax.custom_batching.custom_vmap` rule), also through `jit`,
`scan`, `remat` and nested vmaps. What they mean depends on how the caller reduces the
per-example results, which the ops cannot see, so the caller says it with
`U.vmap_reduction("sum" | "mean" | "none")` around the code that traces the model:

    with U.vmap_reduction("sum"):      # or "mean" for jnp.mean of the per-example losses
        loss = jnp.sum(jax.vmap(per_example_loss, in_axes=(None, 0))(params, batch))

"sum" and "mean" give the parameter gradients of the same model written batched;
"none" keeps each lane's own batch (per-example gradients, ensembles). Differentiating
through a vmap that shares a parameter without it raises a ValueError naming the op:
the scale is never silently the per-example one. A parameter vmapped with the data (an
ensemble) needs nothing; nor does a forward-only vmap; outside vmap nothing changes.

Without vmap, `B` comes from the shapes the op sees. Under `jit` with
global shardings these are the global shapes. With gradient accumulation over `k`
micro-batches each micro-batch is scaled by its own (smaller) batch, so summed gradients
are `k^1/2` larger and averaged ones `k^-1/2` smaller than one big batch would give:
harmless for Adam-family optimisers, which are invariant to gradient scale.

The matmul-like ops (`matmul`, `linear`, `linear_readout`,
`scaled_dot_product_attention`) take `formats`, a `unit_scaling.formats.FormatPolicy`:
inputs are quantised to the policy's `fwd` format in the forward pass and output
gradients to its `bwd` format in the backward pass (`formats.FP8`: E4M3 forward, E5M2 backward).

One module per op family: `matmuls`, `activations`, `residual`, `norms`, `attention`,
`losses`, and `base` (what they share). Imports only jax, numpy and this package's
`scale` and `formats`.
"""

from __future__ import annotations

from unit_scaling.functional.activations import dropout, gelu, silu, silu_glu, softmax
from unit_scaling.functional.attention import (
    ATTENTION_IMPLEMENTATIONS,
    attention_core,
    attention_mask,
    attention_output_scale,
    scaled_dot_product_attention,
)
from unit_scaling.functional.base import logarithmic_interpolation, rms
from unit_scaling.functional.losses import cross_entropy, mse_loss, softmax_nll
from unit_scaling.functional.matmuls import (
    dense,
    embedding,
    gather_positions,
    linear,
    linear_readout,
    matmul,
)
from unit_scaling.functional.norms import layer_norm, rms_norm
from unit_scaling.functional.residual import (
    add,
    residual_add,
    residual_apply,
    residual_split,
    transformer_residual_scaling_rule,
)
from unit_scaling.scale import vmap_reduction

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "add",
    "attention_core",
    "attention_mask",
    "attention_output_scale",
    "cross_entropy",
    "dense",
    "dropout",
    "embedding",
    "gather_positions",
    "gelu",
    "layer_norm",
    "linear",
    "linear_readout",
    "logarithmic_interpolation",
    "matmul",
    "mse_loss",
    "residual_add",
    "residual_apply",
    "residual_split",
    "rms",
    "rms_norm",
    "scaled_dot_product_attention",
    "silu",
    "silu_glu",
    "softmax",
    "softmax_nll",
    "transformer_residual_scaling_rule",
    "vmap_reduction",
]


def __dir__() -> list[str]:
    """`dir(module)` lists the public API, not the imported jax/numpy modules."""
    return sorted(__all__)
