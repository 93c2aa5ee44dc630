"""Weight-gradient scales under `jax.vmap`: a model written per example and vmapped
gives the gradients of the same model written batched (`U.vmap_reduction`)."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import unit_scaling.functional as U
from unit_scaling import formats

N, S, D, V = 6, 4, 8, 11
KEYS = jax.random.split(jax.random.key(0), 8)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def normal(i, shape):
    return jax.random.normal(KEYS[i], shape)


def load_example(name):
    if os.path.join(ROOT, "examples") not in sys.path:  # the examples' shared `_train`
        sys.path.append(os.path.join(ROOT, "examples"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses (Equinox modules) look their module up
    spec.loader.exec_module(module)
    return module


# Each model maps one example ([S, D] floats or [S] ids) or a batch ([N, S, ...]) to [..., S, D].
MODELS = {
    "linear": (lambda p, x: U.linear(x, p["w"], p["b"]), dict(w=(D, D), b=(D,))),
    "linear_fp8": (lambda p, x: U.linear(x, p["w"], p["b"], formats=formats.FP8), dict(w=(D, D), b=(D,))),
    "embedding": (lambda p, ids: U.embedding(ids, p["table"]), dict(table=(V, D))),
    "layer_norm": (lambda p, x: U.layer_norm(x, p["g"], p["b"]), dict(g=(D,), b=(D,))),
    "rms_norm": (lambda p, x: U.rms_norm(x, p["g"]), dict(g=(D,))),
}


def inputs(op):
    x = jax.random.randint(KEYS[0], (N, S), 0, V) if op == "embedding" else normal(0, (N, S, D))
    return x, normal(1, (N, S, D))


def assert_same(got, want, rtol=1e-5):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        assert err <= rtol, (jax.tree_util.keystr(path), err)


def batched_and_vmapped(apply, params, x, y, reduction):
    """Gradients of the batched loss and of the per-example loss vmapped and reduced."""
    def per_example(p, xi, yi):
        return U.mse_loss(apply(p, xi), yi, reduction="sum")

    batched = jax.jit(jax.grad(per_example))(params, x, y)  # one call on the whole batch
    reduce = jnp.sum if reduction == "sum" else jnp.mean

    def vmapped(p):
        with U.vmap_reduction(reduction):
            return reduce(jax.vmap(per_example, in_axes=(None, 0, 0))(p, x, y))

    return batched, jax.jit(jax.grad(vmapped))(params)


# FP8 with "mean": activation gradients are N times smaller, so E5M2 rounds them
# differently (the reason to prefer "sum" in low precision); only "sum" is exact there.
CASES = [(op, r) for op in sorted(MODELS) for r in ("sum", "mean") if (op, r) != ("linear_fp8", "mean")]


@pytest.mark.parametrize("op,reduction", CASES)
def test_vmapped_op_gives_the_batched_gradients(op, reduction):
    apply, shapes = MODELS[op]
    params = {k: normal(2 + i, s) for i, (k, s) in enumerate(shapes.items())}
    batched, vmapped = batched_and_vmapped(apply, params, *inputs(op), reduction)
    assert_same(vmapped, batched)


def test_equinox_transformer_block_vmapped_gives_the_batched_gradients():
    eqx = pytest.importorskip("equinox")
    example = load_example("equinox_transformer")
    block = example.Block(D, heads=2, mlp=16, taus=(0.5, 0.7), key=KEYS[5])
    params, static = eqx.partition(block, eqx.is_array)
    x, y = inputs("linear")
    for reduction in ("sum", "mean"):
        batched, vmapped = batched_and_vmapped(
            lambda p, xi: eqx.combine(p, static)(xi), params, x, y, reduction
        )
        assert_same(vmapped, batched)


def test_nested_vmap_jit_scan_and_remat_count_every_axis():
    apply, _ = MODELS["linear"]
    params = dict(w=normal(2, (D, D)), b=normal(3, (D,)))
    x, y = inputs("linear")

    def per_example(p, xi, yi):  # a scan of two layers, jitted and rematerialised
        def layer(h, _):
            return apply(p, h), None
        h, _ = jax.lax.scan(jax.checkpoint(layer), xi, None, length=2)
        return U.mse_loss(h, yi, reduction="sum")

    want = jax.grad(per_example)(params, x, y)
    inner = jax.vmap(jax.jit(per_example), in_axes=(None, 0, 0))
    nested = jax.vmap(inner, in_axes=(None, 0, 0))

    def loss(p):
        with U.vmap_reduction("sum"):
            return jnp.sum(nested(p, x.reshape(2, 3, S, D), y.reshape(2, 3, S, D)))

    assert_same(jax.grad(loss)(params), want)


def test_per_example_gradients_sum_to_the_batched_gradient():
    apply, _ = MODELS["rms_norm"]
    params, (x, y) = dict(g=normal(2, (D,))), inputs("rms_norm")

    def per_example(p, xi, yi):
        return U.mse_loss(apply(p, xi), yi, reduction="sum")

    want = jax.grad(per_example)(params, x, y)
    with U.vmap_reduction("sum"):
        lanes = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(params, x, y)
    assert_same(jax.tree.map(lambda g: g.sum(0), lanes), want)
    with U.vmap_reduction("none"):  # independent lanes: each its own batch of S rows
        lanes = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(params, x, y)
    assert_same(jax.tree.map(lambda g: g[2], lanes), jax.grad(per_example)(params, x[2], y[2]))


def test_undeclared_vmap_raises_and_ensembles_need_nothing():
    apply, _ = MODELS["linear"]
    params = dict(w=normal(2, (D, D)), b=normal(3, (D,)))
    x, y = inputs("linear")

    def per_example(p, xi, yi):
        return U.mse_loss(apply(p, xi), yi, reduction="sum")

    with pytest.raises(ValueError, match=r"linear's parameter is shared across a jax.vmap axis of size 6"):
        jax.grad(lambda p: jnp.sum(jax.vmap(per_example, (None, 0, 0))(p, x, y)))(params)
    # An ensemble: parameters vmapped with the data; each member sees its own batch.
    members = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    got = jax.grad(lambda m: jnp.sum(jax.vmap(per_example, (0, None, None))(m, x, y)))(members)
    assert_same(jax.tree.map(lambda g: g[0], got), jax.grad(per_example)(params, x, y))
    # Forward-only use needs no declaration, and the default (no vmap) path is unchanged
    # (to rounding: `U.linear` puts its output scale on the kernel or on the output,
    # whichever is smaller, and a vmap lane has fewer tokens than the whole batch).
    np.testing.assert_allclose(jax.vmap(apply, (None, 0))(params, x), apply(params, x),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="vmap_reduction"):
        with U.vmap_reduction("max"):
            pass
