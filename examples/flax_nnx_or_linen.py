"""The library's Flax (linen) modules inside your own Flax model, trained with the u-μP
optimizer.

    python examples/flax_nnx_or_linen.py     # a few seconds on a CPU

Needs the `[flax]` extra. `unit_scaling.nn` modules take a `Parametrization` ("sp",
"unit" or "umup": the same model code for all three; its `ops` are the scaled ops) and
create their parameters boxed with their u-μP role and depth, so `unit_scaling.optim` builds the per-tensor learning
rates from the boxed params alone. (For Flax NNX, or any other framework, write the
model on `unit_scaling.functional` and give `optim` a spec, as in
`examples/equinox_transformer.py`.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import unit_scaling.nn as usn
from _train import fit
from unit_scaling import optim
from unit_scaling.parametrization import Parametrization


class ResidualMLPClassifier(nn.Module):
    """Your own model: an input projection, `depth` pre-norm residual MLP blocks with
    the u-μP residual rule, a readout."""

    width: int = 128
    classes: int = 10
    depth: int = 2
    parametrization: Parametrization = Parametrization("umup")

    @nn.compact
    def __call__(self, x):
        p, ops = self.parametrization, self.parametrization.ops
        h = usn.Linear(self.width, use_bias=False, parametrization=p)(x)
        block = p.in_stack(self.depth)  # the blocks' parameters get depth=self.depth
        for i in range(self.depth):
            # Each block is one residual branch of 2*depth (the rule counts attention
            # and MLP branches; here every block takes the MLP slot).
            _, tau = p.residual_taus(i, self.depth)
            branch, skip = ops.residual_split(h, tau)
            branch = usn.RMSNorm(parametrization=block)(branch)
            branch = usn.Linear(self.width, use_bias=False, parametrization=block,
                                kernel_axes=("mlp", "embed"))(branch)
            h = ops.residual_add(ops.gelu(branch), skip, tau)
        h = usn.RMSNorm(parametrization=p)(h)
        return usn.LinearReadout(self.classes, use_bias=False, parametrization=p)(h)


def main(steps: int = 20, seed: int = 0) -> list[float]:
    key, data_key = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(data_key, (256, 32))
    labels = jnp.argmax(x[:, :10], axis=-1)
    model = ResidualMLPClassifier()
    boxed = model.init(key, x)["params"]  # ScaledParam boxes: role, depth, fan_in
    for path, factor in optim.lr_table(boxed, "umup").items():
        print(f"lr factor {path:28s} {factor:.4f}")

    def loss_fn(params):
        logits = model.apply({"params": params}, x)
        return model.parametrization.ops.cross_entropy(logits, labels)

    tx = optax.chain(
        optax.adam(0.1),
        optim.scale_by_parametrization(boxed, "umup"),  # from the boxes: no spec needed
        optim.add_independent_weight_decay(boxed, 1e-4, peak_lr=0.1),
    )
    _, losses = fit(loss_fn, nn.unbox(boxed), tx, steps)
    return losses


if __name__ == "__main__":
    main()
