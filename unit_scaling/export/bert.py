"""`BertForPreTraining` checkpoints: BERT's folding rules, written next to each tensor."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from unit_scaling.export.folding import (
    _PAD_ID, Checkpoint, ExportError, _Scales, _bias, _layers, _np, _qkv, _t,
    check_exportable)
from unit_scaling.models import bert
from unit_scaling.models.transformer import layer_taus
from unit_scaling.nn.positions import sinusoidal

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
