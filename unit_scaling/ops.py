"""The ops the library's modules run: `StandardOps` (plain jnp / jax.nn) and
`UnitScaledOps` (the same ops from `unit_scaling.functional`, with the u-μP mults).

A module never asks which parametrization it runs under: it calls `ops.linear`,
`ops.attention`, ... on the object its `Parametrization.ops` hands out. Both classes
take the same arguments, so one model code serves `sp`, `unit` and `umup`; only the
scales differ (each method's docstring says which).

Imports only jax, numpy and the core modules (`functional`, `formats`, `scale`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling import formats as formats_lib
from unit_scaling import functional as U
from unit_scaling.scale import apply_constraint, scale_bwd, scale_fwd, scale_traced

Array = jax.Array
# The attention kernels `attention(..., implementation=)` takes (`U.attention_core`).
ATTENTION_IMPLEMENTATIONS = U.ATTENTION_IMPLEMENTATIONS
FormatPolicy = Optional[formats_lib.FormatPolicy]


def _gauss_moment(f: Callable[[np.ndarray], np.ndarray]) -> float:
    """`E[f(x)]` for x ~ N(0, 1), by 80-point Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(w * f(x)) / np.sqrt(2 * np.pi))


# E[tanh(x)^2] = 0.3943 and E[tanh'(x)^2] = E[(1-tanh(x)^2)^2] = 0.4644 for x ~ N(0,1).
_TANH_OUT_SCALE = _gauss_moment(lambda x: np.tanh(x) ** 2) ** -0.5
_TANH_GRAD_SCALE = _gauss_moment(lambda x: (1 - np.tanh(x) ** 2) ** 2) ** -0.5


def _lead(x: Array, ndim: int) -> Array:
    """Explicit leading unit axes (the test suite runs with rank promotion 'raise')."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


@dataclasses.dataclass(frozen=True)
class StandardOps:
    """The standard parametrization's ops: plain JAX, logits and statistics in float32."""

    def linear(self, x: Array, kernel: Array, bias: Optional[Array] = None,
               formats: FormatPolicy = None,
               constraint: Optional[str] = "to_output_scale") -> Array:
        """Dense layer, x `[..., fan_in]` @ kernel `[fan_in, fan_out]` (+ bias `[fan_out]`);
        matmul operands rounded per `formats` (None: `U.dense`, whose backward XLA:CPU runs
        faster than autodiff's). `constraint` is unit scaling's (ignored)."""
        if formats is None:
            return U.dense(x, kernel, bias)
        y = formats_lib.matmul(x, kernel, formats)
        return y if bias is None else y + _lead(bias.astype(y.dtype), y.ndim)

    def readout(self, x: Array, kernel: Array, bias: Optional[Array] = None,
                formats: FormatPolicy = None, tied: bool = False) -> Array:
        """Final projection to logits, `[..., d]` @ `[d, V]`: a plain `linear`."""
        return self.linear(x, kernel, bias, formats)

    def gather_positions(self, x: Array, positions: Array) -> Array:
        """`x[b, positions[b, p]]`: `[B, L, ...]`, `[B, P]` -> `[B, P, ...]`."""
        index = positions.astype(jnp.int32).reshape(positions.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, index, axis=1)

    def embed(self, ids: Array, table: Array) -> Array:
        """Lookup `table[ids]`: ids `[...]`, table `[V, d]` -> `[..., d]`."""
        return jnp.take(table, ids, axis=0)

    def shared(self, x: Array, uses: int) -> Array:
        """`x` read by `uses` consumers (a tied table, an encoder output feeding two
        heads): unchanged."""
        return x

    def sum_embeddings(self, *xs: Array) -> Array:
        """Sum of n embeddings (token, segment, position), each `[..., d]`."""
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out

    def gelu(self, x: Array) -> Array:
        """GELU (exact; `U.gelu` unscaled: computed in float32)."""
        return U.gelu(x, scaled=False)

    def silu_glu(self, x: Array, gate: Array) -> Array:
        """SwiGLU `x * silu(gate)` (`U.silu_glu` unscaled: its fused backward)."""
        return U.silu_glu(x, gate, scaled=False)

    def tanh(self, x: Array) -> Array:
        """tanh (BERT pooler)."""
        return jnp.tanh(x)

    def dropout(self, x: Array, rate: float, key: Optional[Array], deterministic: bool) -> Array:
        """Inverted dropout (identity when `deterministic` or `rate` 0)."""
        if rate == 0.0 or deterministic:
            return x
        keep = jax.random.bernoulli(key, 1 - rate, x.shape)
        return jnp.where(keep, x / (1 - rate), jnp.zeros_like(x))

    def attention_mult(self, head_dim: int) -> float:
        """`mult` such that the logits temperature is `mult / head_dim`: 1/sqrt(d_head)."""
        return head_dim**0.5

    def attention(self, query: Array, key: Array, value: Array, *,
                  mask: Optional[Array] = None, causal: bool = False,
                  segment_ids: Optional[Array] = None, dropout_rate: float = 0.0,
                  dropout_key: Optional[Array] = None, deterministic: bool = True,
                  scale_seq_len: Optional[int] = None, formats: FormatPolicy = None,
                  implementation: str = "reference") -> Array:
        """Multi-head attention on `[batch, len, heads, head_dim]` tensors:
        `softmax(q k^T / sqrt(d)) v`, logits and softmax in float32. Masks as
        `U.attention_mask`; `implementation` as `U.attention_core`; `scale_seq_len` is
        unit scaling's (ignored)."""
        return U.attention_core(
            query, key, value, self.attention_mult(query.shape[-1]) / query.shape[-1],
            mask=mask, causal=causal, segment_ids=segment_ids, dropout_rate=dropout_rate,
            dropout_key=dropout_key, deterministic=deterministic, formats=formats,
            implementation=implementation)

    def layer_norm(self, x: Array, weight: Optional[Array], bias: Optional[Array],
                   eps: float) -> Array:
        """LayerNorm over the last axis, statistics in float32; output in x's dtype."""
        x32 = x.astype(jnp.float32)
        x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
        if weight is not None:
            y = y * _lead(weight.astype(jnp.float32), y.ndim)
        if bias is not None:
            y = y + _lead(bias.astype(jnp.float32), y.ndim)
        return y.astype(x.dtype)

    def rms_norm(self, x: Array, weight: Optional[Array], eps: float) -> Array:
        """RMSNorm over the last axis, statistics in float32; output in x's dtype."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
        if weight is not None:
            y = y * _lead(weight.astype(jnp.float32), y.ndim)
        return y.astype(x.dtype)

    def residual_split(self, x: Array, tau: float | Array) -> tuple[Array, Array]:
        """`(branch input, skip)` before a residual branch of weight `tau`: two copies."""
        return x, x

    def residual_add(self, branch: Array, skip: Array, tau: float | Array) -> Array:
        """`skip + branch`."""
        return skip + branch

    def cross_entropy(self, logits: Array, labels: Array,
                      weights: Optional[Array] = None) -> Array:
        """Weighted-mean softmax cross entropy, float32; logits `[..., V]`, labels `[...]`."""
        nll = U.softmax_nll(logits, labels)
        if weights is None:
            return jnp.mean(nll)
        weights = weights.astype(jnp.float32)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@dataclasses.dataclass(frozen=True)
class UnitScaledOps(StandardOps):
    """The ops of `unit` and `umup`: `unit_scaling.functional`, outputs and gradients
    unit-scaled. Matmuls round per `formats` as in `StandardOps`.

    Fields (the u-μP mults; 1 for `unit`):
      act_mult: GELU / SwiGLU input multiplier.
      attn_mult: the logits temperature is `attn_mult / head_dim`; None: 1/sqrt(head_dim).
      loss_mult: cross-entropy logits multiplier.
      mup_tied_readout: a readout tied to the embedding table is the μP `U.linear_readout`
        (umup); False: `U.linear` without a constraint (unit, see `readout`).
    """

    act_mult: float = 1.0
    attn_mult: Optional[float] = None
    loss_mult: float = 1.0
    mup_tied_readout: bool = True

    def linear(self, x, kernel, bias=None, formats=None, constraint="to_output_scale"):
        """`U.linear`: forward fan_in^-1/2, input gradient fan_out^-1/2 under
        `constraint`, weight gradient batch^-1/2."""
        return U.linear(x, kernel, bias, constraint=constraint, formats=formats)

    def readout(self, x, kernel, bias=None, formats=None, tied=False):
        """`U.linear_readout` (forward fan_in^-1, logits RMS fan_in^-1/2 at init: the μP
        readout); a readout `tied` to the embedding table without `mup_tied_readout`
        (unit): `U.linear` without a constraint (forward fan_in^-1/2, logits RMS 1 at
        init), as in the unit-scaling library of 2023.

        Why unit's tied readout differs: unit has no per-tensor lr rules, so Adam moves
        the table by about lr per element and the logits by about `scale * lr * d`
        (aligned updates): lr through a fan_in^-1 readout, 11x less than through
        fan_in^-1/2 at d = 128, which left unit tiny BERT at the unigram stage. u-μP
        keeps its μP readout tied or not: the norm before its readout (lr factor 1)
        sets the logits' scale quickly, and with fan_in^-1/2 u-μP BERT learned less
        (docs/results.md, "BERT's own architecture").
        """
        if tied and not self.mup_tied_readout:
            return U.linear(x, kernel, bias, constraint=None, formats=formats)
        return U.linear_readout(x, kernel, bias, formats=formats)

    def gather_positions(self, x, positions):
        """`U.gather_positions` (backward scale `(L/P)^1/2`)."""
        return U.gather_positions(x, positions)

    def embed(self, ids, table):
        """`U.embedding`: the table gradient scaled by (V/ids.size)^1/2."""
        return U.embedding(ids, table)

    def shared(self, x, uses):
        """`x` read by `uses` consumers, each sending back a unit-scaled gradient: their
        (roughly independent) sum has RMS `uses^1/2`, so each is scaled by `uses^-1/2`."""
        return scale_bwd(x, uses**-0.5)

    def sum_embeddings(self, *xs):
        """Forward `* n^-1/2`, gradient passed through unchanged. Derivation: for n
        independent unit-RMS terms the sum has RMS n^1/2, so the forward scale is
        n^-1/2. Each term comes from its own table (a cut-edge), so its gradient may be
        scaled independently of the forward: the unscaled output gradient (unit RMS) is
        already the unit-scaled gradient of every term."""
        out = super().sum_embeddings(*xs)
        return scale_fwd(out, len(xs) ** -0.5) if len(xs) > 1 else out

    def gelu(self, x):
        """`U.gelu(x, mult=act_mult)`."""
        return U.gelu(x, mult=self.act_mult)

    def silu_glu(self, x, gate):
        """`U.silu_glu(x, gate, mult=act_mult)`."""
        return U.silu_glu(x, gate, mult=self.act_mult)

    def tanh(self, x):
        """tanh scaled to unit RMS.

        Derivation (x ~ N(0,1), Gauss-Hermite quadrature): E[tanh(x)^2] = 0.3943, so the
        output scale is 0.3943^-1/2 = 1.593; E[tanh'(x)^2] = 0.4644, so the input-gradient
        scale is 0.4644^-1/2 = 1.467. One scale for both (`to_output_scale`, as
        `U.gelu`) keeps the gradient proportional to the true gradient of the loss.
        """
        out_scale, grad_scale = apply_constraint(
            "to_output_scale", _TANH_OUT_SCALE, _TANH_GRAD_SCALE
        )
        return scale_fwd(jnp.tanh(scale_bwd(x, grad_scale)), out_scale)

    def dropout(self, x, rate, key, deterministic):
        """`U.dropout` (RMS-preserving: training output has the input's RMS; eval
        multiplies by (1-rate)^1/2, the training expectation)."""
        if rate == 0.0:
            return x
        return U.dropout(x, rate, key, deterministic)

    def attention_mult(self, head_dim):
        """`attn_mult`, or sqrt(head_dim) (the 1/sqrt(d_head) temperature) when None."""
        return head_dim**0.5 if self.attn_mult is None else self.attn_mult

    def attention(self, query, key, value, *, mask=None, causal=False, segment_ids=None,
                  dropout_rate=0.0, dropout_key=None, deterministic=True,
                  scale_seq_len=None, formats=None, implementation="reference"):
        """`U.scaled_dot_product_attention` with `mult = attention_mult(d)`: output and
        gradients scaled to unit RMS; `scale_seq_len` fixes the scale for KV-cache
        decoding; `implementation` as `U.attention_core`."""
        return U.scaled_dot_product_attention(
            query, key, value, mask=mask, causal=causal, segment_ids=segment_ids,
            dropout_rate=dropout_rate, dropout_key=dropout_key,
            deterministic=deterministic, mult=self.attention_mult(query.shape[-1]),
            scale_seq_len=scale_seq_len, formats=formats, implementation=implementation,
        )

    def layer_norm(self, x, weight, bias, eps):
        """`U.layer_norm` (gain/bias gradients scaled batch^-1/2)."""
        return U.layer_norm(x, weight, bias, eps)

    def rms_norm(self, x, weight, eps):
        """`U.rms_norm` (gain gradient scaled batch^-1/2)."""
        return U.rms_norm(x, weight, eps)

    def residual_split(self, x, tau):
        """`U.residual_split(x, tau)`. `tau` may be a traced scalar (layers under
        `nn.scan` get their tau as a scanned input); then the same scales are applied by
        `unit_scaling.scale.scale_traced`."""
        if isinstance(tau, (int, float)):
            return U.residual_split(x, tau)
        denom = jnp.sqrt(1 + tau**2)
        return scale_traced(x, 1.0, tau / denom), scale_traced(x, 1.0, 1 / denom)

    def residual_add(self, branch, skip, tau):
        """`U.residual_add(branch, skip, tau)` (a traced `tau` as in `residual_split`)."""
        if isinstance(tau, (int, float)):
            return U.residual_add(branch, skip, tau)
        denom = jnp.sqrt(1 + tau**2)
        return scale_traced(branch, tau / denom, 1.0) + scale_traced(skip, 1 / denom, 1.0)

    def cross_entropy(self, logits, labels, weights=None):
        """`U.cross_entropy(mult=loss_mult)`: forward the weighted mean (float32);
        backward the unit-scaled gradient of the weighted *sum*."""
        return U.cross_entropy(logits, labels, mult=self.loss_mult, weights=weights)
