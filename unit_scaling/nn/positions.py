"""Position encodings: rotary (RoPE) and sinusoidal. Learned positions are an
`Embedding` of `max_len` rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POSITION_KINDS = ("rope", "learned", "sinusoidal")


def apply_rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding of x `[batch, len, heads, head_dim]` at integer
    `positions` `[batch, len]` (head_dim even; halves rotated, GPT-NeoX layout).

    A rotation preserves each vector's norm, so the RMS of q and k (and the scale
    rules of the attention that follows) are unchanged. Computed in float32.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    inv_freq = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [b, l, d/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def sinusoidal(positions: jax.Array, features: int, unit: bool, base: float = 10000.0) -> jax.Array:
    """Sinusoidal encodings `[..., features]` of integer `positions` `[...]` (float32).

    Each sin/cos pair has RMS 2^-1/2 over positions; `unit=True` multiplies by 2^1/2
    so that the encoding is unit-scaled like a N(0,1) embedding.
    """
    half = features // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.reshape(
        (1,) * positions.ndim + (half,))
    enc = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if features % 2:
        enc = jnp.concatenate([enc, jnp.zeros(enc.shape[:-1] + (1,), enc.dtype)], axis=-1)
    return enc * (2**0.5 if unit else 1.0)
