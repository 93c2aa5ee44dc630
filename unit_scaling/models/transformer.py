"""The transformer both models share: `TransformerConfig` (the frozen model config),
`TransformerLayer` (pre- or post-norm) and `TransformerStack` (unrolled or `nn.scan`,
optional `nn.remat` with a named policy).

The layer and the stack take the config itself (`cfg`): a field added to the config is
read where it is used, with no per-module copy of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.nn.attention import (ATTENTION_IMPLEMENTATIONS, SCALINGS, STORAGE_FORMATS,
                                       MultiHeadAttention)
from unit_scaling.nn.dropout import Dropout
from unit_scaling.nn.mlp import ACTIVATIONS, MLP
from unit_scaling.nn.norm import make_norm
from unit_scaling.nn.partitioning import constrain
from unit_scaling.nn.positions import POSITION_KINDS
from unit_scaling.parametrization import PARAMETRIZATIONS, Parametrization, make_parametrization
from unit_scaling.precision import Precision

NORM_POSITIONS = ("pre", "post")

REMAT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save only the tagged projection outputs (see `checkpoint_name` in the modules).
    "save_proj": jax.checkpoint_policies.save_only_these_names(
        "qkv_proj", "attn_out", "mlp_in", "mlp_gate", "mlp_out"
    ),
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shared model fields (all static; the config is hashable).

    Shapes: vocab_size, d_model, num_layers, num_heads (must divide d_model),
    mlp_dim, max_len (positions; also the u-μP attention scale length).
    Parametrization: `param` ("sp" | "unit" | "umup"), the five u-μP mults (umup
    only), `init_std` (sp), `unit_attn_temperature` (unit).
    Precision: `precision` ("fp32" | "bf16" | "fp16" | "fp8"), `real_fp8` (float8
    casts instead of simulation), `high_precision_critical` (under fp8 keep the
    attention output projection and the MLP down-projection in the compute dtype),
    `fp8_attention` (also quantise the two attention matmuls), `param_dtype`.
    Architecture: `activation` ("gelu" | "swiglu"), `norm` ("layer_norm" |
    "rms_norm"), `norm_position` ("pre" | "post"), `position` ("learned" |
    "sinusoidal" | "rope"), `use_bias`, `tie_embeddings`, `dropout`,
    `attention_dropout`.
    Inference: `kv_cache` ("none" | "bf16" | "fp8" | "int8": keys and values stored
    in that format, `unit_scaling.formats.storage`; the full forward rounds them the
    same way, so its loss is that of cached decoding) and `kv_cache_scales` ("none" |
    "per_channel": one absmax scale per token and head). Not for training (the 8-bit
    round trip has no gradient rule).
    Execution: `scan_layers` (nn.scan over layers), `remat_policy` (a key of
    `REMAT_POLICIES`), `attention_impl` ("reference" | "xla" | "cudnn": the
    attention kernel, `U.attention_core`; the fused ones run where no attention
    dropout and no `fp8_attention` is at work; "cudnn" for GPUs).
    """

    vocab_size: int = 512
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    max_len: int = 128
    param: str = "umup"
    act_mult: float = 1.0
    attn_mult: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    loss_mult: float = 1.0
    init_std: Optional[float] = 0.02
    unit_attn_temperature: str = "sqrt"
    precision: str = "fp32"
    real_fp8: bool = False
    high_precision_critical: bool = False
    fp8_attention: bool = False
    param_dtype: str = "float32"
    activation: str = "gelu"
    norm: str = "layer_norm"
    norm_position: str = "post"
    norm_epsilon: float = 1e-6
    position: str = "learned"
    use_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.1
    attention_dropout: float = 0.1
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "reference"
    kv_cache: str = "none"
    kv_cache_scales: str = "none"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_len"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model}; "
                "choose num_heads among the divisors of d_model"
            )
        if self.position == "rope" and (self.d_model // self.num_heads) % 2:
            raise ValueError("position='rope' needs an even head dim d_model/num_heads")
        choices = {
            "param": PARAMETRIZATIONS, "activation": ACTIVATIONS,
            "norm": ("layer_norm", "rms_norm"), "norm_position": NORM_POSITIONS,
            "position": POSITION_KINDS, "remat_policy": tuple(REMAT_POLICIES),
            "attention_impl": ATTENTION_IMPLEMENTATIONS,
            "kv_cache": ("none", *STORAGE_FORMATS), "kv_cache_scales": SCALINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is unknown; set {name} to one of "
                    f"{tuple(allowed)}"
                )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.kv_cache in ("none", "bf16") and self.kv_cache_scales != "none":
            raise ValueError(f"kv_cache_scales={self.kv_cache_scales!r} needs an 8-bit "
                             "kv_cache ('fp8' or 'int8')")
        self.numerics  # raises on unknown precision / param_dtype names
        self.parametrization  # raises on bad mults / names

    @property
    def parametrization(self) -> Parametrization:
        """The parametrization of the modules outside the stack (depth None)."""
        return make_parametrization(
            self.param, act_mult=self.act_mult, attn_mult=self.attn_mult,
            residual_mult=self.residual_mult, residual_attn_ratio=self.residual_attn_ratio,
            loss_mult=self.loss_mult, init_std=self.init_std,
            unit_attn_temperature=self.unit_attn_temperature,
        )

    @property
    def numerics(self) -> Precision:
        """The `Precision` of `precision`, `real_fp8`, `high_precision_critical`,
        `fp8_attention` and `param_dtype`."""
        return Precision.from_name(
            self.precision, real_fp8=self.real_fp8,
            high_precision_critical=self.high_precision_critical,
            fp8_attention=self.fp8_attention, param_dtype=self.param_dtype,
        )

    @property
    def norm_lr_mult(self) -> float:
        """u-μP lr factor of the norms on the residual stream (`Parametrization.norm_lr_mult`)."""
        return self.parametrization.norm_lr_mult(self.norm_position, self.d_model,
                                                 self.mlp_dim, self.activation)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _norm(cfg: TransformerConfig, p: Parametrization, name: str) -> nn.Module:
    """A norm on the residual stream (lr factor `cfg.norm_lr_mult`)."""
    kw = dict(use_bias=cfg.use_bias) if cfg.norm == "layer_norm" else {}
    return make_norm(cfg.norm, epsilon=cfg.norm_epsilon, lr_mult=cfg.norm_lr_mult,
                     parametrization=p, precision=cfg.numerics, name=name, **kw)


def layer_taus(cfg: TransformerConfig, layer: int, x_shape: tuple[int, ...],
               causal: bool) -> tuple[float, float]:
    """`(tau_attn, tau_mlp)` of layer `layer` on input `x_shape` `[batch, len, d]`:
    `Parametrization.residual_taus` pre-norm, `post_norm_taus` post-norm (with the
    attention's scale length: `max_len` when `causal`, else `len`)."""
    p = cfg.parametrization
    if cfg.norm_position != "post":
        return p.residual_taus(layer, cfg.num_layers)
    seq_len = cfg.max_len if causal else x_shape[1]
    return p.post_norm_taus(x_shape[-1], cfg.mlp_dim, cfg.activation, seq_len, causal)


class TransformerLayer(nn.Module):
    """One transformer layer on x `[batch, len, d]` -> `[batch, len, d]`.

    Branches: attention (index 2*layer) then MLP (2*layer+1). Each is
    `residual_add(dropout(f(residual)), skip, tau)` with `residual, skip =
    residual_split(x, tau)` (sp: `x + dropout(f(x))`), and
    - pre-norm: `f = branch(norm(x))`;
    - post-norm (BERT): `x = norm(residual_add(...))` after each branch.
    `tau` per branch from `layer_taus` (the u-μP depth rule pre-norm, standard BERT's
    branch ratios post-norm), or the `taus` argument `[2]` (a traced value, used under
    `nn.scan` where the layer index is not static). `causal` attention uses the
    u-μP attention scale of length `cfg.max_len`, so that cached decoding (`decode`)
    agrees with the full forward. `deterministic` and `decode` are fields, not call
    arguments, so that `nn.scan` and `nn.remat` see them as static. Parameters get
    `depth=cfg.num_layers`.
    """

    cfg: TransformerConfig
    causal: bool = False
    layer: int = 0
    decode: bool = False
    deterministic: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        taus: Optional[jax.Array] = None,
        mask: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
    ) -> jax.Array:
        cfg = self.cfg
        p = cfg.parametrization.in_stack(cfg.num_layers)
        ops, post = p.ops, cfg.norm_position == "post"
        if taus is None:
            tau_attn, tau_mlp = layer_taus(cfg, self.layer, x.shape, self.causal)
        else:
            tau_attn, tau_mlp = taus[0], taus[1]
        kw = dict(parametrization=p, precision=cfg.numerics, use_bias=cfg.use_bias)
        attn = MultiHeadAttention(
            cfg.num_heads, causal=self.causal, rope=cfg.position == "rope",
            max_len=cfg.max_len, scale_seq_len_from_max_len=self.causal,
            dropout_rate=cfg.attention_dropout, decode=self.decode,
            attention_impl=cfg.attention_impl, kv_cache=cfg.kv_cache,
            kv_cache_scales=cfg.kv_cache_scales, name="attention", **kw)
        mlp = MLP(cfg.mlp_dim, activation=cfg.activation, name="mlp", **kw)

        def attn_fn(h):
            return attn(h, mask=mask, segment_ids=segment_ids, positions=positions,
                        deterministic=self.deterministic)

        x = x.astype(cfg.numerics.dtype)
        for i, (fn, tau) in enumerate(((attn_fn, tau_attn), (mlp, tau_mlp))):
            norm = _norm(cfg, p, f"norm_{i}")
            residual, skip = ops.residual_split(x, tau)
            if not post:
                residual = norm(residual)
            y = fn(residual)
            y = Dropout(cfg.dropout, parametrization=p)(y, self.deterministic)
            x = ops.residual_add(y, skip, tau)
            if post:
                x = norm(x)
            x = constrain(x, ("batch", "length", "embed"))
        return x


class TransformerStack(nn.Module):
    """`cfg.num_layers` `TransformerLayer`s on x `[batch, len, d]`, plus a final norm
    for pre-norm models; `deterministic` is a call argument.

    Layout: unrolled layers are `layer_0 ... layer_{n-1}`; with `cfg.scan_layers` one
    `layers` subtree whose leaves have a leading `[num_layers]` axis (logical name
    "layers"). `cfg.remat_policy` (a key of `REMAT_POLICIES`) wraps each layer in
    `nn.remat`; explicit names keep the param tree the same with and without remat.
    Under scan the per-layer residual taus are a scanned input (they depend on the
    layer index).
    """

    cfg: TransformerConfig
    causal: bool = False
    decode: bool = False

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
        cfg = self.cfg
        layer_cls = TransformerLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(
                TransformerLayer, policy=REMAT_POLICIES[cfg.remat_policy],
                prevent_cse=not cfg.scan_layers,
            )
        kw = dict(causal=self.causal, decode=self.decode, deterministic=deterministic)
        n = cfg.num_layers
        if cfg.scan_layers:
            taus = np.array([layer_taus(cfg, i, x.shape, self.causal) for i in range(n)],
                            np.float32)
            scanned = nn.scan(
                _ScanAdapter,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=n,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(layer_cls=layer_cls, cfg=cfg, layer_kwargs=tuple(kw.items()),
                           name="layers")(x, jnp.asarray(taus), mask, segment_ids, positions)
        else:
            for i in range(n):
                x = layer_cls(cfg, layer=i, name=f"layer_{i}", **kw)(
                    x, None, mask, segment_ids, positions)
        if cfg.norm_position == "pre":
            x = _norm(cfg, cfg.parametrization, "final_norm")(x)
        return x


class _ScanAdapter(nn.Module):
    """The scanned body: `(carry x, taus[2], mask, segment_ids, positions) -> (x, None)`.

    The inner layer is named "layer" so the scanned subtree is `layers/layer/...`.
    """

    layer_cls: Any
    cfg: TransformerConfig
    layer_kwargs: tuple

    @nn.compact
    def __call__(self, x, taus, mask, segment_ids, positions):
        layer = self.layer_cls(self.cfg, name="layer", **dict(self.layer_kwargs))
        return layer(x, taus, mask, segment_ids, positions), None
