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

Imports only jax, numpy and this package's `scale` and `formats`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling import formats as formats_lib
from unit_scaling.scale import (
    Constraint,
    apply_constraint,
    scale_bwd,
    scale_fwd,
    share_over_vmap,
    vmap_reduction,
)

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

Array = jax.Array
FormatPolicy = Optional[formats_lib.FormatPolicy]


def logarithmic_interpolation(alpha: float, lower: float, upper: float) -> float:
    """`exp(alpha*ln(upper) + (1-alpha)*ln(lower))`: `lower` at 0, `upper` at 1.

    Interpolates between two limits with constant ratio; the fitted rules of `gelu`,
    `silu`, `softmax` and attention use it to move between the regimes of small and
    large `mult`.
    """
    return math.exp(alpha * math.log(upper) + (1 - alpha) * math.log(lower))


def rms(
    x: Array,
    axis: Optional[int | Sequence[int]] = None,
    keepdims: bool = False,
    eps: float = 0.0,
) -> Array:
    """`sqrt(mean(x^2) + eps)` over `axis`, computed in float32, returned in x's dtype."""
    mean_sq = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=keepdims)
    return jnp.sqrt(mean_sq + eps).astype(x.dtype)


def _lead(x: Array, ndim: int) -> Array:
    """`x` with leading unit axes up to `ndim`: explicit broadcasting, so the ops also
    run under `jax_numpy_rank_promotion="raise"`."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


def _share(input: Array, op: str, *params: Optional[Array]) -> tuple[Optional[Array], ...]:
    """The op's parameters through `share_over_vmap`: their gradient scale also counts
    the rows of the `jax.vmap` axes they are shared across (module docstring)."""
    return tuple(None if p is None else share_over_vmap(p, input, op) for p in params)


def _scale_elementwise(
    f: Callable[[Array], Array],
    x: Array,
    output_scale: float,
    grad_input_scale: float,
    constraint: Constraint,
) -> Array:
    output_scale, grad_input_scale = apply_constraint(
        constraint, output_scale, grad_input_scale
    )
    return scale_fwd(f(scale_bwd(x, grad_input_scale)), output_scale)


# ----------------------------------------------------------------------------- matmuls


def matmul(
    left: Array,
    right: Array,
    constraint: Constraint = "to_output_scale",
    formats: FormatPolicy = None,
) -> Array:
    """Unit-scaled matrix product `left[..., m, k] @ right[..., k, n]`.

    Forward: `(left @ right) * k^-1/2`.
    Backward: `g_left = n^-1/2`, `g_right = m^-1/2`.
    Constraint: `to_output_scale` (all three scales set to `k^-1/2`); also
    `to_left_grad_scale`, `to_right_grad_scale`, `gmean`, `hmean`, `amean` or None.
    """
    m, k = left.shape[-2:]
    n = right.shape[-1]
    output_scale, left_grad_scale, right_grad_scale = apply_constraint(
        constraint, k**-0.5, n**-0.5, m**-0.5
    )
    left = scale_bwd(left, left_grad_scale)
    right = scale_bwd(right, right_grad_scale)
    return scale_fwd(formats_lib.matmul(left, right, formats), output_scale)


def linear(
    input: Array,
    kernel: Array,
    bias: Optional[Array] = None,
    constraint: Constraint = "to_output_scale",
    scale_power: tuple[float, float, float] = (0.5, 0.5, 0.5),
    formats: FormatPolicy = None,
) -> Array:
    """Unit-scaled dense layer `(input @ kernel + bias) * fan_in^-1/2`.

    Shapes: input `[..., fan_in]`, kernel `[fan_in, fan_out]`, bias `[fan_out]`;
    output `[..., fan_out]`. `B = input.size / fan_in` (the batch the op sees).

    Forward: `fan_in^-p0` (the bias is inside the scale, as in the reference).
    Backward: `g_input = fan_out^-p1`; `g_kernel = g_bias = B^-p2`.
    Constraint: `to_output_scale` on (output, g_input) only; the weight gradient is a
    cut-edge and keeps its own scale.
    `scale_power = (p0, p1, p2)`, `(1/2, 1/2, 1/2)` by default.
    """
    fan_in, fan_out = kernel.shape
    if input.shape[-1] != fan_in:
        raise ValueError(
            f"linear: input feature dim {input.shape[-1]} != kernel fan_in {fan_in}"
        )
    batch = input.size // fan_in
    kernel, bias = _share(input, "linear", kernel, bias)
    output_scale, grad_input_scale = apply_constraint(
        constraint, fan_in ** -scale_power[0], fan_out ** -scale_power[1]
    )
    grad_weight_scale = batch ** -scale_power[2]
    if formats is None:
        return _dense(input, kernel, bias, output_scale, grad_input_scale, grad_weight_scale)
    input = scale_bwd(input, grad_input_scale)
    kernel = scale_bwd(kernel, grad_weight_scale)
    output = formats_lib.matmul(input, kernel, formats)
    if bias is not None:
        bias = scale_bwd(bias, grad_weight_scale).astype(output.dtype)
        output = output + _lead(bias, output.ndim)
    return scale_fwd(output, output_scale)


def dense(input: Array, kernel: Array, bias: Optional[Array] = None) -> Array:
    """Plain dense layer `input @ kernel + bias` (no scales; shapes as `linear`) with
    `linear`'s backward: the standard parametrization's matmul, so that it runs the
    weight-gradient layout below too."""
    return _dense(input, kernel, bias, 1.0, 1.0, 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _dense(x: Array, kernel: Array, bias: Optional[Array], out_scale: float,
           grad_x_scale: float, grad_w_scale: float) -> Array:
    """`(x @ kernel + bias) * out_scale`, with a backward written out for XLA:CPU.

    - The weight gradient is `x^T g` on the flattened batch (`[tokens, fan_in]^T @
      [tokens, fan_out]`). Autodiff's rule for a 3-D `x` contracts two batch axes, and
      XLA:CPU then wrote `g` transposed (`[fan_out, tokens]`) in a loop before its GEMM:
      1.4 s of the standard parametrization's 4.5 s causal-LM step (width 256, vocab
      8192, 2048 tokens, a loaded 2-core box).
    - Every scale multiplies a GEMM's *output* (`y`, `g_x`, `g_kernel`). XLA fuses that
      scalar multiply into the elementwise op that consumes the output (the SwiGLU
      gate, the residual add, the softmax, the optimizer's moments; cuBLAS into its
      epilogue), so it costs no pass of its own; a scale on an operand is a pass over
      the kernel or the activation before the GEMM. Moving the scales from the
      smaller operand to the outputs shortened u-μP's step of the causal LM above by
      1.4% and tiny BERT's by 1.6-2.6% (`benchmarks/results/ab_output_scales_*`).
    - Except in float16, where every scale goes on the smaller operand, *before* the
      sum: unscaled, the readout's `x @ kernel` is `fan_in` times its logits and the
      weight gradient's sum over thousands of tokens can exceed 65504 (the u-μP
      readout's did); scaled first, neither does. float32 and bfloat16 have float32's
      range.
    """
    return _dense_fwd(x, kernel, bias, out_scale, grad_x_scale, grad_w_scale)[0]


def _scaled_matmul(a: Array, b: Array, scale: float, before_sum: bool) -> Array:
    """`(a @ b) * scale`, the scale on the output, or with `before_sum` on the smaller
    operand (see `_dense`)."""
    if scale == 1.0:
        return a @ b
    if not before_sum:
        return (a @ b) * scale
    return (a * scale) @ b if a.size <= b.size else a @ (b * scale)


def _dense_fwd(x, kernel, bias, out_scale, grad_x_scale, grad_w_scale):
    res = (x, kernel, bias)
    if x.dtype == jnp.float16:
        y = _scaled_matmul(x, kernel, out_scale, before_sum=True)
        return y if bias is None else y + _lead(bias * out_scale, y.ndim).astype(y.dtype), res
    y = x @ kernel
    y = y if bias is None else y + _lead(bias.astype(y.dtype), y.ndim)
    return (y if out_scale == 1.0 else y * out_scale), res


def _dense_bwd(out_scale, grad_x_scale, grad_w_scale, res, g):
    del out_scale
    x, kernel, bias = res
    fp16 = x.dtype == jnp.float16
    fan_in, fan_out = kernel.shape
    x2, g2 = x.reshape(-1, fan_in), g.reshape(-1, fan_out)
    g_x = _scaled_matmul(g, kernel.T, grad_x_scale, before_sum=fp16)
    g_kernel = _scaled_matmul(x2.T, g2, grad_w_scale, before_sum=fp16)
    g_bias = None
    if bias is not None:
        g_bias = (jnp.sum(g2 * grad_w_scale, axis=0) if fp16
                  else jnp.sum(g2, axis=0) * grad_w_scale).astype(bias.dtype)
    return g_x.astype(x.dtype), g_kernel.astype(kernel.dtype), g_bias


_dense.defvjp(_dense_fwd, _dense_bwd)


def linear_readout(
    input: Array,
    kernel: Array,
    bias: Optional[Array] = None,
    constraint: Constraint = None,
    formats: FormatPolicy = None,
) -> Array:
    """`linear` for the final (readout) layer of a network: forward scale `fan_in^-1`.

    Shapes as `linear`. Forward: `fan_in^-1`, so the output RMS is `fan_in^-1/2` for
    unit inputs (the μP readout: logits shrink with width instead of growing).
    Backward: `g_input = fan_out^-1/2`; `g_kernel = g_bias = B^-1/2`.
    Constraint: None (the readout's output and input gradient are scaled
    independently; the loss makes them a cut-edge).
    """
    return linear(
        input, kernel, bias, constraint, scale_power=(1.0, 0.5, 0.5), formats=formats
    )


def embedding(ids: Array, table: Array) -> Array:
    """Unit-scaled embedding lookup `table[ids]`.

    Shapes: ids `[...]` (integers), table `[V, d]`; output `[..., d]`.
    Forward: plain lookup (a unit-scaled table gives unit outputs).
    Backward: `g_table = (V / ids.size)^1/2` (each row receives, on average,
    `ids.size / V` gradient contributions).
    """
    vocab = table.shape[0]
    (table,) = _share(ids, "embedding", table)
    table = scale_bwd(table, (vocab / ids.size) ** 0.5)
    return jnp.take(table, ids, axis=0)


def gather_positions(x: Array, positions: Array) -> Array:
    """Unit-scaled gather of sequence positions: `out[b, p] = x[b, positions[b, p]]`.

    Shapes: x `[batch, L, ...]`, positions `[batch, P]` (integers in [0, L)); output
    `[batch, P, ...]`. BERT's MLM head reads the P masked positions this way, and
    the NSP pooler the [CLS] position (P = 1).
    Forward: plain gather (unit-RMS rows stay unit RMS).
    Backward: `g_x = (L/P)^1/2`. Derivation: the plain backward scatters a unit-RMS
    gradient `[batch, P, ...]` into P of the L positions and zeros elsewhere, so over
    `x` its RMS is `(P/L)^1/2` (for distinct positions); `(L/P)^1/2` restores unit RMS.
    Without it an encoder under a P-of-L head starts from gradients of RMS
    `(P/L)^1/2` (0.4 for BERT's 10 of 64, 0.125 for [CLS] of 64), the whole stack's
    gradients shrink by that much, and a unit-scaled model's Adam sees them as noise
    against the other path (NSP did not learn without it).
    The input is usually read by other ops too (the MLM and NSP heads both read the
    encoder output): each path's gradient is unit-scaled on its own, which weights the
    losses against each other as unit scaling's losses always do (each loss's
    gradient has unit RMS whatever its number of rows).
    """
    if positions.ndim != 2 or positions.shape[0] != x.shape[0]:
        raise ValueError(
            f"gather_positions: positions {positions.shape} must be [batch, P] with the "
            f"batch of x {x.shape}"
        )
    length, count = x.shape[1], positions.shape[1]
    x = scale_bwd(x, (length / count) ** 0.5)
    index = positions.astype(jnp.int32).reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


# ---------------------------------------------------------------------- nonlinearities


def gelu(
    x: Array,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
    approximate: bool = False,
    scaled: bool = True,
) -> Array:
    """Unit-scaled GELU: `gelu(mult*x) / mult`, scaled.

    Forward: `li(a, 2, (2/(1-1/pi))^1/2)` with `a = 1/(1+0.25/mult^2)`.
    Backward: `g_x = li(a, 2, 2^1/2)`.
    Constraint: `to_output_scale`. `approximate=True` uses the tanh form.
    `scaled=False`: both scales 1, the plain GELU (the standard parametrization's).
    Computed in float32 whatever x's dtype, one cast in and one out each way: in
    bfloat16, XLA rounds every op of GELU's erf and its derivative to bfloat16 and
    back, and on CPU those casts made GELU's backward the largest elementwise cost of a
    bfloat16 BERT step.
    """
    alpha = 1 / (1 + 0.25 / mult**2)
    output_scale = logarithmic_interpolation(alpha, 2.0, (2 / (1 - 1 / math.pi)) ** 0.5)
    grad_input_scale = logarithmic_interpolation(alpha, 2.0, 2**0.5)
    if scaled:
        output_scale, grad_input_scale = apply_constraint(
            constraint, output_scale, grad_input_scale)
    else:
        output_scale = grad_input_scale = 1.0
    return _float32_pointwise(functools.partial(_gelu, mult=float(mult), approximate=approximate),
                              x, output_scale, grad_input_scale)


def _gelu(x: Array, mult: float, approximate: bool) -> Array:
    if mult == 1:
        return jax.nn.gelu(x, approximate=approximate)
    return jax.nn.gelu(x * mult, approximate=approximate) / mult


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 2, 3))
def _float32_pointwise(f: Callable[[Array], Array], x: Array, output_scale: float,
                       grad_input_scale: float) -> Array:
    """`f(x) * output_scale` with `f` run in float32 and the result cast back to x's
    dtype; backward `f'(x) * g * grad_input_scale`, recomputed from `x` in float32."""
    y = f(x.astype(jnp.float32))
    return (y if output_scale == 1.0 else y * output_scale).astype(x.dtype)


def _float32_pointwise_fwd(f, x, output_scale, grad_input_scale):
    return _float32_pointwise(f, x, output_scale, grad_input_scale), x


def _float32_pointwise_bwd(f, output_scale, grad_input_scale, x, g):
    del output_scale
    g32 = g.astype(jnp.float32)
    _, vjp = jax.vjp(f, x.astype(jnp.float32))
    (g_x,) = vjp(g32 if grad_input_scale == 1.0 else g32 * grad_input_scale)
    return (g_x.astype(x.dtype),)


_float32_pointwise.defvjp(_float32_pointwise_fwd, _float32_pointwise_bwd)


def _silu(x: Array, mult: float) -> Array:
    return jax.nn.silu(x) if mult == 1 else x * jax.nn.sigmoid(x * mult)


def silu(x: Array, mult: float = 1.0, constraint: Constraint = "to_output_scale") -> Array:
    """Unit-scaled SiLU (swish): `x * sigmoid(mult*x)`, scaled.

    Forward: `li(1/(1+0.25/mult^2), 2, (2/(1-1/pi))^1/2)`.
    Backward: `g_x = li(1/(1+1/mult^2), 2, 2^1/2)`.
    Constraint: `to_output_scale`.
    """
    output_scale = logarithmic_interpolation(
        1 / (1 + 0.25 / mult**2), 2.0, (2 / (1 - 1 / math.pi)) ** 0.5
    )
    grad_input_scale = logarithmic_interpolation(1 / (1 + 1 / mult**2), 2.0, 2**0.5)
    return _scale_elementwise(
        lambda x: _silu(x, mult), x, output_scale, grad_input_scale, constraint
    )


def silu_glu(x: Array, gate: Array, mult: float = 1.0, scaled: bool = True) -> Array:
    """Unit-scaled SwiGLU gate `x * gate * sigmoid(mult*gate)`.

    Shapes: x and gate equal; output the same.
    Forward and backward (`g_x`, `g_gate`): `s = li(1/(1+1/mult^2), 2, 2^1/2)`.
    No constraint: both inputs and the output share the one scale.
    `scaled=False`: `s = 1`, the plain gate (the standard parametrization's).
    One fused pass each way: the backward recomputes the sigmoid from `x` and `gate`
    (matmul outputs, kept anyway) where autodiff kept each intermediate, and XLA:CPU
    ran the gate as three `[tokens, mlp]` passes forward and more backward.
    """
    s = logarithmic_interpolation(1 / (1 + 1 / mult**2), 2.0, 2**0.5) if scaled else 1.0
    return _silu_glu(x, gate, float(mult), s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _silu_glu(x: Array, gate: Array, mult: float, scale: float) -> Array:
    # In float32, one cast in and one out (as `gelu`: not a bfloat16 round trip per op).
    y = x.astype(jnp.float32) * _silu(gate.astype(jnp.float32), mult)
    return (y * scale if scale != 1.0 else y).astype(jnp.result_type(x, gate))


def _silu_glu_fwd(x, gate, mult, scale):
    return _silu_glu(x, gate, mult, scale), (x, gate)


def _silu_glu_bwd(mult, scale, res, g):
    x, gate = res
    x32, gate32, g32 = (t.astype(jnp.float32) for t in (x, gate, g))
    sig = jax.nn.sigmoid(gate32 * mult if mult != 1.0 else gate32)
    if scale != 1.0:
        g32 = g32 * scale
    # d/dgate [gate * sigmoid(m gate)] = sigmoid * (1 + m gate (1 - sigmoid))
    g_x = g32 * (gate32 * sig)
    g_gate = g32 * x32 * (sig * (1 + mult * gate32 * (1 - sig)))
    return g_x.astype(x.dtype), g_gate.astype(gate.dtype)


_silu_glu.defvjp(_silu_glu_fwd, _silu_glu_bwd)


def softmax(
    x: Array,
    axis: int = -1,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
) -> Array:
    """Unit-scaled softmax of `mult * x` along `axis` (computed in float32).

    `n = x.shape[axis]`, `a = 1/(1+4/mult^2)`.
    Forward: `li(a, n, n^1/2)` (flat limit `n`, one-hot limit `n^1/2`).
    Backward: `g_x = li(a, n/mult, (n/mult)^1/2)`.
    Constraint: `to_output_scale`.

    The fit is empirical (the reference's). For unit-normal x, output and gradient RMS
    are within 0.1 of 1 for mult <= 1/4, for n <= 128 at mult <= 2, and for mult >= 4
    at n >= 512; they fall to about 0.8 at n = 64..128, mult = 8 and to about 0.71 at
    n = 4096, mult = 1..2.
    """
    n = x.shape[axis]
    alpha = 1 / (1 + 4 / mult**2)
    output_scale = logarithmic_interpolation(alpha, n, n**0.5)
    grad_input_scale = logarithmic_interpolation(alpha, n / mult, (n / mult) ** 0.5)

    def f(x):
        return jax.nn.softmax(x.astype(jnp.float32) * mult, axis=axis).astype(x.dtype)

    return _scale_elementwise(f, x, output_scale, grad_input_scale, constraint)


def dropout(
    x: Array,
    rate: float,
    key: Optional[Array] = None,
    deterministic: bool = False,
) -> Array:
    """Unit-scaled dropout: keeps each element with probability `1-rate`.

    Training: `x * mask / (1-rate)^1/2` (inverted dropout times `(1-rate)^1/2`), so the
    output RMS equals the input RMS. `deterministic=True`: `x * (1-rate)^1/2`, the same
    expectation as training.
    Forward and backward scale: `(1-rate)^1/2` on top of inverted dropout.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return x
    s = (1 - rate) ** 0.5
    if deterministic:
        return scale_fwd(scale_bwd(x, s), s)
    if key is None:
        raise ValueError("dropout needs a PRNG `key` unless deterministic=True")
    keep = jax.random.bernoulli(key, 1 - rate, x.shape)
    x = scale_bwd(x, s)
    return scale_fwd(jnp.where(keep, x / (1 - rate), jnp.zeros_like(x)), s)


# --------------------------------------------------------------------------- additions


def add(a: Array | float, b: Array | float, constraint: Constraint = "to_output_scale") -> Array:
    """Unit-scaled addition `(a + b) * 2^-1/2`.

    A Python scalar operand gives a plain add. Where an operand has a single element,
    the output scale is 1 (adding a constant does not change scale).
    Backward: `g_a = f_a^-1/2`, `g_b = f_b^-1/2`, `f_i` = the factor by which
    broadcasting grows operand `i` (its gradient is a sum of `f_i` terms).
    Constraint: `to_output_scale` (all three scales equal).
    """
    if not isinstance(a, jax.Array | np.ndarray) or not isinstance(b, jax.Array | np.ndarray):
        return a + b
    out_size = math.prod(jnp.broadcast_shapes(a.shape, b.shape))
    output_scale = 1.0 if (a.size == 1 or b.size == 1) else 2**-0.5
    output_scale, a_grad_scale, b_grad_scale = apply_constraint(
        constraint,
        output_scale,
        (out_size // a.size) ** -0.5,
        (out_size // b.size) ** -0.5,
    )
    ndim = max(a.ndim, b.ndim)
    a, b = _lead(scale_bwd(a, a_grad_scale), ndim), _lead(scale_bwd(b, b_grad_scale), ndim)
    return scale_fwd(a + b, output_scale)


def residual_split(x: Array, tau: float = 1.0) -> tuple[Array, Array]:
    """Splits `x` into `(residual, skip)` before a residual branch with weight `tau`.

    Forward: two identity copies.
    Backward: `g_x = tau/(1+tau^2)^1/2 * g_residual + 1/(1+tau^2)^1/2 * g_skip`, so the
    gradient into a unit-scaled branch is delayed to the split and stays unit-scaled.
    Use with `residual_add` and the same `tau`.
    """
    denom = (1 + tau**2) ** 0.5
    return scale_bwd(x, tau / denom), scale_bwd(x, 1 / denom)


def residual_add(residual: Array, skip: Array, tau: float = 1.0) -> Array:
    """Merges a residual branch: `tau/(1+tau^2)^1/2 * residual + 1/(1+tau^2)^1/2 * skip`.

    For unit-scaled, uncorrelated inputs the output is unit-scaled; `tau` is the ratio
    of the branch's contribution to the skip's. Backward: identity to both inputs
    (their scale was applied at `residual_split`).
    """
    denom = (1 + tau**2) ** 0.5
    return scale_fwd(residual, tau / denom) + scale_fwd(skip, 1 / denom)


def residual_apply(fn: Callable[[Array], Array], x: Array, tau: float = 1.0) -> Array:
    """`residual_add(fn(residual), skip, tau)` with `residual, skip = residual_split(x, tau)`."""
    residual, skip = residual_split(x, tau)
    return residual_add(fn(residual), skip, tau)


def transformer_residual_scaling_rule(
    residual_mult: float = 1.0, residual_attn_ratio: float = 1.0
) -> Callable[[int, int], float]:
    """The u-μP rule for the `tau` of each residual branch of a transformer.

    Returns `tau(index, layers)` where `layers = N` is the number of residual branches
    (2 per transformer layer: even index = attention, odd = MLP). With
    `alpha_mlp = residual_mult * (2/(1+residual_attn_ratio^2))^1/2` and
    `alpha_attn = residual_attn_ratio * alpha_mlp`, branch `i` gets
    `tau_i = alpha_i / (N/2 + n_attn(i)*alpha_attn^2 + n_mlp(i)*alpha_mlp^2)^1/2` with
    `n_attn(i) = (i+1)//2`, `n_mlp(i) = i//2` branches before it. Then every attention
    branch contributes equally, every MLP branch equally, all residual branches together
    contribute `residual_mult` times the embedding (in variance), attention vs MLP in the
    ratio `residual_attn_ratio` (u-μP paper, Appendix G).
    """
    alpha_mlp = residual_mult * (2 / (1 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp

    def tau(index: int, layers: int) -> float:
        n_attn, n_mlp = (index + 1) // 2, index // 2
        alpha = alpha_attn if index % 2 == 0 else alpha_mlp
        return alpha / (layers / 2 + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5

    return tau


# ------------------------------------------------------------------------------ norms


def _normalise(x: Array, eps: float, centre: bool) -> Array:
    x32 = x.astype(jnp.float32)
    if centre:
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def layer_norm(
    x: Array,
    weight: Optional[Array] = None,
    bias: Optional[Array] = None,
    eps: float = 1e-5,
) -> Array:
    """Layer norm over the last axis, statistics in float32; output in x's dtype.

    Shapes: x `[..., d]`, weight and bias `[d]`. `B = x.size / d`.
    Forward: plain (a normalised output is unit-scaled already).
    Backward: `g_weight = g_bias = B^-1/2` (each is a sum over `B` rows).
    """
    batch = x.size // x.shape[-1]
    weight, bias = _share(x, "layer_norm", weight, bias)
    y = _normalise(x, eps, centre=True)
    if weight is not None:
        y = y * _lead(scale_bwd(weight, batch**-0.5).astype(jnp.float32), y.ndim)
    if bias is not None:
        y = y + _lead(scale_bwd(bias, batch**-0.5).astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)


def rms_norm(x: Array, weight: Optional[Array] = None, eps: float = 1e-5) -> Array:
    """RMS norm `x / (mean(x^2) + eps)^1/2 * weight` over the last axis (float32 stats).

    Shapes: x `[..., d]`, weight `[d]`. Forward: plain. Backward: `g_weight = B^-1/2`,
    `B = x.size / d`.
    """
    batch = x.size // x.shape[-1]
    (weight,) = _share(x, "rms_norm", weight)
    y = _normalise(x, eps, centre=False)
    if weight is not None:
        y = y * _lead(scale_bwd(weight, batch**-0.5).astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)


# -------------------------------------------------------------------------- attention


def attention_mask(
    q_len: int,
    k_len: int,
    causal: bool = False,
    mask: Optional[Array] = None,
    segment_ids: Optional[Array | tuple[Array, Array]] = None,
) -> Optional[Array]:
    """The boolean attention mask `[batch|1, heads|1, q_len, k_len]` (True = attend).

    Args:
      causal: query `i` sees keys `j <= i + (k_len - q_len)` (aligned at the end, so a
        block of new queries after a cache of `k_len - q_len` keys works).
      mask: a boolean mask broadcastable to `[batch, heads, q_len, k_len]`, e.g. a
        key-padding mask `input_mask[:, None, None, :]`.
      segment_ids: `[batch, len]` ids of packed documents (or a `(q_ids, kv_ids)`
        pair); a query sees only keys of its own segment.
    """
    result = None if mask is None else jnp.asarray(mask, bool)

    def combine(m):
        return m if result is None else jnp.logical_and(result, m)

    if causal:
        q_pos = jnp.arange(q_len)[:, None] + (k_len - q_len)
        result = combine((q_pos >= jnp.arange(k_len)[None, :])[None, None])
    if segment_ids is not None:
        q_ids, kv_ids = (
            segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        )
        result = combine((q_ids[:, :, None] == kv_ids[:, None, :])[:, None])
    return result


def attention_output_scale(
    seq_len: int, head_dim: int, mult: float = 1.0, causal: bool = False,
    dropout_rate: float = 0.0,
) -> float:
    """The static output (and q/k/v gradient) scale `s` of `scaled_dot_product_attention`:
    `(1-p)^1/2 / li(1/(1+4d/mult^2), ((ln S if causal else 1)/S)^1/2, 1)`, the inverse of
    the fitted output RMS of attention over `S` positions of values that are independent
    across positions, from flat attention (a mean over `S`: RMS `S^-1/2`) to one-hot
    (RMS 1). A component the values share across positions is not averaged away, so
    it comes out `s` times larger (about `S^1/2` for flat attention).
    """
    alpha = 1 / (1 + 4 * head_dim / mult**2)
    flat = ((math.log(seq_len) if causal else 1.0) / seq_len) ** 0.5
    return (1 - dropout_rate) ** 0.5 / logarithmic_interpolation(alpha, flat, 1.0)


ATTENTION_IMPLEMENTATIONS = ("reference", "xla", "cudnn")


def _fused_attention_applies(dropout_rate: float, deterministic: bool,
                             formats: FormatPolicy) -> bool:
    """Whether a fused kernel computes what the reference does: no attention dropout
    at work and no rounding of the attention matmuls' operands (`formats`)."""
    dropping = dropout_rate > 0.0 and not deterministic
    quantising = formats is not None and (formats.fwd is not None or formats.bwd is not None)
    return not dropping and not quantising


def attention_core(
    query: Array,
    key: Array,
    value: Array,
    temperature: float,
    mask: Optional[Array] = None,
    causal: bool = False,
    segment_ids: Optional[Array | tuple[Array, Array]] = None,
    dropout_rate: float = 0.0,
    dropout_key: Optional[Array] = None,
    deterministic: bool = True,
    formats: FormatPolicy = None,
    implementation: str = "reference",
) -> Array:
    """Attention without unit scales: `softmax(temperature * q k^T + mask) v`.

    The kernel inside `scaled_dot_product_attention` (which puts its scales around it)
    and the standard parametrization's attention. Shapes: query `[batch, q_len, heads,
    d]`, key and value `[batch, k_len, heads, d]`; output as query. Softmax in float32.
    Masks as `attention_mask`.

    `implementation` (one of `ATTENTION_IMPLEMENTATIONS`):
      "reference": explicit logits `[batch, heads, q_len, k_len]` (float32), masked,
        softmax, matmul; the only path with attention dropout and `formats`.
      "xla": `jax.nn.dot_product_attention(implementation="xla")`.
      "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash
        attention (bf16/fp16 on an NVIDIA GPU; memory O(len) with `causal` or no mask,
        while a `mask` or `segment_ids` become a `[batch, 1, q_len, k_len]` bias); on
        a backend other than GPU the XLA kernel, so a GPU config also runs on CPU.
    A fused kernel ("xla", "cudnn") runs only where it computes the reference's
    function: without attention dropout at work (`dropout_rate > 0` and not
    `deterministic`) and without `formats` rounding; elsewhere the reference runs. In
    float32 the two agree to rounding; in bf16 the fused kernels keep the logits in
    float32 where the reference rounds the `q k^T` product to bf16 first.
    The default is the reference: on CPU jax's XLA kernel was 1.5-2x slower than it
    at sequence 1024 (benchmarks/attention.py, results/attention_cpu.md); "cudnn" is
    the one to choose on a GPU.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is unknown; use one of "
            f"{ATTENTION_IMPLEMENTATIONS}"
        )
    q_len, k_len = query.shape[1], key.shape[1]
    if implementation != "reference" and _fused_attention_applies(
            dropout_rate, deterministic, formats):
        # jax's `is_causal` aligns queries at the start; ours at the end (a block of new
        # queries after a KV cache), so it is only used where the two coincide.
        is_causal = causal and q_len == k_len
        full_mask = attention_mask(q_len, k_len, causal and not is_causal, mask, segment_ids)
        kernel = implementation
        if kernel == "cudnn" and jax.default_backend() != "gpu":
            kernel = "xla"
        return jax.nn.dot_product_attention(
            query, key, value, mask=full_mask, scale=temperature, is_causal=is_causal,
            implementation=kernel)

    q = jnp.swapaxes(query, 1, 2)  # [b, h, q, d]
    k = jnp.transpose(key, (0, 2, 3, 1))  # [b, h, d, k]
    logits = formats_lib.matmul(q, k, formats).astype(jnp.float32) * temperature
    full_mask = attention_mask(q_len, k_len, causal, mask, segment_ids)
    if full_mask is not None:
        logits = jnp.where(full_mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0.0 and not deterministic:
        if dropout_key is None:
            raise ValueError("attention dropout needs a `dropout_key` unless deterministic")
        keep = jax.random.bernoulli(dropout_key, 1 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1 - dropout_rate), 0.0)
    v = jnp.swapaxes(value, 1, 2)  # [b, h, k, d]
    out = formats_lib.matmul(probs.astype(value.dtype), v, formats)
    return jnp.swapaxes(out, 1, 2)


def scaled_dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Optional[Array] = None,
    causal: bool = False,
    segment_ids: Optional[Array | tuple[Array, Array]] = None,
    dropout_rate: float = 0.0,
    dropout_key: Optional[Array] = None,
    deterministic: bool = True,
    mult: float = 1.0,
    scale_seq_len: Optional[int] = None,
    formats: FormatPolicy = None,
    implementation: str = "reference",
) -> Array:
    """Unit-scaled multi-head attention `softmax(mult/d * q k^T + mask) v`.

    Shapes: query `[batch, q_len, heads, d]`, key and value `[batch, k_len, heads, d]`;
    output `[batch, q_len, heads, d]`. Logits and softmax in float32.

    Temperature `mult/d` (not `d^-1/2`: μP attention). `S = scale_seq_len or k_len`.
    Forward: output `* s`, `s = attention_output_scale(S, d, mult, causal, p)` (about
    `S^1/2` for flat attention, 1 for one-hot).
    Backward: `g_query = g_key = g_value = s`.
    Give `scale_seq_len` (the training length) when decoding with a KV cache, so the
    scale does not depend on the cache size.
    Masking: see `attention_mask` for `mask`, `causal` and `segment_ids`. Dropout
    (rate `p`) applies to the probabilities, with a `dropout_key`, unless
    `deterministic`.
    The scales sit outside the kernel, `attention_core` with `implementation`
    ("reference", the default: the explicit softmax, also used wherever dropout or
    `formats` are at work; "xla": jax's fused XLA attention; "cudnn": cuDNN flash
    attention on GPU).
    """
    batch, q_len, heads, d_head = query.shape
    k_len = key.shape[1]
    if key.shape != value.shape or key.shape[0] != batch or key.shape[2:] != (heads, d_head):
        raise ValueError(
            f"attention shapes: query {query.shape}, key {key.shape}, value "
            f"{value.shape}; expected [batch, len, heads, head_dim] with equal "
            "batch, heads and head_dim, and key/value of the same length"
        )
    s = attention_output_scale(scale_seq_len or k_len, d_head, mult, causal, dropout_rate)
    query, key, value = (scale_bwd(t, s) for t in (query, key, value))
    out = attention_core(
        query, key, value, mult / d_head, mask, causal, segment_ids, dropout_rate,
        dropout_key, deterministic, formats, implementation)
    return scale_fwd(out, s)


# ----------------------------------------------------------------------------- losses


def _reduce_loss(loss_sum: Array, count: Array | int, reduction: str) -> Array:
    """Returns the sum, or its mean over `count` in the forward pass only."""
    if reduction == "sum":
        return loss_sum
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if isinstance(count, int):
        return scale_fwd(loss_sum, 1 / count)
    # A traced count (weights): the value of the mean, the gradient of the sum.
    # `sum - stop_gradient(sum)` is exactly 0 (unlike `sum + stop_gradient(mean - sum)`,
    # which would round the mean to the float32 spacing of the sum).
    mean = loss_sum / jnp.maximum(count, 1)
    return jax.lax.stop_gradient(mean) + (loss_sum - jax.lax.stop_gradient(loss_sum))


def cross_entropy(
    logits: Array,
    labels: Array,
    mult: float = 1.0,
    reduction: str = "mean",
    weights: Optional[Array] = None,
) -> Array:
    """Unit-scaled softmax cross entropy of `mult * logits` (float32 inside).

    Shapes: logits `[..., V]`, labels `[...]` (integers), weights `[...]` (per-example
    weights, or a 0/1 mask; None = all 1). Returns a scalar float32 loss.
    Forward: `sum_i w_i * CE_i`; "mean" divides it by the number of rows (or by
    `sum(w)` with weights) in the forward pass only.
    Backward: the logits gradient of the *sum* loss times `V/(V-1)^1/2`, which is
    unit-scaled at uniform predictions; not divided by the row count, not multiplied
    by `mult`.
    """
    vocab = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: labels {labels.shape} must match logits {logits.shape} "
            "without the last (vocab) axis"
        )
    nll = softmax_nll(logits, labels, logit_mult=mult, grad_scale=vocab / (vocab - 1) ** 0.5)
    if weights is None:
        return _reduce_loss(jnp.sum(nll), nll.size, reduction)
    weights = weights.astype(jnp.float32)
    return _reduce_loss(jnp.sum(nll * weights), jnp.sum(weights), reduction)


def softmax_nll(logits: Array, labels: Array, logit_mult: float = 1.0,
                grad_scale: float = 1.0) -> Array:
    """Per-row negative log-likelihood `-log softmax(logit_mult * logits)[label]`.

    Shapes: logits `[..., V]` (computed in float32), labels `[...]` (integers);
    returns `[...]` float32. Backward: `(softmax - one_hot(label)) * g * grad_scale`,
    the gradient w.r.t. `logit_mult * logits` (so `logit_mult` is a forward-only
    scale, like `scale_fwd`), in one fused elementwise pass over `[..., V]`, from the
    forward's exponentials: one `exp` per logit for forward and backward together,
    and no scatter into a zero `[..., V]` array (what `take_along_axis`'s gradient
    costs). `cross_entropy` and `StandardOps.cross_entropy` (true gradient:
    `logit_mult = grad_scale = 1`) are built on it.
    """
    return _softmax_nll(logits.astype(jnp.float32), labels.astype(jnp.int32),
                        float(logit_mult), float(grad_scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax_nll(logits: Array, labels: Array, logit_mult: float, grad_scale: float) -> Array:
    return _softmax_nll_fwd(logits, labels, logit_mult, grad_scale)[0]


def _softmax_nll_fwd(logits, labels, logit_mult, grad_scale):
    del grad_scale
    z = logits
    if logit_mult != 1.0:
        z = z * logit_mult
    top = jnp.max(z, axis=-1, keepdims=True)
    exp = jnp.exp(z - top)
    total = jnp.sum(exp, axis=-1)
    picked = jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
    nll = top[..., 0] + jnp.log(total) - picked
    return nll, (exp, total, labels)


def _softmax_nll_bwd(logit_mult, grad_scale, res, g):
    del logit_mult
    exp, total, labels = res
    one_hot = labels[..., None] == jax.lax.broadcasted_iota(jnp.int32, exp.shape, exp.ndim - 1)
    g = g * grad_scale
    grad = exp * (g / total)[..., None] - jnp.where(one_hot, g[..., None], 0.0)
    return grad, None


_softmax_nll.defvjp(_softmax_nll_fwd, _softmax_nll_bwd)


def mse_loss(input: Array, target: Array, reduction: str = "mean") -> Array:
    """Unit-scaled mean squared error.

    Forward: `sum((input - target)^2)`, or divided by `input.size` ("mean"), forward
    only. Backward: both gradients of the sum loss times `8^-1/2` (the RMS of
    `2(x - y)` for unit-normal x, y is `8^1/2`).
    """
    if input.shape != target.shape:
        raise ValueError(
            f"mse_loss needs input.shape == target.shape, got {input.shape} and "
            f"{target.shape}"
        )
    input, target = scale_bwd(input, 8**-0.5), scale_bwd(target, 8**-0.5)
    loss = jnp.sum(jnp.square(input.astype(jnp.float32) - target.astype(jnp.float32)))
    return _reduce_loss(loss, input.size, reduction)
