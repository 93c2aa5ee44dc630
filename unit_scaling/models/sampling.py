"""Next-token sampling from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> jax.Array:
    """Samples token ids `[B]` from logits `[B, V]`.

    temperature 0: argmax (greedy; `rng` unused). Otherwise softmax(logits /
    temperature) restricted to the `top_k` largest logits and/or to the smallest set of
    tokens whose probability mass reaches `top_p` (the most likely token always stays).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Mass strictly before each sorted token: keep tokens until top_p is reached.
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_index = jnp.sum(before < top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
