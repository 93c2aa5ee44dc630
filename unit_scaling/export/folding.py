"""What exports and the static scales: `check_exportable` (the fields each target class
can express), `_Scales` (each op's static scale, read off the op itself) and the
parameter helpers the two targets share. See `unit_scaling.export` for the rules."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from unit_scaling._extras import require

require("flax", "unit_scaling.export", "flax")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.errors import ConfigError
from unit_scaling.models import bert, causal_lm
from unit_scaling.models.transformer import TransformerConfig
from unit_scaling.nn.attention import MultiHeadAttention

# This project's reserved token ids (unit_scaling.data.tokenizer): [PAD] 0, [CLS] 2
# (beginning of a document), [SEP] 3 (its end).
_PAD_ID, _CLS_ID, _SEP_ID = 0, 2, 3


class ExportError(ConfigError):
    """The model has a feature the target Hugging Face class cannot express."""


@dataclasses.dataclass
class Checkpoint:
    """An export in memory: `config` (config.json), `tensors` (PyTorch names -> float32
    arrays, `[out, in]` for dense weights) and `notes` (where it is exact only up to a
    norm's epsilon)."""

    config: dict
    tensors: dict[str, np.ndarray]
    notes: list[str]


# ---------------------------------------------------------------- what is exportable

_BERT_NEEDS = dict(norm_position="post", norm="layer_norm", activation="gelu")
_LLAMA_NEEDS = dict(norm_position="pre", norm="rms_norm", activation="swiglu",
                    position="rope", use_bias=False)


def check_exportable(cfg: TransformerConfig) -> str:
    """"bert" or "llama", the target of `cfg`; `ExportError` naming the first field the
    target class cannot express."""
    if isinstance(cfg, bert.BertConfig):
        target, needs, cls = "bert", _BERT_NEEDS, "BertForPreTraining"
        if cfg.position == "rope":
            raise ExportError(
                "position='rope' cannot be exported: BertForPreTraining has only absolute "
                "position embeddings (position='learned' or 'sinusoidal' export)")
    elif isinstance(cfg, causal_lm.CausalLMConfig):
        target, needs, cls = "llama", _LLAMA_NEEDS, "LlamaForCausalLM"
    else:
        raise ExportError(f"cannot export a {type(cfg).__name__}: only BertConfig "
                          "(BertForPreTraining) and CausalLMConfig (LlamaForCausalLM) export")
    for name, value in needs.items():
        if getattr(cfg, name) != value:
            raise ExportError(
                f"{name}={getattr(cfg, name)!r} cannot be exported: {cls} has "
                f"{name}={value!r} only (its architecture: "
                + ", ".join(f"{k}={v!r}" for k, v in needs.items()) + ")")
    if target == "llama" and MultiHeadAttention.rope_base != 10000.0:
        raise ExportError("rope_base != 10000 cannot be exported: FlaxLlamaForCausalLM "
                          "ignores rope_theta")
    return target


# ----------------------------------------------------------------- the static scales


def _first(x: Any) -> float:
    return float(np.asarray(x, np.float32).reshape(-1)[0])


class _Scales:
    """The static forward scales of `ops` (a `Parametrization.ops`), each read off the
    op by a probe: the ops are `s * f(x)` with `s` static, so `op(probe) / f(probe)` is
    `s` (to float32 rounding). The comment of each says what it is under unit/umup."""

    def __init__(self, ops: Any):
        self.ops = ops
        # The u-μP mults the plain functions take (1 for sp and unit).
        self.act_mult = float(getattr(ops, "act_mult", 1.0))
        # Cross entropy of `loss_mult * logits`: the logits the loss sees.
        self.loss_mult = float(getattr(ops, "loss_mult", 1.0))

    def linear(self, fan_in: int, fan_out: int, constraint: Optional[str] = "to_output_scale"
               ) -> float:
        """`ops.linear`: `(x @ W + b) * s`, s = fan_in^-1/2 (bias inside the scale)."""
        y = self.ops.linear(jnp.ones((1, fan_in)), jnp.ones((fan_in, fan_out)),
                            constraint=constraint)
        return _first(y) / fan_in

    def readout(self, fan_in: int, fan_out: int, tied: bool = False) -> float:
        """`ops.readout`: `(x @ W + b) * s`, s = fan_in^-1 (μP readout), or fan_in^-1/2
        (unit's tied readout)."""
        y = self.ops.readout(jnp.ones((1, fan_in)), jnp.ones((fan_in, fan_out)), tied=tied)
        return _first(y) / fan_in

    def gelu(self) -> float:
        """`ops.gelu(x) = s * gelu(m x)`, m = act_mult (`U.gelu`: `gelu(m x) / m` times its
        output scale, so s includes 1/m)."""
        x = jnp.full((1,), 0.5)
        return _first(self.ops.gelu(x)) / _first(jax.nn.gelu(self.act_mult * x,
                                                            approximate=False))

    def silu_glu(self) -> float:
        """`ops.silu_glu(x, g) = s * x * silu(m g)`, m = act_mult (`U.silu_glu`: x g
        sigmoid(m g) = (x / m) silu(m g), so s includes 1/m)."""
        g = jnp.full((1,), 0.5)
        return _first(self.ops.silu_glu(jnp.ones((1,)), g)) / _first(
            jax.nn.silu(self.act_mult * g))

    def tanh(self) -> float:
        """`ops.tanh(x) = s * tanh(x)`, s = E[tanh(z)^2]^-1/2 = 1.593."""
        x = jnp.full((1,), 0.5)
        return _first(self.ops.tanh(x)) / float(np.tanh(0.5))

    def dropout(self, rate: float) -> float:
        """Eval-mode dropout `s * x`: s = (1-rate)^1/2 (unit-scaled dropout); 1 for sp's
        inverted dropout."""
        return _first(self.ops.dropout(jnp.ones((1,)), rate, None, True))

    def sum_embeddings(self, n: int) -> float:
        """`ops.sum_embeddings` of n terms `= s * sum`, s = n^-1/2 (1 for one term)."""
        return _first(self.ops.sum_embeddings(*[jnp.ones((1,))] * n)) / n

    def residual(self, tau: float) -> tuple[float, float]:
        """`ops.residual_add(branch, skip, tau) = a * branch + b * skip`: `(a, b)`,
        a = tau (1+tau^2)^-1/2, b = (1+tau^2)^-1/2 (sp: 1, 1)."""
        one, zero = jnp.ones((1,)), jnp.zeros((1,))
        return (_first(self.ops.residual_add(one, zero, tau)),
                _first(self.ops.residual_add(zero, one, tau)))

    def attention(self, head_dim: int, seq_len: int, causal: bool, dropout_rate: float
                  ) -> tuple[float, float]:
        """`(q_fold, s)`: `ops.attention` is `s * softmax(t q k^T) v` with temperature
        `t = attention_mult(d)/d` (umup: attn_mult/d; unit "linear": 1/d) and output
        scale `s = U.attention_output_scale` (eval-mode attention dropout included), over
        `seq_len` positions as the model uses them. Hugging Face's temperature is d^-1/2,
        so `q_fold = t d^1/2` goes into the query projection and `s` into the value
        projection (attention is linear in v, and softmax rows sum to 1, so v's bias
        takes it too)."""
        t = self.ops.attention_mult(head_dim) / head_dim
        q = jnp.zeros((1, seq_len, 1, head_dim))
        v = jnp.ones((1, seq_len, 1, head_dim))
        out = self.ops.attention(q, q, v, causal=causal, dropout_rate=dropout_rate,
                                 deterministic=True,
                                 scale_seq_len=seq_len if causal else None)
        return t * head_dim**0.5, _first(out[:, -1])


# ---------------------------------------------------------------------- params


def _np(x: Any) -> np.ndarray:
    return np.asarray(jax.device_get(x), np.float32)


def _layers(stack: dict, n: int) -> list[dict]:
    """Per-layer param dicts of a `TransformerStack` (unrolled or `scan_layers`)."""
    if "layers" in stack:
        scanned = stack["layers"]["layer"]
        return [jax.tree.map(lambda a, i=i: a[i], scanned) for i in range(n)]
    return [stack[f"layer_{i}"] for i in range(n)]


def _bias(tree: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """`tree[name]`, or zeros where the model has no bias (`use_bias=False`)."""
    return _np(tree[name]) if name in tree else np.zeros(shape, np.float32)


def _qkv(attn: dict, d: int, h: int, dh: int) -> tuple[np.ndarray, ...]:
    """`(W_q, W_k, W_v [d, h*dh], b_q, b_v [h*dh])` of the fused projection (head-major,
    as Hugging Face splits heads)."""
    kernel = _np(attn["qkv_kernel"])  # [d, h, 3, dh]
    ws = [kernel[:, :, j].reshape(d, h * dh) for j in range(3)]
    qv = _bias(attn, "qv_bias", (h, 2, dh))
    return (*ws, qv[:, 0].reshape(-1), qv[:, 1].reshape(-1))


def _t(kernel: np.ndarray) -> np.ndarray:
    """A `[in, out]` kernel as a PyTorch `nn.Linear` weight `[out, in]`."""
    return np.ascontiguousarray(kernel.T)
