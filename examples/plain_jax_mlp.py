"""A plain-JAX MLP classifier on the scaled ops, trained with the u-μP optimizer.

    python examples/plain_jax_mlp.py       # a few seconds on a CPU

Needs only the core install (`pip install unit-scaling-jax`: jax, numpy, ml_dtypes,
optax). Parameters are a dict of N(0, 1) arrays; their u-μP roles are a dict of the same
keys; `track_scales` shows every tensor's RMS at init, forward and backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import unit_scaling.functional as U
from _train import fit
from unit_scaling import optim
from unit_scaling.analysis import track_scales

SPEC = {  # (role, fan_in, depth); fan_in None: from the shape
    "w1": ("weight", None, None),
    "w2": ("weight", None, None),
    "norm": ("norm", None, None),
    "out": ("output", None, None),
}


def init(key, d_in=32, width=128, classes=10):
    k = jax.random.split(key, 3)
    return {"w1": jax.random.normal(k[0], (d_in, width)),
            "w2": jax.random.normal(k[1], (width, width)),
            "norm": jnp.ones((width,)),
            "out": jax.random.normal(k[2], (width, classes))}


def loss_fn(params, x, labels):
    h = U.gelu(U.linear(x, params["w1"]))
    h = U.residual_apply(lambda r: U.gelu(U.linear(r, params["w2"])), h, tau=0.5)
    logits = U.linear_readout(U.rms_norm(h, params["norm"]), params["out"])
    return U.cross_entropy(logits, labels)


def main(steps: int = 20, seed: int = 0) -> list[float]:
    key, data_key = jax.random.split(jax.random.key(seed))
    params = init(key)
    # A learnable toy task: the class is the index of the largest of the first 10 inputs.
    x = jax.random.normal(data_key, (256, 32))
    labels = jnp.argmax(x[:, :10], axis=-1)

    records = track_scales(loss_fn)(params, x, labels)
    for r in records:
        if r.op.startswith("U.") or r.role == "input":
            print(f"{r.kind:8s} {r.name:22s} rms {r.rms:6.3f}")

    tx = optax.chain(optax.adam(0.1), optim.scale_by_parametrization(params, "umup", spec=SPEC))
    _, losses = fit(lambda p: loss_fn(p, x, labels), params, tx, steps)
    return losses

if __name__ == "__main__":
    main()
