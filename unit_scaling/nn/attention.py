"""Multi-head self-attention with a fused QKV projection and an optional KV cache."""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from unit_scaling.formats.storage import SCALINGS, STORAGE_FORMATS, round_trip, store
from unit_scaling.nn.module import ScaledModule
from unit_scaling.nn.partitioning import constrain
from unit_scaling.nn.positions import apply_rope
from unit_scaling.ops import ATTENTION_IMPLEMENTATIONS

__all__ = ["ATTENTION_IMPLEMENTATIONS", "MultiHeadAttention", "SCALINGS", "STORAGE_FORMATS"]


class MultiHeadAttention(ScaledModule):
    """Self-attention on x `[batch, len, d]` -> `[batch, len, d]`.

    Params: `qkv_kernel` `[d, heads, 3, head_dim]` ("embed", "heads", None, "kv") and
    `qv_bias` `[heads, 2, head_dim]` (query and value); `out_kernel`
    `[heads, head_dim, d]` ("heads", "kv", "embed") and `out_bias` `[d]`. Kernels role
    "weight". The fused kernel keeps `heads` as the major axis of the merged
    `heads*3*head_dim` matmul dim, so tensor-sharding over heads survives the reshape.

    No key bias: it adds `q . b_k` to every logit of a query, which softmax cancels,
    so its true gradient is zero. A zero-gradient parameter is not harmless under
    Adam, which normalises float round-off in that gradient into full-size updates
    that differ between CPUs and XLA versions.

    Scales (unit/umup): each projection is `ops.linear` (fan_in d resp.
    heads*head_dim); attention is `ops.attention` (temperature
    `attention_mult/head_dim`, output scaled to unit RMS with the length `max_len`
    when `scale_seq_len_from_max_len`, which makes cached decoding agree with the
    full forward).

    Masks: `mask` a boolean key-padding mask `[batch, len]` (True = real token),
    `causal`, `segment_ids` `[batch, len]` (packed documents), positions for RoPE
    `[batch, len]`.

    Decoding (`decode=True`): keys/values are written into the "cache" collection
    (`cached_key`, `cached_value` `[batch, max_len, heads, head_dim]`, `cache_index`)
    at `cache_index`, and queries attend to cached positions `<= their own`. The first
    call (when the cache does not exist yet, e.g. under `init`) just creates it.

    `kv_cache` ("bf16" | "fp8" | "int8", `formats.storage`): the cache holds keys and
    values (after RoPE) in that format, with `kv_cache_scales="per_channel"` one
    float32 absmax scale per token and head (`cached_key_scale`,
    `cached_value_scale` `[batch, max_len, heads, 1]`); attention reads them back in
    the compute dtype. Without `decode`, k and v take the same round trip, so a full
    forward computes what cached decoding computes.

    Kernel: `attention_impl` ("reference" | "xla" | "cudnn", `U.attention_core`): a
    fused attention runs wherever it is exact (no attention dropout at work, no
    `attention_formats`), else the reference softmax.

    Precision: the projections use `precision.formats`, except the output projection
    (a u-μP critical matmul) under `high_precision_critical`; the two attention
    matmuls use `precision.attention_formats`.
    """

    num_heads: int
    causal: bool = False
    rope: bool = False
    rope_base: float = 10000.0
    max_len: Optional[int] = None
    scale_seq_len_from_max_len: bool = False
    dropout_rate: float = 0.0
    use_bias: bool = True
    decode: bool = False
    attention_impl: str = "reference"
    kv_cache: str = "none"
    kv_cache_scales: str = "none"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        mask: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
        deterministic: bool = True,
    ) -> jax.Array:
        p, ops, prec = self.parametrization, self.ops, self.precision
        batch, length, d = x.shape
        if d % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide d_model={d}; change num_heads "
                "or d_model"
            )
        h, dh = self.num_heads, d // self.num_heads
        x = x.astype(prec.dtype)

        qkv_kernel = self.scaled_param("qkv_kernel", p.kernel_init(d), (d, h, 3, dh),
                                       ("embed", "heads", None, "kv"), "weight", fan_in=d)
        qkv_bias = None
        if self.use_bias:
            qv_bias = self.scaled_param("qv_bias", nn.initializers.zeros, (h, 2, dh),
                                        ("heads", None, "kv"), "bias").astype(prec.dtype)
            zero_key = jnp.zeros((h, 1, dh), prec.dtype)
            qkv_bias = jnp.concatenate([qv_bias[:, :1], zero_key, qv_bias[:, 1:]],
                                       axis=1).reshape(-1)
        qkv = ops.linear(x, qkv_kernel.astype(prec.dtype).reshape(d, h * 3 * dh), qkv_bias,
                         prec.formats)
        qkv = checkpoint_name(qkv, "qkv_proj").reshape(batch, length, h, 3, dh)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q = constrain(q, ("batch", "length", "heads", "kv"))
        k = constrain(k, ("batch", "length", "heads", "kv"))
        v = constrain(v, ("batch", "length", "heads", "kv"))
        if self.rope:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
            q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)

        scale_seq_len = self.max_len if self.scale_seq_len_from_max_len else None
        key_mask = None if mask is None else mask.astype(bool)[:, None, None, :]
        if self.decode:
            k, v, key_mask, segment_ids = self._update_cache(k, v, key_mask, segment_ids)
        elif self.kv_cache != "none":  # what the cache would give back
            k, v = (round_trip(t, self.kv_cache, self.kv_cache_scales, (-1,)) for t in (k, v))

        dropout_key = None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout_key = self.make_rng("dropout")
        out = ops.attention(
            q, k, v, mask=key_mask, causal=self.causal, segment_ids=segment_ids,
            dropout_rate=self.dropout_rate, dropout_key=dropout_key,
            deterministic=deterministic, scale_seq_len=scale_seq_len,
            formats=prec.attention_formats, implementation=self.attention_impl,
        )
        out = constrain(out, ("batch", "length", "heads", "kv"))

        out_kernel = self.scaled_param("out_kernel", p.kernel_init(h * dh), (h, dh, d),
                                       ("heads", "kv", "embed"), "weight")
        out_bias = None
        if self.use_bias:
            out_bias = self.scaled_param("out_bias", nn.initializers.zeros, (d,), ("embed",),
                                         "bias").astype(prec.dtype)
        y = ops.linear(out.reshape(batch, length, h * dh),
                       out_kernel.astype(prec.dtype).reshape(h * dh, d), out_bias,
                       prec.matmul_formats(critical=True))
        y = checkpoint_name(y, "attn_out")
        return constrain(y, ("batch", "length", "embed"))

    def _update_cache(self, k, v, key_mask, segment_ids):
        """Writes k, v at `cache_index` and returns the full cache and its mask."""
        if self.max_len is None:
            raise ValueError("decode=True needs max_len (the KV cache length)")
        if segment_ids is not None:
            raise ValueError("decode=True does not support segment_ids (one sequence per row)")
        batch, length, h, dh = k.shape
        initialised = self.has_variable("cache", "cached_key")
        index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        i = index.value
        read = []
        for name, new in (("cached_key", k), ("cached_value", v)):
            stored = (store(new, self.kv_cache, self.kv_cache_scales, (-1,))
                      if self.kv_cache != "none" else None)
            values = self.variable("cache", name, jnp.zeros, (batch, self.max_len, h, dh),
                                   new.dtype if stored is None else stored.values.dtype)
            scale = None
            if stored is not None and stored.scale is not None:
                scale = self.variable("cache", f"{name}_scale", jnp.ones,
                                      (batch, self.max_len, h, 1), jnp.float32)
            if not initialised:
                continue
            if stored is None:
                values.value = jax.lax.dynamic_update_slice(values.value, new, (0, i, 0, 0))
                read.append(values.value)
                continue
            values.value = jax.lax.dynamic_update_slice(values.value, stored.values,
                                                        (0, i, 0, 0))
            if scale is not None:
                scale.value = jax.lax.dynamic_update_slice(scale.value, stored.scale,
                                                           (0, i, 0, 0))
            cache = type(stored)(values.value, None if scale is None else scale.value,
                                 stored.fmt)
            read.append(cache.dequantise(new.dtype))
        if not initialised:
            return k, v, key_mask, segment_ids
        index.value = i + length
        # Query j (at position i + j) sees cache slots <= i + j; with causal=True the
        # end-aligned causal mask is a superset of this one, so the attention scale is
        # that of causal training.
        visible = jnp.arange(self.max_len)[None, :] <= (i + jnp.arange(length))[:, None]
        cache_mask = visible[None, None]
        if key_mask is not None:
            raise ValueError("decode=True does not support a padding mask")
        return read[0], read[1], cache_mask, None
