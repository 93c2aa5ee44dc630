"""`TransformerConfig`: the fields BERT and the causal LM share, validated on
construction, and what they resolve to (parametrization, precision, stack)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from unit_scaling import nn as unn
from unit_scaling.nn.mlp import ACTIVATIONS
from unit_scaling.nn.positions import POSITION_KINDS
from unit_scaling.nn.transformer import NORM_POSITIONS, REMAT_POLICIES
from unit_scaling.parametrization import PARAMETRIZATIONS, Parametrization, make_parametrization
from unit_scaling.precision import Precision


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
    Execution: `scan_layers` (nn.scan over layers), `remat_policy` (a key of
    `unit_scaling.nn.REMAT_POLICIES`).
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
            "param": PARAMETRIZATIONS, "activation": ACTIVATIONS, "norm": ("layer_norm", "rms_norm"),
            "norm_position": NORM_POSITIONS, "position": POSITION_KINDS,
            "remat_policy": tuple(REMAT_POLICIES),
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
        self.numerics  # raises on unknown precision / param_dtype names
        self.parametrization  # raises on bad mults / names

    @property
    def parametrization(self) -> Parametrization:
        return make_parametrization(
            self.param, act_mult=self.act_mult, attn_mult=self.attn_mult,
            residual_mult=self.residual_mult, residual_attn_ratio=self.residual_attn_ratio,
            loss_mult=self.loss_mult, init_std=self.init_std,
            unit_attn_temperature=self.unit_attn_temperature,
        )

    @property
    def norm_lr_mult(self) -> float:
        """u-μP lr factor of the norms outside the stack (`Parametrization.norm_lr_mult`)."""
        return self.parametrization.norm_lr_mult(self.norm_position, self.d_model,
                                                 self.mlp_dim, self.activation)

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
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def module_kwargs(self) -> dict[str, Any]:
        """`parametrization` and `precision` for any `unit_scaling.nn` module."""
        return dict(parametrization=self.parametrization, precision=self.numerics)

    def stack(self, *, causal: bool, decode: bool = False, name: str = "stack"):
        """The `TransformerStack` this config describes."""
        return unn.TransformerStack(
            num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            final_norm=self.norm_position == "pre", scan_layers=self.scan_layers,
            remat_policy=self.remat_policy, activation=self.activation, norm=self.norm,
            norm_position=self.norm_position, norm_epsilon=self.norm_epsilon,
            use_bias=self.use_bias, causal=causal, rope=self.position == "rope",
            max_len=self.max_len, scale_seq_len_from_max_len=causal,
            dropout_rate=self.dropout, attention_dropout_rate=self.attention_dropout,
            decode=decode, name=name, **self.module_kwargs(),
        )


def make_config(cls: type, presets: dict[str, dict[str, Any]], preset: str, **overrides: Any):
    """`cls(**presets[preset], **overrides)`, with ValueErrors naming an unknown preset
    or field (e.g. from a config file's override)."""
    if preset not in presets:
        raise ValueError(f"preset={preset!r} is unknown; use one of {sorted(presets)}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} field(s) {unknown}; valid fields: {sorted(fields)}"
        )
    return cls(**{**presets[preset], **overrides})
