"""`TransformerLayer` (pre- or post-norm) and `TransformerStack` (unrolled or `nn.scan`,
optional `nn.remat` with a named policy)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unit_scaling.nn.attention import MultiHeadAttention
from unit_scaling.nn.dropout import Dropout
from unit_scaling.nn.mlp import MLP
from unit_scaling.nn.norm import make_norm
from unit_scaling.nn.partitioning import constrain
from unit_scaling.parametrization import Parametrization
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


class TransformerLayer(nn.Module):
    """One transformer layer on x `[batch, len, d]` -> `[batch, len, d]`.

    Branches: attention (index 2*layer) then MLP (2*layer+1). Each is
    `residual_add(dropout(f(residual)), skip, tau)` with `residual, skip =
    residual_split(x, tau)` (sp: `x + dropout(f(x))`), and
    - pre-norm: `f = branch(norm(x))`;
    - post-norm (BERT): `x = norm(residual_add(...))` after each branch.
    `tau` per branch from `layer_taus` (the u-μP depth rule pre-norm, standard BERT's
    branch ratios post-norm), or the `taus` argument `[2]` (a traced value, used under
    `nn.scan` where the layer index is not static). `deterministic` and `decode` are fields, not call arguments,
    so that `nn.scan` and `nn.remat` see them as static.
    """

    num_heads: int
    mlp_dim: int
    layer: int = 0
    num_layers: int = 1
    activation: str = "gelu"
    norm: str = "layer_norm"
    norm_position: str = "post"
    norm_epsilon: float = 1e-6
    use_bias: bool = True
    causal: bool = False
    rope: bool = False
    max_len: Optional[int] = None
    scale_seq_len_from_max_len: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    decode: bool = False
    deterministic: bool = True
    parametrization: Parametrization = dataclasses.field(kw_only=True)
    precision: Precision = dataclasses.field(default=Precision(), kw_only=True)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        taus: Optional[jax.Array] = None,
        mask: Optional[jax.Array] = None,
        segment_ids: Optional[jax.Array] = None,
        positions: Optional[jax.Array] = None,
    ) -> jax.Array:
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"norm_position={self.norm_position!r}; set it to 'pre' or 'post'"
            )
        p = self.parametrization
        post = self.norm_position == "post"
        if taus is None:
            tau_attn, tau_mlp = layer_taus(self, self.layer, x.shape)
        else:
            tau_attn, tau_mlp = taus[0], taus[1]
        common = dict(parametrization=p, precision=self.precision)
        norm_kw = dict(epsilon=self.norm_epsilon, **common,
                       lr_mult=p.norm_lr_mult(self.norm_position, x.shape[-1], self.mlp_dim,
                                              self.activation))
        if self.norm == "layer_norm":
            norm_kw["use_bias"] = self.use_bias
        attn = MultiHeadAttention(
            self.num_heads, causal=self.causal, rope=self.rope, max_len=self.max_len,
            scale_seq_len_from_max_len=self.scale_seq_len_from_max_len,
            dropout_rate=self.attention_dropout_rate, use_bias=self.use_bias,
            decode=self.decode, name="attention", **common)
        mlp = MLP(self.mlp_dim, activation=self.activation, use_bias=self.use_bias,
                  name="mlp", **common)

        def attn_fn(h):
            return attn(h, mask=mask, segment_ids=segment_ids, positions=positions,
                        deterministic=self.deterministic)

        x = x.astype(self.precision.dtype)
        for i, (fn, tau) in enumerate(((attn_fn, tau_attn), (mlp, tau_mlp))):
            norm = make_norm(self.norm, name=f"norm_{i}", **norm_kw)
            residual, skip = p.ops.residual_split(x, tau)
            if not post:
                residual = norm(residual)
            y = fn(residual)
            y = Dropout(self.dropout_rate, parametrization=p)(y, self.deterministic)
            x = p.ops.residual_add(y, skip, tau)
            if post:
                x = norm(x)
            x = constrain(x, ("batch", "length", "embed"))
        return x


# Fields the stack passes through to every layer (`deterministic` is a call argument
# of the stack; layer index and count are set per layer, the parametrization's depth
# by the stack).
_LAYER_FIELDS = tuple(
    f.name for f in dataclasses.fields(TransformerLayer)
    if f.name not in ("parent", "name", "layer", "num_layers", "deterministic")
)


def layer_taus(module: nn.Module, layer: int, x_shape: tuple[int, ...]) -> tuple[float, float]:
    """`(tau_attn, tau_mlp)` of layer `layer` for a `TransformerLayer` or
    `TransformerStack` (their fields) on input `x_shape` `[batch, len, d]`:
    `Parametrization.residual_taus` pre-norm, `post_norm_taus` post-norm (with the
    attention's scale length: `max_len` when `scale_seq_len_from_max_len`, else `len`)."""
    p = module.parametrization
    if module.norm_position != "post":
        return p.residual_taus(layer, module.num_layers)
    seq_len = module.max_len if module.scale_seq_len_from_max_len else x_shape[1]
    return p.post_norm_taus(x_shape[-1], module.mlp_dim, module.activation, seq_len,
                            module.causal)


class TransformerStack(nn.Module):
    """`num_layers` `TransformerLayer`s on x `[batch, len, d]`, plus a final norm
    (`final_norm`, for pre-norm models).

    Every field of `TransformerLayer` (except layer/num_layers/deterministic) is
    a field here too and is passed through; `deterministic` is a call argument.
    Parameters inside the stack get `depth=num_layers` (`Parametrization.in_stack`).

    Layout: unrolled layers are `layer_0 ... layer_{n-1}`; with `scan_layers` one
    `layers` subtree whose leaves have a leading `[num_layers]` axis (logical name
    "layers"). `remat_policy` (a key of `REMAT_POLICIES`) wraps each layer in
    `nn.remat`; explicit names keep the param tree the same with and without remat.
    Under scan the per-layer residual taus are a scanned input (they depend on the
    layer index).
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    final_norm: bool = False
    scan_layers: bool = False
    remat_policy: str = "none"
    activation: str = "gelu"
    norm: str = "layer_norm"
    norm_position: str = "post"
    norm_epsilon: float = 1e-6
    use_bias: bool = True
    causal: bool = False
    rope: bool = False
    max_len: Optional[int] = None
    scale_seq_len_from_max_len: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    decode: bool = False
    parametrization: Parametrization = dataclasses.field(kw_only=True)
    precision: Precision = dataclasses.field(default=Precision(), kw_only=True)

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
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"remat_policy={self.remat_policy!r} is unknown; set it to one of "
                f"{sorted(REMAT_POLICIES)}"
            )
        kw = {f: getattr(self, f) for f in _LAYER_FIELDS}
        kw["deterministic"] = deterministic
        kw["parametrization"] = self.parametrization.in_stack(self.num_layers)
        layer_cls = TransformerLayer
        if self.remat_policy != "none":
            layer_cls = nn.remat(
                TransformerLayer, policy=REMAT_POLICIES[self.remat_policy],
                prevent_cse=not self.scan_layers,
            )
        n = self.num_layers
        if self.scan_layers:
            taus = np.array([layer_taus(self, i, x.shape) for i in range(n)], np.float32)
            scanned = nn.scan(
                _ScanAdapter,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=n,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(layer_cls=layer_cls, layer_kwargs=tuple(kw.items()),
                           num_layers=n, name="layers")(
                x, jnp.asarray(taus), mask, segment_ids, positions)
        else:
            for i in range(n):
                x = layer_cls(layer=i, num_layers=n, name=f"layer_{i}", **kw)(
                    x, None, mask, segment_ids, positions)
        if self.final_norm:
            norm_kw = dict(epsilon=self.norm_epsilon, parametrization=self.parametrization,
                           precision=self.precision,
                           lr_mult=self.parametrization.norm_lr_mult(
                               self.norm_position, x.shape[-1], self.mlp_dim, self.activation))
            if self.norm == "layer_norm":
                norm_kw["use_bias"] = self.use_bias
            x = make_norm(self.norm, name="final_norm", **norm_kw)(x)
        return x


class _ScanAdapter(nn.Module):
    """The scanned body: `(carry x, taus[2], mask, segment_ids, positions) -> (x, None)`.

    The inner layer is named "layer" so the scanned subtree is `layers/layer/...`.
    """

    layer_cls: Any
    layer_kwargs: tuple
    num_layers: int

    @nn.compact
    def __call__(self, x, taus, mask, segment_ids, positions):
        layer = self.layer_cls(num_layers=self.num_layers, name="layer",
                               **dict(self.layer_kwargs))
        return layer(x, taus, mask, segment_ids, positions), None
