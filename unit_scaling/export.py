r"""Export a run as a Hugging Face checkpoint, every static scale folded into the weights.

  python -m unit_scaling.export --workdir runs/bert-tiny --out exported/bert-tiny [--step N]

writes `OUT/config.json`, `OUT/model.safetensors` (PyTorch layout and names, float32) and
the run's sentencepiece `OUT/tokenizer.model`. Standard code then loads a plain model:

  BERT (MLM + NSP)  -> `BertForPreTraining`   (post-norm LayerNorm, GELU, absolute
                       positions, token types; `FlaxBertForPreTraining` too)
  causal LM         -> `LlamaForCausalLM`     (pre-norm RMSNorm, RoPE, SwiGLU, no biases;
                       `FlaxLlamaForCausalLM` too)

for `sp`, `unit` and `umup` alike: the exported model's logits are the logits this
project's cross entropy sees (`loss_mult * logits`, see `reference_logits`), in float32.

How the scales are found. Every unit-scaled op runs `scale_fwd(f(x), s)` with a static
`s` around a plain function `f` (`unit_scaling.functional`). The exporter reads each `s`
off the very op the model runs (`Parametrization.ops`), by evaluating it on a probe
input (`_Scales`), so the export cannot drift from the ops. Where each `s` goes is the
folding rule written next to the code below; `sp`'s ops have no scales (all 1), so its
export is a renaming.

What is exact and what is not. Every fold is exact, except where a scale reaches a
norm directly (LayerNorm / RMSNorm without a linear layer in between): a norm is scale
invariant but for its epsilon, `norm(c z; eps) = norm(z; eps / c^2)`. Two places:
BERT's MLM head (`dense -> gelu -> LayerNorm`: the unit-scaled gelu's output scale) and
the causal LM's pre-norm stream (the residual taus make HF's stream `sigma` times this
project's, sigma between 1 and the product of `(1+tau^2)^1/2`; each norm sees it). The
relative change is about `eps |1 - 1/c^2| / (2 mean(z^2))`: 1e-12 for BERT's eps 1e-12,
below 1e-6 at eps 1e-6. config.json lists them per export (its "unit_scaling" entry,
key "notes").

BERT: the unit/umup attention output scale and the post-norm taus depend on the
sequence length (`S = k_len`); the export fixes them at `seq_len` (the run's
`data.seq_len`, the padded length it trained on, kept in config.json as "seq_len" of
its "unit_scaling" entry): pad inputs to that length to get this project's logits.
The causal LM's scales use `max_len`, so its export holds at every length.

Refused (`ExportError`, naming the field): what the target class cannot express —
BERT: `norm_position` other than "post", `norm` other than "layer_norm",
`activation` other than "gelu", `position` "rope"; causal LM: `norm_position` other
than "pre", `norm` other than "rms_norm", `activation` other than "swiglu", `position`
other than "rope", `use_bias=True`. Accepted as exact: u-μP's `act_mult` (gelu(a x)/a
and x silu(a g) follow a linear layer, whose weights take `a`), `attn_mult`, the
residual taus, `loss_mult`, eval-mode dropout scales, tied or untied readouts, biases
off (BERT: written as zeros), sinusoidal BERT positions (written as the table of
`max_len` rows they are), `scan_layers`. Weights are written in float32 whatever the
run's `precision` (a bf16 or fp8 run's own logits differ from them by its rounding; a
note says so). transformers 4.57's `FlaxLlamaForCausalLM` cuts its rotary table to
`max_position_embeddings` columns: it needs `max_len >= 2 head_dim` (the PyTorch class
does not).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Optional

from unit_scaling._extras import require

require("flax", "unit_scaling.export", "flax")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.errors import ConfigError
from unit_scaling.models import bert, causal_lm
from unit_scaling.models.transformer import TransformerConfig, layer_taus
from unit_scaling.nn.attention import MultiHeadAttention
from unit_scaling.nn.positions import sinusoidal

SAFETENSORS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
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


# ------------------------------------------------------------------------ BERT


def bert_checkpoint(cfg: bert.BertConfig, params: Any, seq_len: int) -> Checkpoint:
    """The `BertForPreTraining` checkpoint of a `BertForPreTraining` (this project's) with
    `params`, exact at inputs padded to `seq_len` (see the module docstring)."""
    check_exportable(cfg)
    if not 0 < seq_len <= cfg.max_len:
        raise ExportError(f"seq_len={seq_len} must be in [1, max_len={cfg.max_len}]")
    p = nn.unbox(params)
    enc = p["encoder"]
    sc = _Scales(cfg.parametrization.ops)
    d, h, dh, m, n = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.num_layers
    drop = sc.dropout(cfg.dropout)  # every Dropout(cfg.dropout) in eval mode
    lam = sc.loss_mult
    T, notes = {}, []
    pre = "bert."

    # Embeddings: `norm(c_e (token + segment + position))`, c_e = sum_embeddings' n^-1/2.
    # Rule: c_e into every table (the sum is linear in them). Sinusoidal positions are
    # written as their table of max_len rows.
    n_terms = 3
    c_e = sc.sum_embeddings(n_terms)
    token = _np(enc["token_embed"]["embedding"])
    if cfg.position == "learned":
        position = _np(enc["position_embed"]["embedding"])
    else:
        position = _np(sinusoidal(jnp.arange(cfg.max_len), d, cfg.parametrization.unit_scaled))
    T[pre + "embeddings.word_embeddings.weight"] = c_e * token
    T[pre + "embeddings.token_type_embeddings.weight"] = c_e * _np(
        enc["segment_embed"]["embedding"])
    T[pre + "embeddings.position_embeddings.weight"] = c_e * position

    def norm(prefix: str, tree: dict, fold: float) -> None:
        """A LayerNorm whose output this project multiplies by `fold` before anything
        else reads it: gain and bias take `fold` (exact)."""
        T[prefix + ".weight"] = fold * _np(tree["scale"])
        T[prefix + ".bias"] = fold * _bias(tree, "bias", (d,))

    # Post-norm layers: this project computes `x' = norm(a * drop * f(x) + b * x)` per
    # branch (a, b: `residual_add`'s weights of the branch's tau; drop: eval dropout);
    # Hugging Face `norm(h + f'(h))`. Rule: the stream Hugging Face carries into a
    # branch is `h = b x` (the norm before it takes b into its gain and bias; the
    # embedding norm also the embedding dropout), f' takes 1/b into its input
    # projections (kernels only: `f'(h) = f(h / b)` for the bias-after-matmul layers)
    # and `a * drop` into its output projection (kernel and bias). Then
    # `h + f'(h) = a drop f(x) + b x` exactly, whatever the norm's epsilon.
    taus = [layer_taus(cfg, i, (1, seq_len, d), causal=False) for i in range(n)]
    weights = [[sc.residual(t) for t in pair] for pair in taus]  # [layer][branch] (a, b)
    norm(pre + "embeddings.LayerNorm", enc["embed_norm"], sc.dropout(cfg.dropout)
         * weights[0][0][1])

    lin_qkv = sc.linear(d, 3 * d)
    lin_out = sc.linear(h * dh, d)
    q_fold, s_attn = sc.attention(dh, seq_len, False, cfg.attention_dropout)
    lin_wi, lin_wo = sc.linear(d, m, None), sc.linear(m, d, None)
    g_out = sc.gelu()
    for i, layer in enumerate(_layers(enc["stack"], n)):
        L = f"{pre}encoder.layer.{i}."
        (a_att, b_att), (a_mlp, b_mlp) = weights[i]
        b_next = weights[i + 1][0][1] if i + 1 < n else 1.0
        attn = layer["attention"]
        wq, wk, wv, bq, bv = _qkv(attn, d, h, dh)
        # q, k, v = (x W + b) lin_qkv; temperature fold into q, output scale into v.
        T[L + "attention.self.query.weight"] = _t(wq * (lin_qkv * q_fold / b_att))
        T[L + "attention.self.query.bias"] = bq * (lin_qkv * q_fold)
        T[L + "attention.self.key.weight"] = _t(wk * (lin_qkv / b_att))
        T[L + "attention.self.key.bias"] = np.zeros(h * dh, np.float32)  # none here
        T[L + "attention.self.value.weight"] = _t(wv * (lin_qkv * s_attn / b_att))
        T[L + "attention.self.value.bias"] = bv * (lin_qkv * s_attn)
        out = a_att * drop * lin_out
        T[L + "attention.output.dense.weight"] = _t(_np(attn["out_kernel"]).reshape(h * dh, d)
                                                    * out)
        T[L + "attention.output.dense.bias"] = _bias(attn, "out_bias", (d,)) * out
        norm(L + "attention.output.LayerNorm", layer["norm_0"], b_mlp)
        # MLP: `(gelu_s * gelu(m (x W_i + b_i) lin_wi)) W_o + b_o) lin_wo`: m into W_i
        # and b_i (with 1/b on the kernel), gelu_s (which holds 1/m) into W_o.
        mlp = layer["mlp"]
        T[L + "intermediate.dense.weight"] = _t(_np(mlp["wi"]["kernel"])
                                                * (lin_wi * sc.act_mult / b_mlp))
        T[L + "intermediate.dense.bias"] = _bias(mlp["wi"], "bias", (m,)) * (lin_wi * sc.act_mult)
        out = a_mlp * drop * lin_wo
        T[L + "output.dense.weight"] = _t(_np(mlp["wo"]["kernel"]) * (out * g_out))
        T[L + "output.dense.bias"] = _bias(mlp["wo"], "bias", (d,)) * out
        norm(L + "output.LayerNorm", layer["norm_1"], b_next)

    # Pooler `tanh_s * tanh((x W + b) lin)`: lin into W and b, tanh_s into the NSP
    # readout's kernel. NSP `(pooled W + b) r * loss_mult`: r and loss_mult into both.
    lin_p = sc.linear(d, d)
    T[pre + "pooler.dense.weight"] = _t(_np(p["pooler"]["dense"]["kernel"]) * lin_p)
    T[pre + "pooler.dense.bias"] = _bias(p["pooler"]["dense"], "bias", (d,)) * lin_p
    r_nsp = sc.readout(d, 2) * lam
    T["cls.seq_relationship.weight"] = _t(_np(p["nsp"]["kernel"]) * (sc.tanh() * r_nsp))
    T["cls.seq_relationship.bias"] = _bias(p["nsp"], "bias", (2,)) * r_nsp

    # MLM head `readout(norm(gelu_s * gelu(m (x W + b) lin)))`: m into W and b; gelu_s
    # reaches the norm directly, which absorbs it but for epsilon (module docstring).
    lin_m = sc.linear(d, d)
    T["cls.predictions.transform.dense.weight"] = _t(_np(p["mlm_dense"]["kernel"])
                                                     * (lin_m * sc.act_mult))
    T["cls.predictions.transform.dense.bias"] = _bias(p["mlm_dense"], "bias", (d,)) * (
        lin_m * sc.act_mult)
    if not math.isclose(g_out, 1.0, rel_tol=1e-6):
        notes.append(
            f"MLM head: the gelu's output scale {g_out:.4g} is absorbed by the LayerNorm "
            f"after it: exact up to its epsilon ({cfg.norm_epsilon:g} acts as "
            f"{cfg.norm_epsilon / g_out**2:.3g})")
    # Readout `(n W + b) r * loss_mult`. Tied (W = table^T, written as c_e table): r
    # loss_mult / c_e into the norm's gain and bias (the norm's output is linear in
    # them), r loss_mult into the output bias. Untied: into the decoder and its bias.
    r = sc.readout(d, cfg.vocab_size, tied=cfg.tie_embeddings) * lam
    if cfg.tie_embeddings:
        norm("cls.predictions.transform.LayerNorm", p["mlm_norm"], r / c_e)
        T["cls.predictions.bias"] = _bias(p, "mlm_output_bias", (cfg.vocab_size,)) * r
    else:
        norm("cls.predictions.transform.LayerNorm", p["mlm_norm"], 1.0)
        T["cls.predictions.decoder.weight"] = _t(_np(p["mlm_readout"]["kernel"]) * r)
        T["cls.predictions.bias"] = _bias(p["mlm_readout"], "bias", (cfg.vocab_size,)) * r

    config = dict(
        architectures=["BertForPreTraining"], model_type="bert",
        vocab_size=cfg.vocab_size, hidden_size=d, num_hidden_layers=n,
        num_attention_heads=h, intermediate_size=m, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_len, type_vocab_size=cfg.type_vocab_size,
        initializer_range=0.02, layer_norm_eps=cfg.norm_epsilon, pad_token_id=_PAD_ID,
        position_embedding_type="absolute", tie_word_embeddings=cfg.tie_embeddings,
        torch_dtype="float32",
    )
    config["unit_scaling"] = dict(param=cfg.param, seq_len=seq_len, notes=notes)
    return Checkpoint(config, T, notes)


# ---------------------------------------------------------------------- causal LM


def llama_checkpoint(cfg: causal_lm.CausalLMConfig, params: Any) -> Checkpoint:
    """The `LlamaForCausalLM` checkpoint of a `CausalLM` (this project's) with `params`."""
    check_exportable(cfg)
    p = nn.unbox(params)
    sc = _Scales(cfg.parametrization.ops)
    d, h, dh, m, n = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.num_layers
    drop = sc.dropout(cfg.dropout)
    T, notes = {}, []
    table = _np(p["token_embed"]["embedding"])
    # Embedding: `drop * sum_embeddings(table[ids])` (one term: its scale is 1).
    T["model.embed_tokens.weight"] = table * (sc.sum_embeddings(1) * drop)

    # Pre-norm layers: this project computes `x' = b x + a drop f(norm(x))` per branch;
    # Hugging Face `h' = h + f'(norm(h))`. Rule: Hugging Face's stream is `h = sigma x`
    # with sigma_0 = 1 and sigma' = sigma / b; f' takes `a drop sigma'` into its output
    # projection. Then `h' = sigma x + sigma' a drop f = sigma' x'` exactly; each norm
    # sees its input scaled by sigma, which it removes but for epsilon.
    lin_qkv, lin_out = sc.linear(d, 3 * d), sc.linear(h * dh, d)
    q_fold, s_attn = sc.attention(dh, cfg.max_len, True, cfg.attention_dropout)
    lin_wi, lin_wo = sc.linear(d, m, None), sc.linear(m, d, None)
    glu = sc.silu_glu()
    sigma, sigmas = 1.0, [1.0]
    for i, layer in enumerate(_layers(p["stack"], n)):
        L = f"model.layers.{i}."
        (a_att, b_att), (a_mlp, b_mlp) = (sc.residual(t) for t in
                                          layer_taus(cfg, i, (1, cfg.max_len, d), causal=True))
        attn = layer["attention"]
        wq, wk, wv, _, _ = _qkv(attn, d, h, dh)
        T[L + "input_layernorm.weight"] = _np(layer["norm_0"]["scale"])
        T[L + "self_attn.q_proj.weight"] = _t(wq * (lin_qkv * q_fold))
        T[L + "self_attn.k_proj.weight"] = _t(wk * lin_qkv)
        T[L + "self_attn.v_proj.weight"] = _t(wv * (lin_qkv * s_attn))
        sigma /= b_att
        T[L + "self_attn.o_proj.weight"] = _t(_np(attn["out_kernel"]).reshape(h * dh, d)
                                              * (lin_out * a_att * drop * sigma))
        sigmas.append(sigma)
        # SwiGLU `glu_s * (x W_i lin) * silu(m (x W_g lin))` (glu_s holds 1/m): m into
        # gate_proj, glu_s into down_proj.
        mlp = layer["mlp"]
        T[L + "post_attention_layernorm.weight"] = _np(layer["norm_1"]["scale"])
        T[L + "mlp.gate_proj.weight"] = _t(_np(mlp["wg"]["kernel"]) * (lin_wi * sc.act_mult))
        T[L + "mlp.up_proj.weight"] = _t(_np(mlp["wi"]["kernel"]) * lin_wi)
        sigma /= b_mlp
        T[L + "mlp.down_proj.weight"] = _t(_np(mlp["wo"]["kernel"])
                                           * (glu * lin_wo * a_mlp * drop * sigma))
        sigmas.append(sigma)
    T["model.norm.weight"] = _np(p["stack"]["final_norm"]["scale"])
    if max(sigmas) > 1.0 + 1e-6:
        notes.append(
            f"the residual stream is {min(sigmas):.4g}..{max(sigmas):.4g} times this "
            f"project's: each RMSNorm removes that but for its epsilon "
            f"({cfg.norm_epsilon:g} acts as down to {cfg.norm_epsilon / max(sigmas)**2:.3g})")
    # Readout `(x W) r * loss_mult` (W: the readout kernel, or the tied table^T): into
    # lm_head. A tied table is written twice (tie_word_embeddings false): the Flax
    # Llama class has no tied head, and the two copies differ by the folded scales.
    r = sc.readout(d, cfg.vocab_size, tied=cfg.tie_embeddings) * sc.loss_mult
    kernel = table.T if cfg.tie_embeddings else _np(p["readout"]["kernel"])
    T["lm_head.weight"] = _t(kernel * r)

    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=m,
        num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=h, head_dim=dh,
        hidden_act="silu", max_position_embeddings=cfg.max_len,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=float(MultiHeadAttention.rope_base),
        rope_scaling=None, attention_bias=False, mlp_bias=False,
        attention_dropout=cfg.attention_dropout, tie_word_embeddings=False,
        initializer_range=0.02, pretraining_tp=1, use_cache=True,
        bos_token_id=_CLS_ID, eos_token_id=_SEP_ID, pad_token_id=_PAD_ID,
        torch_dtype="float32",
    )
    config["unit_scaling"] = dict(param=cfg.param, notes=notes)
    return Checkpoint(config, T, notes)


# ----------------------------------------------------------------- reference logits


def reference_logits(cfg: TransformerConfig, params: Any, input_ids: Any,
                     segment_ids: Any = None, input_mask: Any = None) -> dict[str, jax.Array]:
    """This project's logits as its cross entropy sees them (`loss_mult * logits`,
    float32, eval mode), which the export reproduces. BERT: `{"mlm": [B, L, V] at every
    position, "nsp": [B, 2]}`; causal LM: `{"logits": [B, L, V]}`."""
    lam = _Scales(cfg.parametrization.ops).loss_mult
    variables = {"params": nn.unbox(params)}
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if isinstance(cfg, causal_lm.CausalLMConfig):
        logits = causal_lm.CausalLM(cfg).apply(variables, input_ids,
                                               method=causal_lm.CausalLM.logits)
        return {"logits": lam * logits}
    batch, length = input_ids.shape
    segment_ids = jnp.zeros_like(input_ids) if segment_ids is None else jnp.asarray(segment_ids)
    input_mask = jnp.ones_like(input_ids) if input_mask is None else jnp.asarray(input_mask)
    positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))

    def heads(model):
        hidden = model.encoder(input_ids, segment_ids, input_mask, deterministic=True)
        return model.mlm_logits(hidden, positions), model.nsp(model.pooler(hidden))

    mlm, nsp = nn.apply(heads, bert.BertForPreTraining(cfg))(variables)
    return {"mlm": lam * mlm, "nsp": lam * nsp.astype(jnp.float32)}


# --------------------------------------------------------------------- writing


def checkpoint(cfg: TransformerConfig, params: Any, seq_len: Optional[int] = None
               ) -> Checkpoint:
    """`bert_checkpoint` (at `seq_len`, default `max_len`) or `llama_checkpoint`."""
    if check_exportable(cfg) == "bert":
        ckpt = bert_checkpoint(cfg, params, seq_len or cfg.max_len)
    else:
        ckpt = llama_checkpoint(cfg, params)
    if cfg.precision != "fp32":
        ckpt.notes.append(f"the run computed in precision={cfg.precision!r}; the export's "
                          "float32 weights compute in float32 (its logits differ by that "
                          "rounding)")
    return ckpt


def write(ckpt: Checkpoint, out: str | os.PathLike, tokenizer: Optional[Any] = None,
          metadata: Optional[dict] = None) -> str:
    """Writes `ckpt` to the directory `out` (created): `config.json`,
    `model.safetensors` (metadata format "pt": the PyTorch classes load it, and the
    Flax ones convert it) and, if given, the sentencepiece model file `tokenizer`
    (a path) as `tokenizer.model`. `metadata` goes into config.json's `unit_scaling`."""
    require("export", "unit_scaling.export", "safetensors")
    from safetensors.numpy import save_file

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    config = dict(ckpt.config)
    config["unit_scaling"] = dict(config.get("unit_scaling", {}), **(metadata or {}))
    with open(os.path.join(out, CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in ckpt.tensors.items()}
    save_file(tensors, os.path.join(out, SAFETENSORS), metadata={"format": "pt"})
    if tokenizer is not None:
        shutil.copyfile(os.fspath(tokenizer), os.path.join(out, TOKENIZER))
        if config["model_type"] == "llama":
            # LlamaTokenizer reads the sentencepiece model; [CLS] starts a document.
            with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
                json.dump(dict(tokenizer_class="LlamaTokenizer", bos_token="[CLS]",
                               eos_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]",
                               add_bos_token=True, add_eos_token=False, legacy=True), f,
                          indent=2)
    return out


def export_run(workdir: str, out: str, step: Optional[int] = None) -> str:
    """Exports checkpoint `step` (default: the latest) of the run in `workdir` to `out`
    with the run's tokenizer; returns `out`."""
    from unit_scaling.train import tasks
    from unit_scaling.train.rundir import RunDir

    run = RunDir(workdir)
    config = run.read_config()  # RunDirError: missing, or not a train.py run
    objective = config.data.objective
    if objective not in ("mlm_nsp", "causal_lm"):
        raise ExportError(f"--workdir {workdir} trained {objective!r}; only 'mlm_nsp' (BERT "
                          "pretraining) and 'causal_lm' runs export")
    cfg = tasks.model_config(config, config.data.vocab_size)
    check_exportable(cfg)  # before reading the weights
    params, step = run.restore_params(step)
    ckpt = checkpoint(cfg, params, seq_len=config.data.seq_len)
    tokenizer = run.tokenizer if run.tokenizer.exists() else None
    return write(ckpt, out, tokenizer, metadata=dict(workdir=str(run), step=step))


def _main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    out = export_run(f.workdir, f.out, f.step)
    with open(os.path.join(out, CONFIG)) as fp:
        meta = json.load(fp)
    print(f"wrote {out}: {meta['architectures'][0]} ({meta['unit_scaling']['param']}, "
          f"step {meta['unit_scaling']['step']})")
    for note in meta["unit_scaling"]["notes"]:
        print(f"note: {note}")


if __name__ == "__main__":
    from absl import app, flags

    from unit_scaling import errors

    flags.DEFINE_string("workdir", None, "A BERT or causal-LM training run.", required=True)
    flags.DEFINE_string("out", None, "The directory to write the export to.", required=True)
    flags.DEFINE_integer("step", None, "The checkpoint to export (default: the latest).")
    app.run(errors.reported(_main), flags_parser=errors.flags_parser)
