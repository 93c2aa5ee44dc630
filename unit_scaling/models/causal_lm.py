"""Decoder-only causal language model with packed-sequence loss and KV-cache generation.

Batch fields (int32 unless noted): input_ids [B, L], targets [B, L] (next tokens),
segment_ids [B, L] (packed document ids, 0 = padding), positions [B, L] (position of
each token within its document), weights [B, L] (float or int loss mask; 0 where the
target would cross a document boundary, or is padding).

Attention is causal and restricted to the token's own segment, so a document never
sees another; with RoPE the `positions` restart at every document.

Param tree: token_embed/embedding [V, D]; position_embed/embedding (position="learned");
stack/layer_{i}/... (or stack/layers/layer/... with scan_layers; see
`unit_scaling.models.transformer.TransformerStack`), stack/final_norm/scale; readout/kernel [D, V]
(untied, role output) or the tied table.

u-μP attention scale: the stack passes `scale_seq_len = max_len` to the attention, so
the (static) output scale is the same for a full forward and for cached decoding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unit_scaling import batches
from unit_scaling import nn as unn
from unit_scaling.models.accuracy import accuracy
from unit_scaling.models.sampling import sample_logits
from unit_scaling.models.transformer import TransformerConfig, TransformerStack
from unit_scaling.nn.partitioning import constrain
from unit_scaling.nn.positions import sinusoidal


@dataclasses.dataclass(frozen=True)
class CausalLMConfig(TransformerConfig):
    """Causal-LM hyperparameters (shared fields: `TransformerConfig`).

    Defaults: pre-norm RMSNorm, RoPE, SwiGLU, no biases, untied readout, no dropout.
    """

    vocab_size: int = 50304
    max_len: int = 1024
    activation: str = "swiglu"
    norm: str = "rms_norm"
    norm_position: str = "pre"
    position: str = "rope"
    use_bias: bool = False
    tie_embeddings: bool = False
    dropout: float = 0.0
    attention_dropout: float = 0.0


class CausalLM(nn.Module):
    """`__call__(batch, *, deterministic) -> (loss, {"loss", "accuracy"})`.

    `logits(input_ids, *, segment_ids=None, positions=None, deterministic=True)` ->
    `[B, L, V]` float32. `decode=True` (set by `generate`) keeps a KV cache in the
    "cache" collection.
    """

    config: CausalLMConfig
    decode: bool = False

    def setup(self):
        c = self.config
        kw = dict(parametrization=c.parametrization, precision=c.numerics)
        self.token_embed = unn.Embedding(c.vocab_size, c.d_model, tied=c.tie_embeddings, **kw)
        if c.position == "learned":
            self.position_embed = unn.Embedding(c.max_len, c.d_model, axes=(None, "embed"),
                                                **kw)
        self.embed_dropout = unn.Dropout(c.dropout, **kw)
        self.stack = TransformerStack(c, causal=True, decode=self.decode)
        if not c.tie_embeddings:
            self.readout = unn.LinearReadout(c.vocab_size, use_bias=False, **kw)

    def logits(
        self,
        input_ids: jax.Array,
        *,
        segment_ids: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
        deterministic: bool = True,
    ) -> jax.Array:
        c = self.config
        p = c.parametrization
        ops = p.ops
        batch, length = input_ids.shape
        if length > c.max_len:
            raise ValueError(f"sequence length {length} > max_len={c.max_len}; raise max_len")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
        terms = [self.token_embed(input_ids)]
        if c.position == "learned":
            terms.append(self.position_embed(positions))
        elif c.position == "sinusoidal":
            terms.append(sinusoidal(positions, c.d_model, p.unit_scaled).astype(c.numerics.dtype))
        x = constrain(ops.sum_embeddings(*terms), ("batch", "length", "embed"))
        x = self.embed_dropout(x, deterministic)
        x = self.stack(x, segment_ids=segment_ids, positions=positions,
                       deterministic=deterministic)
        if c.tie_embeddings:
            logits = self.token_embed.attend(x)
        else:
            logits = self.readout(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, batch: dict, *, deterministic: bool):
        fields = batches.required(batches.CAUSAL_LM)
        missing = [f for f in fields if f not in batch]
        if missing:
            raise ValueError(f"batch is missing field(s) {missing}; CausalLM needs {list(fields)}")
        logits = self.logits(batch["input_ids"], segment_ids=batch["segment_ids"],
                             positions=batch["positions"], deterministic=deterministic)
        weights = batch["weights"].astype(jnp.float32)
        loss = self.config.parametrization.ops.cross_entropy(logits, batch["targets"], weights)
        return loss, dict(loss=loss, accuracy=accuracy(logits, batch["targets"], weights))


def init_cache(model: CausalLM, batch: int) -> Any:
    """The empty KV cache ("cache" collection, unboxed) of `model` for `batch` rows:
    `[batch, max_len, heads, head_dim]` keys and values per layer in the format of
    `config.kv_cache`, and the write index."""
    decoder = model.clone(decode=True)
    ids = jnp.zeros((batch, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), ids, method=CausalLM.logits))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))


def _decode_logits(model, params, cache, ids, start, prepare):
    """Last-position logits `[B, V]` of `ids [B, n]` written at cache slots
    `start..start+n-1`, and the updated cache."""
    params = prepare(params) if prepare is not None else nn.unbox(params)
    pos = jnp.broadcast_to(start + jnp.arange(ids.shape[1])[None], ids.shape)
    logits, mutated = model.clone(decode=True).apply(
        {"params": params, "cache": cache}, ids, positions=pos, method=CausalLM.logits,
        mutable=["cache"])
    return logits[:, -1], mutated["cache"]


_STATIC = ("model", "prepare", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def prefill(params, cache, prompt_ids, rng, *, model, prepare=None, temperature=1.0,
            top_k=None, top_p=None):
    """`(first new token [B], cache)`: the whole prompt `[B, P]` in one forward that
    fills cache slots `0..P-1`. Compiles once per prompt shape."""
    logits, cache = _decode_logits(model, params, cache, prompt_ids, 0, prepare)
    return sample_logits(logits, rng, temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("cache",))
def decode_step(params, cache, token, position, rng, *, model, prepare=None,
                temperature=1.0, top_k=None, top_p=None):
    """`(next token [B], cache)` from one token `[B]` at `position` (a traced int32, so
    one compilation serves every position); the prompt is read from the cache, never
    recomputed. `prepare(params) -> params` runs inside the jit (e.g. dequantising
    weights stored in 8 bits); it must be hashable (a module-level function)."""
    logits, cache = _decode_logits(model, params, cache, token[:, None], position, prepare)
    return sample_logits(logits, rng, temperature, top_k, top_p), cache


def generate(
    model: CausalLM,
    params: Any,
    prompt_ids: jax.Array,
    max_new_tokens: int,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    use_cache: bool = True,
    prepare: Optional[Callable[[Any], Any]] = None,
) -> jax.Array:
    """Samples `max_new_tokens` after `prompt_ids [B, P]` (all rows the same length);
    returns the new tokens `[B, max_new_tokens]` (int32).

    `params`: the model's "params" collection (boxed or unboxed), or what `prepare`
    turns into it inside the jitted steps. temperature 0 is greedy. `use_cache=True`
    runs `prefill` (the prompt in one call) then one `decode_step` per new token;
    `use_cache=False` recomputes the full causal forward over a fixed
    `[B, P + max_new_tokens]` buffer each step (a reference for tests; same result
    because the attention scale uses `max_len`). Requires `P + max_new_tokens <=
    max_len` and no dropout at decode time.
    """
    c = model.config
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    if total > c.max_len:
        raise ValueError(
            f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) > max_len={c.max_len}"
        )
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    rngs = jax.random.split(rng, max_new_tokens)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    if not use_cache:
        full = prepare(params) if prepare is not None else nn.unbox(params)
        tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt_ids)

        def step(tokens, xs):
            t, key = xs
            logits = model.apply({"params": full}, tokens, method=CausalLM.logits)
            last = jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False)
            nxt = sample_logits(last, key, **sampling)
            return jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, t)), nxt

        steps = jnp.arange(prompt_len, total)
        _, new = jax.lax.scan(step, tokens, (steps, rngs))
        return new.T

    kw = dict(model=model, prepare=prepare, **sampling)
    token, cache = prefill(params, init_cache(model, batch), prompt_ids, rngs[0], **kw)
    new = [token]
    for t in range(prompt_len, total - 1):
        token, cache = decode_step(params, cache, token, jnp.int32(t), rngs[t - prompt_len + 1],
                                   **kw)
        new.append(token)
    return jnp.stack(new, axis=1)
