"""The few-step training loop the examples share: jitted value_and_grad + an optax chain."""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax


def fit(loss_fn: Callable[[Any], jax.Array], params: Any,
        tx: optax.GradientTransformation, steps: int) -> tuple[Any, list[float]]:
    """Runs `steps` steps of `tx` on `loss_fn(params)`; returns the params and losses."""
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
        print(f"step {i}: loss {losses[-1]:.3f}")
    return params, losses
