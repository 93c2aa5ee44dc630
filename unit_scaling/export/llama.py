"""`LlamaForCausalLM` checkpoints: the causal LM's folding rules, next to each tensor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from unit_scaling.export.folding import (
    _CLS_ID, _PAD_ID, _SEP_ID, Checkpoint, _Scales, _layers, _np, _qkv, _t, check_exportable)
from unit_scaling.models import causal_lm
from unit_scaling.models.transformer import layer_taus
from unit_scaling.nn.attention import MultiHeadAttention

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
