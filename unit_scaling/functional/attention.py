"""Attention: masks, the output scale and `scaled_dot_product_attention` (reference,
XLA or cuDNN kernels)."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from unit_scaling import formats as formats_lib
from unit_scaling.functional.base import Array, FormatPolicy, logarithmic_interpolation
from unit_scaling.scale import scale_bwd, scale_fwd


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
