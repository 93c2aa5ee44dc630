"""Losses: `cross_entropy`, the fused `softmax_nll` and `mse_loss`."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from unit_scaling.functional.base import Array
from unit_scaling.scale import scale_bwd, scale_fwd


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
