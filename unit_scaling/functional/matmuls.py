"""Matmul-like ops: `matmul`, `linear` (and `dense`, `linear_readout`) with their
custom VJP, `embedding` and `gather_positions`."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from unit_scaling import formats as formats_lib
from unit_scaling.functional.base import Array, FormatPolicy, _lead, _share
from unit_scaling.scale import Constraint, apply_constraint, scale_bwd, scale_fwd


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
