"""Tests of unit_scaling.analysis: scale tracking, the model view, plots, tables, CLI."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

import unit_scaling.functional as U
from unit_scaling import formats
from unit_scaling.analysis import (
    FIELDS,
    from_csv,
    from_json,
    plot_scales,
    tensor_stats,
    to_csv,
    to_json,
    track_model_scales,
    track_scales,
)
from unit_scaling.analysis import cli


def unit_rms(key, shape):
    """A normal sample rescaled to RMS exactly 1 (so known scales come out exactly)."""
    x = jax.random.normal(key, shape)
    return x / jnp.sqrt(jnp.mean(jnp.square(x)))


def rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(x, jnp.float32)))))


def by_name(records, kind):
    return {r.name: r for r in records if r.kind == kind}


def activations(records, kind="forward"):
    return [r for r in records if r.kind == kind and r.role == "activation"]


# ------------------------------------------------------------------- known scales


def test_two_x_forward_and_backward_scales_are_exact():
    x = unit_rms(jax.random.key(0), (256,))
    records = track_scales(lambda x: 2 * x)(x)
    fwd, bwd = by_name(records, "forward"), by_name(records, "backward")
    assert list(fwd) == ["arg0", "mul:0"]
    # The op's output has RMS 2; the gradient arriving at its input has RMS 2 (the
    # default cotangent of a non-scalar output has RMS exactly 1).
    assert fwd["mul:0"].rms == pytest.approx(2.0, rel=1e-6)
    assert bwd["arg0"].rms == pytest.approx(2.0, rel=1e-6)
    assert fwd["arg0"].rms == pytest.approx(1.0, rel=1e-6)
    assert bwd["mul:0"].rms == pytest.approx(1.0, rel=1e-6)
    assert fwd["mul:0"].inputs == ("arg0",)
    assert fwd["mul:0"].shape == (256,) and fwd["mul:0"].dtype == "float32"


def test_scalar_output_uses_its_own_gradient():
    x = unit_rms(jax.random.key(1), (64,))
    bwd = by_name(track_scales(lambda x: jnp.sum(3.0 * x))(x), "backward")
    assert bwd["reduce_sum:0"].rms == 1.0  # d out / d out
    assert bwd["arg0"].rms == pytest.approx(3.0, rel=1e-6)
    assert bwd["mul:0"].rms == pytest.approx(1.0, rel=1e-6)


def test_tensor_stats_counts_format_ranges():
    x = jnp.array([0.0, 1e-9, -1.0, 500.0, -60000.0, 70000.0])
    s = {k: float(v) for k, v in tensor_stats(x).items()}
    assert s["frac_zero"] == pytest.approx(1 / 6)
    assert s["abs_max"] == 70000.0 and s["abs_min_nonzero"] == pytest.approx(1e-9)
    assert s["frac_above_max_e4m3"] == pytest.approx(3 / 6)  # > 448
    assert s["frac_above_max_e5m2"] == pytest.approx(2 / 6)  # > 57344
    assert s["frac_above_max_fp16"] == pytest.approx(1 / 6)  # > 65504
    for fmt in ("e4m3", "e5m2", "fp16"):
        assert s[f"frac_below_normal_{fmt}"] == pytest.approx(1 / 6)  # only 1e-9
    assert s["rms"] == pytest.approx(rms(x), rel=1e-6)
    assert math.isnan(float(tensor_stats(jnp.zeros(3))["abs_min_nonzero"]))


def test_scaled_linear_is_one_op_with_its_documented_scales():
    batch, fan_in, fan_out = 64, 256, 128
    kx, kw, kg = jax.random.split(jax.random.key(2), 3)
    x, w = unit_rms(kx, (batch, fan_in)), unit_rms(kw, (fan_in, fan_out))
    g = unit_rms(kg, (batch, fan_out))
    records = track_scales(U.linear, cotangent=g)(x, w)
    acts = activations(records)
    assert [r.op for r in acts] == ["U.linear"]  # one op, not its custom_vjp's
    out = acts[0]
    assert out.inputs == ("arg0", "arg1")
    bwd = by_name(records, "backward")
    # Exact: forward (x@w) fan_in^-1/2; input grad (g@w.T) times the constrained scale
    # (to_output_scale: fan_in^-1/2 too); weight grad (x.T@g) batch^-1/2.
    assert out.rms == pytest.approx(rms(x @ w) / fan_in**0.5, rel=1e-5)
    assert bwd["arg0"].rms == pytest.approx(rms(g @ w.T) / fan_in**0.5, rel=1e-5)
    assert bwd["arg1"].rms == pytest.approx(rms(x.T @ g) / batch**0.5, rel=1e-5)
    assert bwd[out.name].rms == pytest.approx(1.0, rel=1e-6)
    # Unit scale: output and weight gradient ~1; the constrained input gradient is
    # (fan_out/fan_in)^1/2, and exactly ~1 with independent scales (constraint=None).
    assert out.rms == pytest.approx(1.0, abs=0.1)
    assert bwd["arg1"].rms == pytest.approx(1.0, abs=0.1)
    assert bwd["arg0"].rms == pytest.approx((fan_out / fan_in) ** 0.5, rel=0.1)
    free = by_name(track_scales(lambda x, w: U.linear(x, w, constraint=None), cotangent=g)(x, w), "backward")
    assert free["arg0"].rms == pytest.approx(rms(g @ w.T) / fan_out**0.5, rel=1e-5)
    assert free["arg0"].rms == pytest.approx(1.0, abs=0.1)

    eqn = activations(track_scales(U.linear, cotangent=g, granularity="eqn")(x, w))
    ops = [r.op for r in eqn]
    # One op: the matmul with its forward scale and scaled backward (`_dense`).
    assert ops == ["custom_vjp:_dense"]


@pytest.mark.parametrize("real", [False, True])
def test_a_format_policy_matmul_stays_inside_its_op(real):
    # The policy's matmul is traced in unit_scaling/formats/: part of the U.linear unit.
    x, w = unit_rms(jax.random.key(3), (8, 16)), unit_rms(jax.random.key(4), (16, 32))
    policy = formats.FormatPolicy(real=real)
    records = track_scales(lambda x, w: U.linear(x, w, formats=policy))(x, w)
    assert [r.op for r in activations(records)] == ["U.linear"]


def test_ops_of_a_small_network_are_named_and_ordered():
    def net(x, w1, w2):
        h = U.gelu(U.linear(x, w1))
        return U.linear(h, w2)

    ks = jax.random.split(jax.random.key(3), 3)
    records = track_scales(net)(
        unit_rms(ks[0], (32, 64)), unit_rms(ks[1], (64, 128)), unit_rms(ks[2], (128, 64))
    )
    acts = activations(records)
    assert [r.name for r in acts] == ["U.linear:0", "U.gelu:0", "U.linear:1"]
    assert acts[1].inputs == ("U.linear:0",) and acts[2].inputs == ("U.gelu:0", "arg2")
    assert [r.index for r in acts] == sorted(r.index for r in acts)
    assert all(r.source.endswith("net)") and "test_analysis.py" in r.source for r in acts)
    for r in records:  # a small unit-scaled net stays near unit scale both ways
        assert 0.5 < r.rms < 2.0, r


# -------------------------------------------------------------- transformations


@jax.custom_vjp
def _times_ten_grad(x):
    return x


_times_ten_grad.defvjp(lambda x: (x, None), lambda _, g: (10.0 * g,))


def _mixed(x):
    y = jax.jit(lambda t: 3.0 * t)(x)  # jit: inlined
    y = jax.checkpoint(lambda t: jnp.sin(t) * 2.0)(y)  # remat: inlined
    y = _times_ten_grad(y)  # custom_vjp: one unit, its own gradient rule

    def body(c, _):
        c = 2.0 * c
        return c, c

    c, ys = jax.lax.scan(body, y, None, length=3)
    return jnp.sum(c) + jnp.sum(ys)


def test_jit_remat_custom_vjp_and_scan():
    x = unit_rms(jax.random.key(4), (16,))
    records = track_scales(_mixed)(x)
    fwd, bwd = by_name(records, "forward"), by_name(records, "backward")
    # jit and remat bodies appear as their own ops; results equal the plain ones.
    assert fwd["mul:0"].rms == pytest.approx(3.0, rel=1e-6)
    y = 2.0 * jnp.sin(3.0 * x)
    assert fwd["mul:1"].rms == pytest.approx(rms(y), rel=1e-6)
    assert "jit" not in {r.op for r in records} and "remat2" not in {r.op for r in records}
    # custom_vjp: one unit (not entered), and its own rule shapes the gradient.
    (cv,) = [r for r in activations(records) if r.op.startswith("custom_vjp")]
    assert cv.op == "custom_vjp:_times_ten_grad"
    assert bwd[cv.inputs[0]].rms == pytest.approx(10.0 * bwd[cv.name].rms, rel=1e-6)
    # scan: one record per iteration; iteration i doubles i+1 times.
    scan_recs = [r for r in activations(records) if r.iteration is not None]
    assert [r.name for r in scan_recs] == [f"scan[{i}]/mul:0" for i in range(3)]
    for i, r in enumerate(scan_recs):
        assert r.rms == pytest.approx(2.0 ** (i + 1) * rms(y), rel=1e-6)
        assert r.layer == f"scan[{i}]"
    # loss = sum(c_2) + sum(ys), c_{i+1} = 2 c_i: d/dc_2 = 2, d/dc_1 = 1 + 2*2, d/dc_0 = 1 + 2*5.
    assert [bwd[r.name].rms for r in scan_recs] == pytest.approx([11.0, 5.0, 2.0], rel=1e-6)

    # The same numbers through an outer jit.
    jitted = by_name(track_scales(jax.jit(_mixed))(x), "forward")
    assert {k: v.rms for k, v in jitted.items()} == pytest.approx({k: v.rms for k, v in fwd.items()})

    # scan="unit": the scan is one unit reporting its outputs (final carry, stacked ys).
    unit = [r for r in activations(track_scales(_mixed, scan="unit")(x)) if r.op == "scan"]
    assert [r.shape for r in unit] == [(16,), (3, 16)]
    assert unit[0].rms == pytest.approx(8.0 * rms(y), rel=1e-6)


def test_bad_arguments_are_reported():
    x = jnp.ones((4,))
    with pytest.raises(ValueError, match="cotangent"):
        track_scales(lambda x: 2 * x, cotangent=jnp.ones((5,)))(x)
    with pytest.raises(ValueError, match="has_aux"):
        track_scales(lambda x: 2 * x, has_aux=True)(x)
    with pytest.raises(ValueError, match="granularity"):
        track_scales(lambda x: 2 * x, granularity="layer")(x)


# ----------------------------------------------------------------------- models

D, V = 16, 32
_init = nn.initializers.normal(1.0)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        w1 = self.param("w1", _init, (D, 4 * D))
        w2 = self.param("w2", _init, (4 * D, D))
        h = checkpoint_name(U.gelu(U.linear(x, w1)), "hidden")
        return U.linear(h, w2)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        residual, skip = U.residual_split(x, 0.5)
        x = U.residual_add(Mlp(name="mlp")(residual), skip, 0.5)
        scale = self.param("norm_scale", nn.initializers.ones, (D,))
        bias = self.param("norm_bias", nn.initializers.zeros, (D,))
        return U.layer_norm(x, scale, bias), None


class TinyLM(nn.Module):
    scan: bool = False

    @nn.compact
    def __call__(self, batch, deterministic=True):
        ids, labels = batch["ids"], batch["labels"]
        x = U.embedding(ids, self.param("embed", _init, (V, D)))
        if self.scan:
            stack = nn.scan(
                Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=2
            )
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(2):
                x, _ = Layer(name=f"layers_{i}")(x)
        logits = U.linear_readout(x, self.param("readout", _init, (D, V)))
        loss = U.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
        return loss, {"logits_rms": U.rms(logits)}


@pytest.fixture(scope="module")
def tiny_lm():
    ids = jax.random.randint(jax.random.key(5), (4, 8), 0, V)
    labels = jax.random.randint(jax.random.key(6), (4, 8), 0, V)
    model, batch = TinyLM(), {"ids": ids, "labels": labels}
    variables = jax.jit(model.init)(jax.random.key(7), batch)
    return model, variables, batch


@pytest.fixture(scope="module")
def lm_records(tiny_lm):
    """The model view of TinyLM (shared: compiling the model dominates test time)."""
    return track_model_scales(*tiny_lm)


@pytest.fixture(scope="module")
def lm_op_records(tiny_lm):
    return track_model_scales(*tiny_lm, detail="ops")


def test_model_view_reports_params_grads_and_module_outputs(tiny_lm, lm_records, lm_op_records):
    model, variables, batch = tiny_lm
    records = lm_records
    fwd, bwd = by_name(records, "forward"), by_name(records, "backward")
    names = list(fwd)
    params = [n for n in names if fwd[n].role == "param"]
    assert params[:4] == ["embed", "layers_0/mlp/w1", "layers_0/mlp/w2", "layers_0/norm_bias"]
    assert len(params) == 2 + 4 * 2
    # Parameter gradients equal jax.grad's.
    loss, grads = jax.jit(jax.value_and_grad(lambda v: model.apply(v, batch)[0]))(variables)
    grads = grads["params"]
    assert bwd["layers_1/mlp/w2"].rms == pytest.approx(rms(grads["layers_1"]["mlp"]["w2"]), rel=1e-5)
    assert bwd["embed"].rms == pytest.approx(rms(grads["embed"]), rel=1e-5)
    assert fwd["readout"].rms == pytest.approx(rms(variables["params"]["readout"]), rel=1e-6)
    # Activations: tagged MLP hidden, module outputs (the residual stream after each
    # layer is the layer's output), the loss; in execution order.
    acts = [n for n in names if fwd[n].role == "activation"]
    assert acts == [
        "layers_0/mlp/hidden", "layers_0/mlp", "layers_0",
        "layers_1/mlp/hidden", "layers_1/mlp", "layers_1", "loss",
    ]
    assert fwd["layers_0/mlp/hidden"].op == "tag:hidden"
    assert fwd["layers_1"].op == "module" and fwd["layers_1"].layer == "layers_1"
    assert fwd["layers_1/mlp/w1"].layer == "layers_1" and fwd["embed"].layer == "embed"
    assert fwd["layers_0"].rms == pytest.approx(1.0, abs=1e-3)  # layer-normed
    assert bwd["loss"].rms == 1.0
    assert fwd["loss"].rms == pytest.approx(float(loss), rel=1e-6)
    for n in acts[:-1]:  # a unit-scaled model: all near 1 at init
        assert 0.5 < fwd[n].rms < 2.0 and 0.3 < bwd[n].rms < 3.0, n

    detailed = {r.name for r in lm_op_records}
    assert {"U.embedding:0", "layers_0/mlp/U.gelu:0", "layers_1"} <= detailed


def test_model_view_under_nn_scan_matches_the_loop(tiny_lm, lm_records):
    model, variables, batch = tiny_lm
    loop = by_name(lm_records, "forward")
    p = variables["params"]
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p["layers_0"], p["layers_1"])
    scan_vars = {"params": {"embed": p["embed"], "readout": p["readout"], "layers": stacked}}
    scanned = by_name(track_model_scales(TinyLM(scan=True), scan_vars, batch), "forward")
    for i in range(2):
        for suffix in ("", "/mlp", "/mlp/hidden", "/mlp/w1", "/norm_scale"):
            a, b = loop[f"layers_{i}{suffix}"], scanned[f"layers[{i}]{suffix}"]
            assert b.rms == pytest.approx(a.rms, rel=1e-5), suffix
            assert b.layer == f"layers[{i}]" and b.shape == a.shape
    assert scanned["loss"].rms == pytest.approx(loop["loss"].rms, rel=1e-6)


# --------------------------------------------------------- tables, plots, CLI


def test_json_and_csv_round_trip(tmp_path):
    records = track_scales(lambda x: jnp.sum(jax.nn.relu(x) * 0.0))(jnp.linspace(-1, 1, 8))
    assert any(math.isnan(r.abs_min_nonzero) for r in records)  # all-zero tensors

    def same(a, b):
        return all(
            getattr(a, f) == getattr(b, f)
            or (isinstance(getattr(a, f), float) and math.isnan(getattr(a, f)) and math.isnan(getattr(b, f)))
            for f in FIELDS
        )

    for write, read, ext in ((to_json, from_json, "json"), (to_csv, from_csv, "csv")):
        path = str(tmp_path / f"scales.{ext}")
        write(records, path)
        for back in (read(path), read(write(records))):
            assert len(back) == len(records)
            assert all(same(a, b) for a, b in zip(records, back))


def _png_ok(path, min_bytes=15_000):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > min_bytes


def test_plot_single_compare_and_max_rows(lm_records, lm_op_records, tmp_path):
    records, other = lm_records, lm_op_records
    plot_scales(records, str(tmp_path / "one.png"), title="tiny")
    _png_ok(tmp_path / "one.png")
    fig = plot_scales(None, str(tmp_path / "cmp.png"), compare={"modules": records, "ops": other})
    _png_ok(tmp_path / "cmp.png")
    assert len(fig.axes[0].get_yticklabels()) == len({r.name for r in records + other})
    fig = plot_scales(other, str(tmp_path / "few.png"), max_rows=5)
    assert len(fig.axes[0].get_yticklabels()) == 5 and "first 5 of" in fig._suptitle.get_text()
    with pytest.raises(ValueError):
        plot_scales([], str(tmp_path / "none.png"))


class Probe(nn.Module):
    """A one-op model with the `apply(variables, batch, deterministic)` of the tasks."""

    @nn.compact
    def __call__(self, batch, deterministic=True):
        w = self.param("w", _init, (D, V))
        logits = U.linear_readout(batch["x"], w)
        return U.cross_entropy(logits, batch["labels"]), {}


def test_write_outputs_and_cli(lm_records, tmp_path):
    paths = cli.write_outputs(lm_records, str(tmp_path / "one"), title="tiny")
    assert [os.path.basename(paths[k]) for k in ("json", "csv", "png")] == [
        "scales.json", "scales.csv", "scales.png"
    ]
    assert len(from_csv(paths["csv"])) == len(lm_records)
    _png_ok(paths["png"])

    records = cli.analyse(lambda x: 2 * x, jnp.ones(8), out=str(tmp_path / "fn"))
    assert [r.rms for r in records if r.name == "mul:0"] == [2.0, 1.0]
    assert sorted(os.listdir(tmp_path / "fn")) == ["scales.csv", "scales.json", "scales.png"]

    config = tmp_path / "cfg.py"
    config.write_text(
        "import ml_collections\n"
        "def get_config(arg=''):\n"
        "    return ml_collections.ConfigDict(\n"
        "        {'arg': arg, 'model': {'width': 8}, 'train': {'global_batch_size': 32, 'grad_accum': 2}})\n"
    )
    batch = {"x": unit_rms(jax.random.key(8), (8, D)), "labels": jnp.arange(8) % V}
    seen = []

    def inputs(cfg, workdir, seed, abstract, step):
        seen.append((cfg.arg, cfg.model.width, cfg.train.global_batch_size, cfg.train.grad_accum))
        model = Probe()
        return model, model.init(jax.random.key(seed or 0), batch), batch

    out = tmp_path / "cmp"
    argv = ["--config", f"{config}:tiny,param=unit", "--config.model.width=16", "--compare",
            "param=sp,umup", "--out", str(out), "--batch_size", "3"]
    paths = cli.main(argv, inputs=inputs)
    assert seen == [("tiny,param=sp", 16, 3, 1), ("tiny,param=umup", 16, 3, 1)]
    for name in ("scales.json", "scales.csv", "scales.png", "scales_param_sp.json", "scales_param_umup.csv"):
        assert os.path.exists(out / name), name
    back = from_json(str(out / "scales.json"))
    assert {r.name for r in back} == {"w", "loss"} and {r.kind for r in back} == {"forward", "backward"}
    _png_ok(out / "scales.png")

    # A dotted key compares config fields (as --config.KEY=v overrides).
    seen.clear()
    cli.main([f"--config={config}:tiny", "--compare", "model.width=4,5", "--out", str(out)], inputs=inputs)
    assert seen == [("tiny", 4, 4, 1), ("tiny", 5, 4, 1)]
    # A dry run traces abstractly and writes nothing.
    dry = cli.main([f"--config={config}", "--dry_run"], inputs=lambda cfg, *a: (
        Probe(), jax.eval_shape(Probe().init, jax.random.key(0), batch), batch))
    (summary,) = dry["summary"]
    assert summary["tensors"] == 2 and summary["parameters"] == D * V

    with pytest.raises(SystemExit, match="key=a,b,c"):
        cli.main(["--config", f"{config}:tiny", "--compare", "param", "--out", str(out)], inputs=inputs)
    with pytest.raises(SystemExit, match="--out"):
        cli.main(["--config", f"{config}:tiny"], inputs=inputs)
    with pytest.raises(SystemExit, match="unknown_flag"):
        cli.main(["--config", f"{config}:tiny", "--out", str(out), "--unknown_flag=1"], inputs=inputs)


def test_segment_stats_equal_tensor_stats_per_row():
    from unit_scaling.analysis.records import segment_stats, tensor_stats

    r = np.random.default_rng(0)
    a = r.normal(size=(3, 50)).astype(np.float32) * np.array([[1e-9], [1.0], [1e6]], np.float32)
    a[0, :10] = 0.0
    a[1, 3] = np.inf
    b = r.normal(size=(2, 7)).astype(np.float32)
    got = segment_stats([jnp.asarray(a), jnp.asarray(b)])
    rows = [a[0], a[1], a[2], b[0], b[1]]
    for i, row in enumerate(rows):
        want = tensor_stats(jnp.asarray(row))
        for k, v in want.items():
            np.testing.assert_allclose(got[k][i], v, rtol=1e-6, err_msg=f"row {i} {k}")
