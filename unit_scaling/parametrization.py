"""Parametrizations `sp`, `unit` and `umup`: the rules every module reads.

A `Parametrization` decides, for the same model code:

| | `sp` (standard) | `unit` (unit scaling) | `umup` (u-μP) |
|---|---|---|---|
| weight init | N(0, init_std^2), init_std 0.02 (None: fan_in^-1/2) | N(0, 1) | N(0, 1) |
| ops (`ops`) | `StandardOps`: plain jnp / jax.nn | `UnitScaledOps`: `unit_scaling.functional` | `UnitScaledOps` with the mults |
| attention temperature | 1/sqrt(d_head) | 1/sqrt(d_head) ("sqrt") or 1/d_head ("linear") | attn_mult/d_head |
| residual taus | (unused: x + f(x)) | the u-μP rule with mults 1 | the u-μP rule with `residual_mult`, `residual_attn_ratio` |
| readout | linear | linear_readout | linear_readout |
| lr factor per tensor | 1 | 1 | `unit_scaling.optim` (from the parameters' roles) |

The five u-μP mults (`act_mult`, `attn_mult`, `residual_mult`, `residual_attn_ratio`,
`loss_mult`) are hyperparameters of `umup` only; giving them to `sp` or `unit` is an
error, so a sweep cannot silently ignore them.

The ops themselves live in `unit_scaling.ops`, the parameter boxes (role, depth, fan_in)
in `unit_scaling.params`, the compute dtype and FP8 formats in `unit_scaling.precision`.
"""

from __future__ import annotations

from unit_scaling._extras import require

require("flax", "unit_scaling.parametrization", "flax")

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax

from unit_scaling import functional as U
from unit_scaling.ops import StandardOps, UnitScaledOps

PARAMETRIZATIONS = ("sp", "unit", "umup")
# The init std of the standard BERT whose post-norm branch ratios unit/umup reproduce
# (`Parametrization.post_norm_taus`).
POST_NORM_REFERENCE_STD = 0.02
# umup only: the width at which those ratios are taken (tiny BERT's), so that they do
# not change with width as μP requires.
POST_NORM_REFERENCE_WIDTH = 128


@dataclasses.dataclass(frozen=True)
class Parametrization:
    """How weights are initialised, which ops the modules run (`ops`), the residual
    branch weights and the lr factors of norms (see module doc).

    Fields:
      name: "sp", "unit" or "umup".
      act_mult, attn_mult, residual_mult, residual_attn_ratio, loss_mult: the u-μP
        multipliers (umup only; 1 elsewhere).
      init_std: sp weight/embedding init std (None: fan_in^-1/2 for kernels, 1 for
        embeddings). Ignored by unit/umup (always N(0,1)).
      unit_attn_temperature: unit only: "sqrt" (1/sqrt(d_head)) or "linear" (1/d_head).
      depth: the number of transformer layers of the stack the modules built with it
        sit in (their parameters' `ScaledParam.depth`, u-μP's depth^-1/2 lr rule);
        None outside a stack. `in_stack(n)` sets it.
    """

    name: str = "umup"
    act_mult: float = 1.0
    attn_mult: float = 1.0
    residual_mult: float = 1.0
    residual_attn_ratio: float = 1.0
    loss_mult: float = 1.0
    init_std: Optional[float] = 0.02
    unit_attn_temperature: str = "sqrt"
    depth: Optional[int] = None

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
        if self.depth is not None and not (isinstance(self.depth, int) and self.depth > 0):
            raise ValueError(f"depth must be a positive int or None, got {self.depth!r}")

    @property
    def unit_scaled(self) -> bool:
        """True for `unit` and `umup` (ops from `unit_scaling.functional`)."""
        return self.name != "sp"

    @property
    def ops(self) -> StandardOps:
        """The ops the modules run: `StandardOps` (sp) or `UnitScaledOps` (unit, umup;
        for unit the mults are 1, the tied readout is not μP's, and the attention
        temperature follows `unit_attn_temperature`)."""
        if self.name == "sp":
            return StandardOps()
        if self.name == "unit":
            linear = self.unit_attn_temperature == "linear"
            return UnitScaledOps(attn_mult=1.0 if linear else None, mup_tied_readout=False)
        return UnitScaledOps(act_mult=self.act_mult, attn_mult=self.attn_mult,
                             loss_mult=self.loss_mult)

    def in_stack(self, num_layers: int) -> "Parametrization":
        """This parametrization for the modules inside a stack of `num_layers` layers."""
        return dataclasses.replace(self, depth=num_layers)

    # ------------------------------------------------------------------ initialisers

    def kernel_init(self, fan_in: int) -> Callable[..., jax.Array]:
        """Kernel initialiser: N(0,1) (unit/umup), N(0, init_std^2) or N(0, 1/fan_in) (sp)."""
        if self.unit_scaled:
            std = 1.0
        else:
            std = self.init_std if self.init_std is not None else fan_in**-0.5
        return nn.initializers.normal(stddev=std)

    def embedding_init(self) -> Callable[..., jax.Array]:
        """Embedding-table initialiser: N(0,1) (unit/umup; sp with init_std None) or
        N(0, init_std^2) (sp)."""
        std = 1.0 if (self.unit_scaled or self.init_std is None) else self.init_std
        return nn.initializers.normal(stddev=std)

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


def make_parametrization(name: str, **kwargs: Any) -> Parametrization:
    """`Parametrization(name, **kwargs)`; ValueError for an unknown name or field."""
    fields = {f.name for f in dataclasses.fields(Parametrization)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"unknown parametrization field(s) {unknown}; valid fields: {sorted(fields)}"
        )
    return Parametrization(name=name, **kwargs)
