"""A decoder-only transformer written in Equinox on `unit_scaling.functional`, trained a
few steps with the u-μP optimizer and simulated FP8 matmuls.

    python examples/equinox_transformer.py        # < 1 minute on a CPU

Everything is written per example (`x: [seq, d_model]`) in the usual Equinox style and
batched with `jax.vmap`; `U.vmap_reduction("sum")` tells the scaled ops that the
per-example losses are summed, so their weight-gradient scales count the whole batch
(the gradients are those of the same model written batched). Parameters are N(0, 1)
(unit scaling); `unit_scaling.optim` gets their u-μP roles from a `(role, fan_in,
depth)` spec built from the tree paths, with no Flax anywhere.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import unit_scaling.functional as U
from _train import fit
from unit_scaling import formats as formats_lib
from unit_scaling import optim
from unit_scaling.scale import scale_fwd


class Linear(eqx.Module):
    weight: jax.Array  # [fan_in, fan_out], N(0, 1)

    def __init__(self, fan_in: int, fan_out: int, key: jax.Array):
        self.weight = jax.random.normal(key, (fan_in, fan_out))

    def __call__(self, x, formats=None, readout=False):
        op = U.linear_readout if readout else U.linear
        return op(x, self.weight, formats=formats)


class RMSNorm(eqx.Module):
    weight: jax.Array

    def __init__(self, d: int):
        self.weight = jnp.ones((d,))

    def __call__(self, x):
        return U.rms_norm(x, self.weight)


class Block(eqx.Module):
    """Pre-norm block: causal attention and a SwiGLU MLP on `x: [..., seq, d]`, each a
    unit-scaled residual branch with the u-μP `tau`s."""

    norm1: RMSNorm
    qkv: Linear
    out: Linear
    norm2: RMSNorm
    up: Linear
    down: Linear
    heads: int = eqx.field(static=True)
    taus: tuple[float, float] = eqx.field(static=True)

    def __init__(self, d: int, heads: int, mlp: int, taus: tuple[float, float], key):
        k = jax.random.split(key, 4)
        self.norm1, self.norm2 = RMSNorm(d), RMSNorm(d)
        self.qkv, self.out = Linear(d, 3 * d, k[0]), Linear(d, d, k[1])
        self.up, self.down = Linear(d, 2 * mlp, k[2]), Linear(mlp, d, k[3])
        self.heads, self.taus = heads, taus

    def __call__(self, x, formats=None):
        shape = x.shape
        seq, d = shape[-2:]

        def attention(h):
            qkv = self.qkv(self.norm1(h), formats).reshape(-1, seq, 3, self.heads, d // self.heads)
            o = U.scaled_dot_product_attention(
                qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True, formats=formats
            )
            return self.out(o.reshape(shape), formats)

        def mlp(h):
            a, gate = jnp.split(self.up(self.norm2(h), formats), 2, axis=-1)
            return self.down(U.silu_glu(a, gate), formats)

        x = U.residual_apply(attention, x, self.taus[0])
        return U.residual_apply(mlp, x, self.taus[1])


class Decoder(eqx.Module):
    embedding: jax.Array  # [vocab, d]
    blocks: list[Block]
    norm: RMSNorm
    readout: Linear

    def __init__(self, vocab: int, d: int, layers: int, heads: int, mlp: int, key):
        k = jax.random.split(key, layers + 2)
        rule = U.transformer_residual_scaling_rule()
        self.embedding = jax.random.normal(k[0], (vocab, d))
        self.blocks = [
            Block(d, heads, mlp, (rule(2 * i, 2 * layers), rule(2 * i + 1, 2 * layers)), k[i + 1])
            for i in range(layers)
        ]
        self.norm = RMSNorm(d)
        self.readout = Linear(d, vocab, k[-1])

    def __call__(self, ids, formats=None):  # ids: [seq] -> logits [seq, vocab]
        x = U.embedding(ids, self.embedding)
        for block in self.blocks:
            x = block(x, formats)
        return self.readout(self.norm(x), formats, readout=True)


def umup_spec(path: tuple, leaf: jax.Array, depth: int) -> optim.ParamSpec:
    """The u-μP role of each Decoder parameter, from its tree path."""
    name = jax.tree_util.keystr(path)
    if "embedding" in name:
        return optim.ParamSpec("embedding", fan_in=leaf.shape[-1])
    if "readout" in name:
        return optim.ParamSpec("output")
    in_stack = depth if "blocks" in name else None
    if "norm" in name:
        return optim.ParamSpec("norm", depth=in_stack)
    return optim.ParamSpec("weight", depth=in_stack)


def loss_fn(model, ids, targets, formats=None):
    """The per-example cross entropies, summed: the gradients of the batched model. The
    forward value is their mean (`scale_fwd`: forward only, as `U.cross_entropy`'s)."""
    per_example = jax.vmap(lambda i, t: U.cross_entropy(model(i, formats), t))
    with U.vmap_reduction("sum"):
        return scale_fwd(jnp.sum(per_example(ids, targets)), 1 / ids.shape[0])


def main(steps: int = 8, seed: int = 0) -> list[float]:
    vocab, d, layers, batch, seq = 64, 64, 2, 8, 32
    key, data_key = jax.random.split(jax.random.key(seed))
    model = Decoder(vocab, d, layers, heads=4, mlp=128, key=key)
    params, static = eqx.partition(model, eqx.is_array)
    spec = jax.tree_util.tree_map_with_path(lambda p, x: umup_spec(p, x, layers), params)
    schedule = optax.linear_schedule(0.3, 0.0, steps)
    tx = optax.chain(
        optax.adam(schedule),
        optim.scale_by_parametrization(params, "umup", spec=spec),
        optim.add_independent_weight_decay(params, 1e-4, peak_lr=0.3, schedule=schedule, spec=spec),
    )
    # A learnable toy task: predict the next token of a repeating sequence.
    start = jax.random.randint(data_key, (batch, 1), 0, vocab)
    tokens = (start + jnp.arange(seq + 1)) % vocab
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    _, losses = fit(
        lambda p: loss_fn(eqx.combine(p, static), ids, targets, formats_lib.FP8), params, tx, steps
    )
    return losses

if __name__ == "__main__":
    main()
