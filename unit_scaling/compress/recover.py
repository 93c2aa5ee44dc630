"""A short fine-tune that lets a compressed model recover (`finetune`).

The same rule for every parametrization: Adam directions, each tensor's step scaled
by that tensor's own RMS (`optax.scale_by_param_block_rms`), times a relative learning
rate `lr` on a cosine decay to 0. A relative step is what sp (std-0.02 weights, lr
1e-3) and u-μP (unit weights, per-tensor lr ~0.5 fan_in^-1/2) both train with at
their peaks, about 0.03 of a tensor's RMS per step; the default `lr` 3e-3 is a tenth
of that. No weight decay, no dropout (the loss is evaluated deterministically).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import numpy as np
import optax

__all__ = ["finetune"]


def finetune(tree: Any, loss_fn: Callable[[Any, dict], jax.Array], batches: Iterator[dict],
             steps: int, lr: float = 3e-3) -> tuple[Any, list[float]]:
    """`(tree, losses)` after `steps` updates of every leaf of `tree` (e.g. a
    `low_rank.factorise` tree: the factors train) on `loss_fn(tree, batch)` over
    `batches` (numpy dicts)."""
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    tx = optax.chain(optax.scale_by_adam(), optax.scale_by_param_block_rms(),
                     optax.scale_by_schedule(optax.cosine_decay_schedule(lr, steps)),
                     optax.scale(-1.0))
    state = tx.init(tree)

    @jax.jit
    def step(tree, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(tree, batch)
        updates, state = tx.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state, loss

    losses = []
    for _ in range(steps):
        tree, state, loss = step(tree, state, next(batches))
        losses.append(float(loss))
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"the fine-tune's loss went non-finite: {losses[-5:]}")
    return tree, losses
