"""BERT: MLM + NSP pretraining and sequence classification on one encoder.

Batch fields (int32 unless noted):
  input_ids [B, L], segment_ids [B, L] (token types 0/1), input_mask [B, L] (1 = real
  token), masked_lm_positions [B, P], masked_lm_ids [B, P], masked_lm_weights [B, P]
  (float or int; 0 = padding slot), next_sentence_label [B] (0 = is next, 1 = random);
  classification: label [B].

Param tree (both models; a pretraining checkpoint's `params["encoder"]` and
`params["pooler"]` load into `BertForSequenceClassification` unchanged):
  encoder/token_embed/embedding [V, D]         ("vocab", "embed"), role embedding
  encoder/segment_embed/embedding [T, D]
  encoder/position_embed/embedding [max_len, D] (position="learned" only)
  encoder/embed_norm/{scale, bias} [D]
  encoder/stack/layer_{i}/...  or  encoder/stack/layers/layer/... (scan_layers;
      leading [num_layers] axis): attention/{qkv_kernel, qv_bias, out_kernel,
      out_bias}, mlp/{wi, wo}/{kernel, bias}, norm_0, norm_1
  pooler/dense/{kernel [D, D], bias}           tanh pooler on [CLS]
  nsp/{kernel [D, 2], bias}                    role output
  mlm_dense/{kernel [D, D], bias}, mlm_norm/{scale, bias},
  mlm_output_bias [V] (tied) or mlm_readout/{kernel [D, V], bias} (untied, role output)
  (`use_bias=False` drops every bias, the heads' included)
  classifier/{kernel [D, C], bias}             (classification only)

Scales of the ops the reference lacks (unit/umup; derivations in the
`unit_scaling.ops` and `functional` docstrings): the summed token+segment+position
embeddings are scaled by 3^-1/2 forward only (`sum_embeddings`); the MLM positions and
the [CLS] position are read with `U.gather_positions` (backward `(L/P)^1/2`), and the
encoder output's gradient from the two heads by 2^-1/2 each; the tanh pooler by 1.593
(E[tanh(x)^2]^-1/2 for x ~ N(0,1)); the tied readout (`ops.readout`: μP
under umup, fan_in^-1/2 under unit) scales the table's gradient by 2^-1/2 at each of
its two uses (`Embedding`). Post-norm residual branch weights and the lr of the
norms on the stream (not the MLM head's): `Parametrization.post_norm_taus` and
`norm_lr_mult`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from unit_scaling import batches
from unit_scaling import nn as unn
from unit_scaling.models.accuracy import accuracy
from unit_scaling.models.transformer import TransformerConfig, TransformerStack
from unit_scaling.nn.partitioning import constrain
from unit_scaling.nn.positions import sinusoidal
from unit_scaling.params import make_param


@dataclasses.dataclass(frozen=True)
class BertConfig(TransformerConfig):
    """BERT hyperparameters (see `TransformerConfig` for the shared fields).

    Defaults: post-norm LayerNorm (eps 1e-12 as BERT), GELU, learned positions, tied
    MLM readout, dropout 0.1, sp init std 0.02. `type_vocab_size` segment types.
    """

    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    norm_epsilon: float = 1e-12


class BertEncoder(nn.Module):
    """Embeddings + transformer stack: ids `[B, L]` -> hidden `[B, L, D]`."""

    config: BertConfig

    def setup(self):
        c = self.config
        kw = dict(parametrization=c.parametrization, precision=c.numerics)
        self.token_embed = unn.Embedding(c.vocab_size, c.d_model, tied=c.tie_embeddings, **kw)
        self.segment_embed = unn.Embedding(c.type_vocab_size, c.d_model, axes=(None, "embed"),
                                           **kw)
        if c.position == "learned":
            self.position_embed = unn.Embedding(c.max_len, c.d_model, axes=(None, "embed"),
                                                **kw)
        self.embed_norm = unn.make_norm(c.norm, epsilon=c.norm_epsilon, use_bias=c.use_bias,
                                        lr_mult=c.norm_lr_mult, **kw)
        self.embed_dropout = unn.Dropout(c.dropout, **kw)
        self.stack = TransformerStack(c, causal=False)

    def __call__(self, input_ids, segment_ids, input_mask, *, deterministic: bool):
        c = self.config
        batch, length = input_ids.shape
        if length > c.max_len:
            raise ValueError(f"sequence length {length} > max_len={c.max_len}; raise max_len")
        p = c.parametrization
        terms = [self.token_embed(input_ids), self.segment_embed(segment_ids)]
        positions = jnp.broadcast_to(jnp.arange(length)[None], (batch, length))
        if c.position == "learned":
            terms.append(self.position_embed(positions))
        elif c.position == "sinusoidal":
            terms.append(sinusoidal(positions, c.d_model, p.unit_scaled).astype(c.numerics.dtype))
        x = p.ops.sum_embeddings(*terms)
        x = self.embed_norm(constrain(x, ("batch", "length", "embed")))
        x = self.embed_dropout(x, deterministic)
        return self.stack(x, mask=input_mask, positions=positions,
                          deterministic=deterministic)

    def attend(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
        """Tied readout `x [..., D] -> logits [..., V]` through the token table."""
        return self.token_embed.attend(x, bias)


class _Pooler(nn.Module):
    """`tanh(Linear(h[:, 0]))`: `[B, L, D] -> [B, D]` (unit/umup: scaled tanh)."""

    config: BertConfig

    @nn.compact
    def __call__(self, hidden):
        c = self.config
        ops = c.parametrization.ops
        cls = ops.gather_positions(hidden, jnp.zeros((hidden.shape[0], 1), jnp.int32))[:, 0]
        h = unn.Linear(c.d_model, kernel_axes=("embed", None), use_bias=c.use_bias,
                       parametrization=c.parametrization, precision=c.numerics,
                       name="dense")(cls)
        return ops.tanh(h)


def _check_batch(batch: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in batch]
    if missing:
        raise ValueError(f"batch is missing field(s) {missing}; BERT needs {list(fields)}")


PRETRAINING_FIELDS = batches.required(batches.MLM_NSP)
CLASSIFICATION_FIELDS = batches.required(batches.CLASSIFICATION)


class BertForPreTraining(nn.Module):
    """MLM + NSP. `__call__(batch, *, deterministic) -> (loss, metrics)`.

    loss = mlm_loss + nsp_loss (each a weighted mean cross entropy; unit/umup use
    `U.cross_entropy` with `loss_mult`); metrics `mlm_loss, mlm_accuracy, nsp_loss,
    nsp_accuracy` (MLM ones weighted by masked_lm_weights). The MLM head (dense ->
    gelu -> norm -> readout) runs only on the gathered `masked_lm_positions`
    `[B, P]`. Dropout uses the "dropout" rng collection.
    """

    config: BertConfig

    def setup(self):
        c = self.config
        kw = dict(parametrization=c.parametrization, precision=c.numerics)
        self.encoder = BertEncoder(c)
        self.pooler = _Pooler(c)
        self.nsp = unn.LinearReadout(2, kernel_axes=("embed", None), use_bias=c.use_bias,
                                     **kw)
        self.mlm_dense = unn.Linear(c.d_model, kernel_axes=("embed", None),
                                    use_bias=c.use_bias, name="mlm_dense", **kw)
        self.mlm_norm = unn.make_norm(c.norm, epsilon=c.norm_epsilon, use_bias=c.use_bias,
                                      name="mlm_norm", **kw)
        if c.tie_embeddings and c.use_bias:
            self.mlm_output_bias = make_param(self, "mlm_output_bias", nn.initializers.zeros,
                                              (c.vocab_size,), ("vocab",), "bias", None,
                                              c.numerics.param_dtype)
        elif not c.tie_embeddings:
            self.mlm_readout = unn.LinearReadout(c.vocab_size, use_bias=c.use_bias,
                                                 name="mlm_readout", **kw)

    def mlm_logits(self, hidden: jax.Array, positions: jax.Array) -> jax.Array:
        """Logits `[B, P, V]` (float32) at `positions [B, P]` of `hidden [B, L, D]`."""
        c = self.config
        ops = c.parametrization.ops
        h = ops.gather_positions(hidden, positions)
        h = self.mlm_norm(ops.gelu(self.mlm_dense(h)))
        if c.tie_embeddings:
            bias = self.mlm_output_bias.astype(c.numerics.dtype) if c.use_bias else None
            logits = self.encoder.attend(h, bias)
        else:
            logits = self.mlm_readout(h)
        return logits.astype(jnp.float32)

    def __call__(self, batch: dict, *, deterministic: bool):
        _check_batch(batch, PRETRAINING_FIELDS)
        ops = self.config.parametrization.ops
        hidden = self.encoder(batch["input_ids"], batch["segment_ids"], batch["input_mask"],
                              deterministic=deterministic)
        # Two heads read the encoder output (unit/umup: each gradient scaled by 2^-1/2,
        # as the tied embedding table's two uses are).
        hidden = ops.shared(hidden, 2)
        mlm_logits = self.mlm_logits(hidden, batch["masked_lm_positions"])
        weights = batch["masked_lm_weights"].astype(jnp.float32)
        mlm_loss = ops.cross_entropy(mlm_logits, batch["masked_lm_ids"], weights)
        nsp_logits = self.nsp(self.pooler(hidden)).astype(jnp.float32)
        nsp_labels = batch["next_sentence_label"].reshape(-1)
        nsp_loss = ops.cross_entropy(nsp_logits, nsp_labels)
        metrics = dict(
            mlm_loss=mlm_loss,
            mlm_accuracy=accuracy(mlm_logits, batch["masked_lm_ids"], weights),
            nsp_loss=nsp_loss,
            nsp_accuracy=accuracy(nsp_logits, nsp_labels),
        )
        return mlm_loss + nsp_loss, metrics


class BertForSequenceClassification(nn.Module):
    """Classification on the pooled [CLS]: `__call__(batch, *, deterministic) ->
    (loss, {"loss", "accuracy"})` on input_ids, segment_ids, input_mask, label [B].
    Shares `encoder` and `pooler` with `BertForPreTraining`; adds `classifier`
    (`LinearReadout(num_classes)`, dropout before it)."""

    config: BertConfig
    num_classes: int = 2

    def setup(self):
        c = self.config
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        kw = dict(parametrization=c.parametrization, precision=c.numerics)
        self.encoder = BertEncoder(c)
        self.pooler = _Pooler(c)
        self.dropout = unn.Dropout(c.dropout, **kw)
        self.classifier = unn.LinearReadout(self.num_classes, kernel_axes=("embed", None),
                                            use_bias=c.use_bias, **kw)

    def logits(self, batch: dict, *, deterministic: bool) -> jax.Array:
        hidden = self.encoder(batch["input_ids"], batch["segment_ids"], batch["input_mask"],
                              deterministic=deterministic)
        pooled = self.dropout(self.pooler(hidden), deterministic)
        return self.classifier(pooled).astype(jnp.float32)

    def __call__(self, batch: dict, *, deterministic: bool):
        _check_batch(batch, CLASSIFICATION_FIELDS)
        logits = self.logits(batch, deterministic=deterministic)
        labels = batch["label"].reshape(-1)
        # Optional per-row weights: 0 on rows that only pad the last eval batch.
        weights = batch.get("weight")
        loss = self.config.parametrization.ops.cross_entropy(logits, labels, weights)
        return loss, dict(loss=loss, accuracy=accuracy(logits, labels, weights))
