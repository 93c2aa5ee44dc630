"""Parametrizations `sp`, `unit` and `umup`: one object that every module reads.

A `Parametrization` decides, for the same model code:

| | `sp` (standard) | `unit` (unit scaling) | `umup` (u-μP) |
|---|---|---|---|
| weight init | N(0, init_std^2), init_std 0.02 (None: fan_in^-1/2) | N(0, 1) | N(0, 1) |
| ops | plain jnp / jax.nn | `unit_scaling.functional` | `functional` with the mults |
| attention temperature | 1/sqrt(d_head) | 1/sqrt(d_head) ("sqrt") or 1/d_head ("linear") | attn_mult/d_head |
| residual | x + f(x) | residual_split/add, taus of the u-μP rule with mults 1 | the same with `residual_mult`, `residual_attn_ratio` |
| readout | linear | linear_readout | linear_readout |
| lr factor per tensor | 1 | 1 | `unit_scaling.optim` (from the roles below) |

The five u-μP mults (`act_mult`, `attn_mult`, `residual_mult`, `residual_attn_ratio`,
`loss_mult`) are hyperparameters of `umup` only; giving them to `sp` or `unit` is an
error, so a sweep cannot silently ignore them.

Every parameter is created boxed in a `ScaledParam` (an `nn.LogicallyPartitioned` with
three more static fields): its logical axis names, its u-μP **role** (`weight`, `bias`,
`norm`, `output`, `embedding`), its **depth** (the number of transformer layers for
a parameter inside the layer stack, else None) and its u-μP **fan_in**. The boxes survive `nn.scan` (which adds
the `layers` axis) and `jax.eval_shape`, so `unit_scaling.optim` needs nothing but the
(possibly abstract) params to build the per-tensor learning rates.

Precision is a separate config choice (`resolve_precision`): compute dtype plus an
optional `formats.FormatPolicy` that every matmul of every parametrization takes.
"""

from __future__ import annotations

from unit_scaling._extras import require

require("flax", "unit_scaling.parametrization", "flax")

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from unit_scaling import formats as formats_lib
from unit_scaling import functional as U
from unit_scaling.scale import apply_constraint, scale_bwd, scale_fwd

Array = jax.Array
FormatPolicy = Optional[formats_lib.FormatPolicy]

PARAMETRIZATIONS = ("sp", "unit", "umup")
ROLES = ("weight", "bias", "norm", "output", "embedding")
# The init std of the standard BERT whose post-norm branch ratios unit/umup reproduce
# (`Parametrization.post_norm_taus`).
POST_NORM_REFERENCE_STD = 0.02
# umup only: the width at which those ratios are taken (tiny BERT's), so that they do
# not change with width as μP requires.
POST_NORM_REFERENCE_WIDTH = 128
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")

# ------------------------------------------------------------------------- precision


def resolve_precision(
    name: str, real_fp8: bool = False
) -> tuple[jnp.dtype, FormatPolicy]:
    """Maps a precision name to `(compute dtype, matmul FormatPolicy or None)`.

    - "fp32": float32, no quantisation.
    - "bf16": bfloat16 compute.
    - "fp16": float16 compute (unit scaling keeps values in range without a loss scale).
    - "fp8": bfloat16 compute and `formats.FP8` (E4M3 forward operands, E5M2 output
      gradients) on the linear layers; simulated unless `real_fp8` (float8 casts that
      XLA lowers to FP8 GEMMs on H100).
    Parameters stay in their own `param_dtype` (float32 by default) in every case.
    """
    if name == "fp32":
        return jnp.float32, None
    if name == "bf16":
        return jnp.bfloat16, None
    if name == "fp16":
        return jnp.float16, None
    if name == "fp8":
        policy = dataclasses.replace(formats_lib.FP8, real=bool(real_fp8))
        return jnp.bfloat16, policy
    raise ValueError(
        f"precision={name!r} is unknown; set precision to one of {PRECISIONS}"
    )


# ---------------------------------------------------------------- parameter metadata


class ScaledParam(nn.LogicallyPartitioned):
    """A parameter box: logical axis names (`names`) plus the u-μP `role` and `depth`.

    `role`: "weight" (hidden matmul kernels), "bias", "norm" (norm gains), "output"
    (readout kernels) or "embedding" (lookup tables; their u-μP "fan_in" is d_model).
    `depth`: number of transformer layers for a parameter inside the layer stack, None
    outside it. `fan_in`: the u-μP fan-in (set by the module that knows which dims
    are inputs, e.g. d_model for a fused `[d, heads, 3, head_dim]` QKV kernel); None
    means the default rule of `fan_in()`. `lr_mult`: a further u-μP lr factor set by
    the module that knows why (post-norm layers give their norms `tau_mlp`, see
    `post_norm_norm_lr`). All are static (not pytree leaves), so they survive `jax.eval_shape`,
    `nn.scan`'s `add_axis` (which prepends the `layers` name) and tree maps over boxes.
    """

    role: str = struct.field(default="weight", pytree_node=False)
    depth: Optional[int] = struct.field(default=None, pytree_node=False)
    fan_in: Optional[int] = struct.field(default=None, pytree_node=False)
    lr_mult: float = struct.field(default=1.0, pytree_node=False)


def param_meta(params: Any) -> list[tuple[str, ScaledParam]]:
    """Flattens boxed (or abstract) params into `[(path, ScaledParam), ...]`.

    Raises ValueError when a leaf is not a `ScaledParam` (a parameter created without
    a role), naming its path.
    """
    out = []
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    for path, leaf in leaves:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if not isinstance(leaf, ScaledParam):
            raise ValueError(
                f"parameter {name!r} has no u-μP role: create every parameter with "
                "unit_scaling.nn's modules (or wrap it in parametrization.ScaledParam), "
                "and pass the *boxed* params (before nn.unbox)"
            )
        out.append((name, leaf))
    return out


def fan_in(meta: ScaledParam) -> int:
    """The u-μP fan_in of a parameter: the input dims of a kernel (all but the last,
    after dropping the scan `layers` axis), d_model for an embedding table `[V, d]`, the
    size of a vector. `meta.fan_in` overrides the rule."""
    if meta.fan_in is not None:
        return int(meta.fan_in)
    shape = tuple(meta.value.shape)
    names = tuple(meta.names)
    # Drop stacked (scanned) axes: the fan-in is that of one layer's tensor.
    shape = tuple(s for s, n in zip(shape, names) if n != "layers")
    if meta.role == "embedding":
        return int(shape[-1])
    if len(shape) == 1:
        return int(shape[0])
    return int(math.prod(shape[:-1]))


# --------------------------------------------------------------------- tanh constants


def _gauss_moment(f: Callable[[np.ndarray], np.ndarray]) -> float:
    """`E[f(x)]` for x ~ N(0, 1), by 80-point Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float(np.sum(w * f(x)) / np.sqrt(2 * np.pi))


# E[tanh(x)^2] = 0.3943 and E[tanh'(x)^2] = E[(1-tanh(x)^2)^2] = 0.4644 for x ~ N(0,1).
_TANH_OUT_SCALE = _gauss_moment(lambda x: np.tanh(x) ** 2) ** -0.5
_TANH_GRAD_SCALE = _gauss_moment(lambda x: (1 - np.tanh(x) ** 2) ** 2) ** -0.5


# ------------------------------------------------------------------ parametrization


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """How weights are initialised and which ops the modules run (see module doc).

    Fields:
      name: "sp", "unit" or "umup".
      act_mult, attn_mult, residual_mult, residual_attn_ratio, loss_mult: the u-μP
        multipliers (umup only; 1 elsewhere).
      init_std: sp weight/embedding init std (None: fan_in^-1/2 for kernels, 1 for
        embeddings). Ignored by unit/umup (always N(0,1)).
      unit_attn_temperature: unit only: "sqrt" (1/sqrt(d_head)) or "linear" (1/d_head).
    """

    name: str = "umup"
    act_mult: float = 1.0
    attn_mult: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    loss_mult: float = 1.0
    init_std: Optional[float] = 0.02
    unit_attn_temperature: str = "sqrt"

    def __post_init__(self) -> None:
        if self.name not in PARAMETRIZATIONS:
            raise ValueError(
                f"param={self.name!r} is unknown; set param to one of {PARAMETRIZATIONS}"
            )
        mults = {
            k: getattr(self, k)
            for k in ("act_mult", "attn_mult", "residual_mult", "residual_attn_ratio",
                      "loss_mult")
        }
        for k, v in mults.items():
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{k} must be a positive number, got {v!r}")
        if self.name != "umup" and any(v != 1.0 for v in mults.values()):
            raise ValueError(
                f"the u-μP mults {mults} only apply to param='umup'; with "
                f"param={self.name!r} leave them at 1 (or set param='umup')"
            )
        if self.unit_attn_temperature not in ("sqrt", "linear"):
            raise ValueError(
                "unit_attn_temperature must be 'sqrt' (1/sqrt(d_head)) or 'linear' "
                f"(1/d_head), got {self.unit_attn_temperature!r}"
            )
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"init_std must be positive or None, got {self.init_std}")

    @property
    def unit_scaled(self) -> bool:
        """True for `unit` and `umup` (ops from `unit_scaling.functional`)."""
        return self.name != "sp"

    # ------------------------------------------------------------------ initialisers

    def kernel_init(self, fan_in: int) -> Callable[..., Array]:
        """Kernel initialiser: N(0,1) (unit/umup), N(0, init_std^2) or N(0, 1/fan_in) (sp)."""
        if self.unit_scaled:
            std = 1.0
        else:
            std = self.init_std if self.init_std is not None else fan_in**-0.5
        return nn.initializers.normal(stddev=std)

    def embedding_init(self) -> Callable[..., Array]:
        """Embedding-table initialiser: N(0,1) (unit/umup; sp with init_std None) or
        N(0, init_std^2) (sp)."""
        std = 1.0 if (self.unit_scaled or self.init_std is None) else self.init_std
        return nn.initializers.normal(stddev=std)

    # -------------------------------------------------------------------------- ops

    def linear(
        self,
        x: Array,
        kernel: Array,
        bias: Optional[Array] = None,
        formats: FormatPolicy = None,
        constraint: Optional[str] = "to_output_scale",
    ) -> Array:
        """Dense layer, x `[..., fan_in]` @ kernel `[fan_in, fan_out]` (+ bias).

        sp: plain; unit/umup: `U.linear` (forward fan_in^-1/2, input gradient fan_out^-1/2
        under `constraint`, weight gradient batch^-1/2).
        """
        if self.unit_scaled:
            return U.linear(x, kernel, bias, constraint=constraint, formats=formats)
        y = formats_lib.matmul(x, kernel, formats)
        return y if bias is None else y + _lead(bias.astype(y.dtype), y.ndim)

    def readout(
        self, x: Array, kernel: Array, bias: Optional[Array] = None,
        formats: FormatPolicy = None, tied: bool = False,
    ) -> Array:
        """Final projection to logits. sp: plain. umup, and unit's untied readouts:
        `U.linear_readout` (forward fan_in^-1, logits RMS fan_in^-1/2 at init: the μP
        readout). unit's readout `tied` to the embedding table: `U.linear` without a
        constraint (forward fan_in^-1/2, logits RMS 1 at init), as in the unit-scaling
        library of 2023.

        Why unit's tied readout differs: unit has no per-tensor lr rules, so Adam moves
        the table by about lr per element and the logits by about `scale * lr * d`
        (aligned updates): lr through a fan_in^-1 readout, 11x less than through
        fan_in^-1/2 at d = 128, which left unit tiny BERT at the unigram stage. u-μP
        keeps its μP readout tied or not: the norm before its readout (lr factor 1)
        sets the logits' scale quickly, and with fan_in^-1/2 u-μP BERT learned less
        (docs/results.md, "BERT's own architecture").
        """
        if self.name == "unit" and tied:
            return U.linear(x, kernel, bias, constraint=None, formats=formats)
        if self.unit_scaled:
            return U.linear_readout(x, kernel, bias, formats=formats)
        return self.linear(x, kernel, bias, formats)

    def gather_positions(self, x: Array, positions: Array) -> Array:
        """`x[b, positions[b, p]]`: `[B, L, ...]`, `[B, P]` -> `[B, P, ...]`.
        unit/umup: `U.gather_positions` (backward scale `(L/P)^1/2`); sp: plain."""
        if self.unit_scaled:
            return U.gather_positions(x, positions)
        index = positions.astype(jnp.int32).reshape(positions.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, index, axis=1)

    def embed(self, ids: Array, table: Array) -> Array:
        """Lookup `table[ids]`; unit/umup scale the table gradient by (V/ids.size)^1/2."""
        if self.unit_scaled:
            return U.embedding(ids, table)
        return jnp.take(table, ids, axis=0)

    def sum_embeddings(self, *xs: Array) -> Array:
        """Sum of n embeddings (token, segment, position), each `[..., d]`.

        unit/umup: forward `* n^-1/2`, gradient passed through unchanged. Derivation:
        for n independent unit-RMS terms the sum has RMS n^1/2, so the forward scale is
        n^-1/2. Each term comes from its own table (a cut-edge), so its gradient may be
        scaled independently of the forward: the unscaled output gradient (unit RMS)
        is already the unit-scaled gradient of every term.
        """
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        if self.unit_scaled and len(xs) > 1:
            out = scale_fwd(out, len(xs) ** -0.5)
        return out

    def gelu(self, x: Array) -> Array:
        """GELU (exact). unit/umup: `U.gelu(x, mult=act_mult)`."""
        if self.unit_scaled:
            return U.gelu(x, mult=self.act_mult)
        return jax.nn.gelu(x, approximate=False)

    def silu_glu(self, x: Array, gate: Array) -> Array:
        """SwiGLU `x * silu(gate)`. unit/umup: `U.silu_glu(x, gate, mult=act_mult)`."""
        if self.unit_scaled:
            return U.silu_glu(x, gate, mult=self.act_mult)
        return x * jax.nn.silu(gate)

    def tanh(self, x: Array) -> Array:
        """tanh (BERT pooler). unit/umup: scaled to unit RMS.

        Derivation (x ~ N(0,1), Gauss-Hermite quadrature): E[tanh(x)^2] = 0.3943, so the
        output scale is 0.3943^-1/2 = 1.593; E[tanh'(x)^2] = 0.4644, so the input-gradient
        scale is 0.4644^-1/2 = 1.467. One scale for both (`to_output_scale`, as
        `U.gelu`) keeps the gradient proportional to the true gradient of the loss.
        """
        if not self.unit_scaled:
            return jnp.tanh(x)
        out_scale, grad_scale = apply_constraint(
            "to_output_scale", _TANH_OUT_SCALE, _TANH_GRAD_SCALE
        )
        return scale_fwd(jnp.tanh(scale_bwd(x, grad_scale)), out_scale)

    def dropout(
        self, x: Array, rate: float, key: Optional[Array], deterministic: bool
    ) -> Array:
        """Dropout. unit/umup: `U.dropout` (RMS-preserving); sp: inverted dropout."""
        if rate == 0.0:
            return x
        if self.unit_scaled:
            return U.dropout(x, rate, key, deterministic)
        if deterministic:
            return x
        keep = jax.random.bernoulli(key, 1 - rate, x.shape)
        return jnp.where(keep, x / (1 - rate), jnp.zeros_like(x))

    def attention_mult(self, head_dim: int) -> float:
        """`mult` such that the logits temperature is `mult / head_dim`."""
        if self.name == "umup":
            return self.attn_mult
        if self.name == "unit" and self.unit_attn_temperature == "linear":
            return 1.0
        return head_dim**0.5  # 1/sqrt(d_head)

    def attention(
        self,
        query: Array,
        key: Array,
        value: Array,
        *,
        mask: Optional[Array] = None,
        causal: bool = False,
        segment_ids: Optional[Array] = None,
        dropout_rate: float = 0.0,
        dropout_key: Optional[Array] = None,
        deterministic: bool = True,
        scale_seq_len: Optional[int] = None,
        formats: FormatPolicy = None,
    ) -> Array:
        """Multi-head attention on `[batch, len, heads, head_dim]` tensors.

        unit/umup: `U.scaled_dot_product_attention` with `mult = attention_mult(d)`
        (output and gradients scaled to unit RMS; `scale_seq_len` fixes the scale
        for KV-cache decoding). sp: `softmax(q k^T / sqrt(d)) v`, logits and softmax
        in float32. Masks as `U.attention_mask`.
        """
        head_dim = query.shape[-1]
        mult = self.attention_mult(head_dim)
        if self.unit_scaled:
            return U.scaled_dot_product_attention(
                query, key, value, mask=mask, causal=causal, segment_ids=segment_ids,
                dropout_rate=dropout_rate, dropout_key=dropout_key,
                deterministic=deterministic, mult=mult, scale_seq_len=scale_seq_len,
                formats=formats,
            )
        q_len, k_len = query.shape[1], key.shape[1]
        q = jnp.swapaxes(query, 1, 2)
        k = jnp.transpose(key, (0, 2, 3, 1))
        logits = formats_lib.matmul(q, k, formats).astype(jnp.float32) * (mult / head_dim)
        full_mask = U.attention_mask(q_len, k_len, causal, mask, segment_ids)
        if full_mask is not None:
            logits = jnp.where(full_mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        if dropout_rate > 0.0 and not deterministic:
            keep = jax.random.bernoulli(dropout_key, 1 - dropout_rate, probs.shape)
            probs = jnp.where(keep, probs / (1 - dropout_rate), 0.0)
        out = formats_lib.matmul(probs.astype(value.dtype), jnp.swapaxes(value, 1, 2), formats)
        return jnp.swapaxes(out, 1, 2)

    def layer_norm(
        self, x: Array, weight: Optional[Array], bias: Optional[Array], eps: float
    ) -> Array:
        """LayerNorm over the last axis, statistics in float32; output in x's dtype.
        unit/umup: `U.layer_norm` (gain/bias gradients scaled batch^-1/2)."""
        if self.unit_scaled:
            return U.layer_norm(x, weight, bias, eps)
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
        if self.unit_scaled:
            return U.rms_norm(x, weight, eps)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
        if weight is not None:
            y = y * _lead(weight.astype(jnp.float32), y.ndim)
        return y.astype(x.dtype)

    # ------------------------------------------------------------------- residuals

    def residual_taus(self, layer: int, num_layers: int) -> tuple[float, float]:
        """Pre-norm `(tau_attn, tau_mlp)` of transformer layer `layer` of `num_layers`.

        The u-μP rule `U.transformer_residual_scaling_rule(residual_mult,
        residual_attn_ratio)` over the `2*num_layers` branches (for `unit` the mults
        are 1: every branch contributes equally and all of them as much as the
        embedding). Post-norm layers use `post_norm_taus`.
        """
        rule = U.transformer_residual_scaling_rule(self.residual_mult, self.residual_attn_ratio)
        return rule(2 * layer, 2 * num_layers), rule(2 * layer + 1, 2 * num_layers)

    def post_norm_taus(
        self, d_model: int, mlp_dim: int, activation: str, seq_len: int, causal: bool = False
    ) -> tuple[float, float]:
        """Post-norm `(tau_attn, tau_mlp)`: the branch:skip ratios of standard BERT at init.

        A post-norm layer computes `norm(skip + tau * branch)` (unit scaling's
        `residual_add` only adds the factor `(1+tau^2)^-1/2`, which the norm removes),
        so tau is exactly the branch:skip ratio, and no later op renormalises it.
        Standard BERT starts with small branches: its kernels are N(0, s^2),
        s = `POST_NORM_REFERENCE_STD` = 0.02, so each dense layer is `s fan_in^1/2`
        times a unit-scaled one, and for unit-RMS inputs
        - attention `W_o attn(x W_v)` has RMS `(s d^1/2)^2 f`, where `f = S^-1/2`
          (`(ln S / S)^1/2` causal) is the RMS of flat attention over S positions of
          independent values: BERT's logits have RMS about `s^2 d = 0.05` at init;
        - the GELU MLP `W_2 gelu(W_1 x)` has RMS `s^2 (d d_ff)^1/2 / 2`, because
          `gelu(z) ~ z/2` at BERT's small pre-activations (RMS `s d^1/2`); SwiGLU's
          `x silu(g) ~ x g / 2` makes it `s^3 d d_ff^1/2 / 2`;
        while the unit-scaled branches have RMS 1. Hence
        `tau_attn = alpha_attn s^2 d f` and `tau_mlp = alpha_mlp s^2 (d d_ff)^1/2 / 2`
        (GELU). tiny BERT (d 128, d_ff 512, S 64): 0.0064 and 0.051. `unit` takes d and
        d_ff from the model, so its taus grow with width as standard BERT's do (base:
        0.027 and 0.31); `umup` takes them at `POST_NORM_REFERENCE_WIDTH` = 128 (with
        the model's d_ff/d), so they do not depend on width, as μP requires: with
        the model's own widths u-μP's best lr fell by an octave per doubling of width. The small attention
        tau also damps what the unit-scaled attention does to a component shared by
        all positions (segment embeddings, norm biases): plain attention passes it
        unchanged, the unit-scaled one multiplies it by its output scale (about
        `S^1/2`). The u-μP mults keep their meaning through
        `alpha_mlp = residual_mult (2/(1+r^2))^1/2` and `alpha_attn = r alpha_mlp`
        (r = `residual_attn_ratio`): all branches against the skip, and attention
        against MLP. With tau = 1 unit-scaled post-norm BERT never left the unigram
        stage (docs/results.md, "BERT's own architecture").
        """
        alpha_attn, alpha_mlp = self._branch_alphas()
        d_model, mlp_dim = self._post_norm_shape(d_model, mlp_dim)
        s = POST_NORM_REFERENCE_STD
        flat = ((math.log(seq_len) if causal else 1.0) / seq_len) ** 0.5
        return alpha_attn * s**2 * d_model * flat, self._post_norm_tau_mlp(d_model, mlp_dim, activation)

    def _branch_alphas(self) -> tuple[float, float]:
        """`(alpha_attn, alpha_mlp)` of the u-μP mults (`transformer_residual_scaling_rule`)."""
        alpha_mlp = self.residual_mult * (2 / (1 + self.residual_attn_ratio**2)) ** 0.5
        return self.residual_attn_ratio * alpha_mlp, alpha_mlp

    def _post_norm_shape(self, d_model: int, mlp_dim: int) -> tuple[int, int]:
        """The widths the post-norm taus are computed at: the model's own (sp, unit),
        or under umup `POST_NORM_REFERENCE_WIDTH` with the model's d_ff/d, so that
        u-μP's taus do not depend on width (with the model's widths u-μP's best lr fell
        an octave per doubling of width: docs/results.md)."""
        if self.name != "umup":
            return d_model, mlp_dim
        return POST_NORM_REFERENCE_WIDTH, mlp_dim * POST_NORM_REFERENCE_WIDTH // d_model

    def _post_norm_tau_mlp(self, d_model: int, mlp_dim: int, activation: str) -> float:
        d_model, mlp_dim = self._post_norm_shape(d_model, mlp_dim)
        s = POST_NORM_REFERENCE_STD
        mlp = s**2 * (d_model * mlp_dim) ** 0.5 / 2
        if activation == "swiglu":
            mlp *= s * d_model**0.5
        return self._branch_alphas()[1] * mlp

    def norm_lr_mult(self, norm_position: str, d_model: int, mlp_dim: int,
                     activation: str) -> float:
        """The u-μP lr factor of the gains and biases of the norms on the residual
        stream (`ScaledParam.lr_mult`): 1 pre-norm; post-norm, the MLP branch weight
        `tau_mlp` of `post_norm_taus`. A norm off the stream (BERT's MLM head) keeps 1.

        Why: u-μP's lr factor 1 for norms was set on pre-norm models, where a norm
        feeds one branch, whose effect on the residual stream the branch weight tau
        then damps. A post-norm norm *is* the stream: every layer's output is its
        output, so the same update moves the stream about 1/tau times more. Scaling
        its lr by tau_mlp (the larger branch weight) gives it the effect it has
        pre-norm. Measured on u-μP tiny BERT (tau_mlp 0.051), eval MLM accuracy at 300
        steps: 10.1% with factor 1, 13.9% with tau_mlp (SP 11.4%; docs/results.md,
        "BERT's own architecture").
        """
        if norm_position != "post":
            return 1.0
        return self._post_norm_tau_mlp(d_model, mlp_dim, activation)

    def residual_split(self, x: Array, tau: float | Array) -> tuple[Array, Array]:
        """`(branch input, skip)`; unit/umup: `U.residual_split(x, tau)`.

        `tau` may be a traced scalar (layers under `nn.scan` get their tau as a scanned
        input); then the same scales are applied by `_dyn_scale` (a custom_vjp whose
        scale is an array argument with zero cotangent).
        """
        if not self.unit_scaled:
            return x, x
        if isinstance(tau, (int, float)):
            return U.residual_split(x, tau)
        denom = jnp.sqrt(1 + tau**2)
        return _dyn_scale(x, 1.0, tau / denom), _dyn_scale(x, 1.0, 1 / denom)

    def residual_add(self, branch: Array, skip: Array, tau: float | Array) -> Array:
        """sp: `skip + branch`; unit/umup: `U.residual_add(branch, skip, tau)` (a traced
        `tau` as in `residual_split`)."""
        if not self.unit_scaled:
            return skip + branch
        if isinstance(tau, (int, float)):
            return U.residual_add(branch, skip, tau)
        denom = jnp.sqrt(1 + tau**2)
        return _dyn_scale(branch, tau / denom, 1.0) + _dyn_scale(skip, 1 / denom, 1.0)

    # ------------------------------------------------------------------------- loss

    def cross_entropy(
        self, logits: Array, labels: Array, weights: Optional[Array] = None
    ) -> Array:
        """Weighted-mean softmax cross entropy, float32; logits `[..., V]`, labels `[...]`.

        unit/umup: `U.cross_entropy(mult=loss_mult)` (forward: the weighted mean;
        backward: the unit-scaled gradient of the weighted *sum*). sp: the plain mean.
        """
        if self.unit_scaled:
            return U.cross_entropy(logits, labels, mult=self.loss_mult, weights=weights)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
        if weights is None:
            return jnp.mean(nll)
        weights = weights.astype(jnp.float32)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_parametrization(name: str, **kwargs: Any) -> Parametrization:
    """`Parametrization(name, **kwargs)`; ValueError for an unknown name or field."""
    fields = {f.name for f in dataclasses.fields(Parametrization)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"unknown parametrization field(s) {unknown}; valid fields: {sorted(fields)}"
        )
    return Parametrization(name=name, **kwargs)


def _lead(x: Array, ndim: int) -> Array:
    """Explicit leading unit axes (the test suite runs with rank promotion 'raise')."""
    return x.reshape((1,) * (ndim - x.ndim) + x.shape)


@jax.custom_vjp
def _dyn_scale(x: Array, fwd: Array | float, bwd: Array | float) -> Array:
    """`scale_fwd`/`scale_bwd` with (possibly traced) scalar scales: forward `fwd * x`,
    gradient `bwd * g`, in x's dtype; the scales get zero cotangents."""
    return (x * fwd).astype(x.dtype)


def _dyn_scale_fwd(x, fwd, bwd):
    return _dyn_scale(x, fwd, bwd), (fwd, bwd)


def _dyn_scale_bwd(res, g):
    fwd, bwd = res
    return (g * bwd).astype(g.dtype), jnp.zeros_like(fwd), jnp.zeros_like(bwd)


_dyn_scale.defvjp(_dyn_scale_fwd, _dyn_scale_bwd)
