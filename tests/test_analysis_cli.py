"""The scale-analysis command line on the real configs: `python -m unit_scaling.analysis
--config configs/{bert,causal_lm}.py:...` (tiny models on the small test corpus), the
`--compare` plot, `--workdir` restore of a `loop.run` checkpoint, and a dry run of every
preset of both config files."""

import importlib
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.helpers import BERT_FLAGS as BERT, CAUSAL_FLAGS as CAUSAL, DATA_FLAGS as DATA
from tests.helpers import SMALL_MODEL_FLAGS as SMALL_MODEL, tiny
from unit_scaling.analysis import cli, from_csv, from_json

ONE_LAYER = "--config.model.num_layers=1"  # after SMALL_MODEL: compiles faster


def small(config, *extra):
    model = BERT if config.startswith("configs/bert.py") else CAUSAL
    return ["--config", config, *DATA, *model, *extra]


def png_ok(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 20_000


def test_bert_writes_json_csv_png(tmp_path):
    out = tmp_path / "out"
    paths = cli.main(small("configs/bert.py:tiny,param=unit", *SMALL_MODEL, ONE_LAYER, "--batch_size", "2",
                           "--out", str(out)))
    assert sorted(os.listdir(out)) == ["scales.csv", "scales.json", "scales.png"]
    assert paths["png"] == str(out / "scales.png")
    png_ok(out / "scales.png")
    with open(out / "scales.json") as f:
        rows = json.load(f)
    assert {r["kind"] for r in rows} == {"forward", "backward"}
    assert all({"name", "kind", "rms", "abs_max"} <= set(r) for r in rows)
    records = from_json(str(out / "scales.json"))
    assert len(from_csv(str(out / "scales.csv"))) == len(records)
    fwd = {r.name: r for r in records if r.kind == "forward"}
    bwd = {r.name: r for r in records if r.kind == "backward"}
    assert fwd.keys() == bwd.keys()
    # Parameters (the --config.model overrides took effect), activations of every layer
    # (batch 2, seq_len 64), the loss.
    params = {n: r for n, r in fwd.items() if r.role == "param"}
    assert params["encoder/stack/layer_0/mlp/wi/kernel"].shape == (32, 64)
    assert not any("layer_1" in n for n in fwd)
    acts = [r for r in fwd.values() if r.role == "activation"]
    assert {"encoder/embed_norm", "encoder/stack/layer_0/norm_0", "mlm_logits", "nsp"} <= {r.name for r in acts}
    assert any(r.shape[:2] == (2, 64) for r in acts)
    assert fwd["loss"].rms > 1.0 and bwd["loss"].rms == 1.0
    for r in records:
        assert math.isfinite(r.rms) and r.abs_max >= r.rms, r.name
    # Unit scaling at init: activations and their gradients well inside FP8 E4M3.
    for r in acts:
        if r.name != "loss":
            assert 2.0**-6 < r.rms < 2.0**5, (r.name, r.kind, r.rms)


def test_causal_lm_compare_sp_unit_umup(tmp_path, monkeypatch):
    figures = []

    def plot(*args, **kwargs):
        figures.append(cli_plot(*args, **kwargs))
        return figures[-1]

    cli_plot = cli.plot_scales
    monkeypatch.setattr(cli, "plot_scales", plot)
    out = tmp_path / "cmp"
    cli.main(small("configs/causal_lm.py:tiny", *SMALL_MODEL, ONE_LAYER, "--compare", "param=sp,unit,umup",
                   "--batch_size", "2", "--out", str(out)))
    runs = ("sp", "unit", "umup")
    assert sorted(os.listdir(out)) == sorted(
        ["scales.csv", "scales.json", "scales.png"]
        + [f"scales_param_{p}.{ext}" for p in runs for ext in ("json", "csv")])
    png_ok(out / "scales.png")
    (fig,) = figures
    legend = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {f"param={p}" for p in runs} <= legend
    records = {p: from_json(str(out / f"scales_param_{p}.json")) for p in runs}
    assert from_json(str(out / "scales.json")) == records["sp"]
    names = {p: [(r.name, r.kind) for r in rs] for p, rs in records.items()}
    assert names["unit"] == names["umup"] and set(names["sp"]) & set(names["unit"])

    def weight_rms(p):
        return np.median([r.rms for r in records[p]
                          if r.kind == "forward" and r.role == "param" and r.name.endswith("kernel")])

    # Standard parametrization initialises weights at ~1/sqrt(fan-in) (or 0.02); unit
    # scaling and u-muP at unit scale.
    assert weight_rms("sp") < 0.3 and 0.7 < weight_rms("unit") < 1.3 and 0.7 < weight_rms("umup") < 1.3


def test_workdir_restores_the_trained_parameters(tmp_path, monkeypatch):
    from unit_scaling.train import loop, tasks

    workdir = tmp_path / "run"
    config = tiny("causal_lm", param="unit", steps=1, checkpoint_every=1, global_batch_size=8)
    config.model.num_layers = 1
    loop.run(config, str(workdir), tasks.make_task)
    seen = {}

    def inputs(config, workdir_, seed, abstract, step):
        model, variables, batch = cli.config_inputs(config, workdir_, seed, abstract, step)
        seen["config"], seen["params"] = config, variables["params"]
        return model, variables, batch

    out = tmp_path / "out"
    cli.main(["--workdir", str(workdir), "--batch_size", "2", "--out", str(out)], inputs=inputs)
    assert sorted(os.listdir(out)) == ["scales.csv", "scales.json", "scales.png"]
    assert seen["config"].param == "unit" and seen["config"].model.d_model == 32
    assert seen["config"].train.global_batch_size == 2
    # The parameters are the checkpoint's (step 1), not the init's: the norm gains,
    # exactly 1 at init, have moved.
    with ocp.CheckpointManager(str(workdir / "checkpoints"), item_names=("state", "data", "config")) as m:
        assert m.latest_step() == 1
        saved = m.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
    got, saved = (jax.tree.map(np.asarray, t) for t in (seen["params"], saved))
    assert jax.tree.structure(got) == jax.tree.structure(saved)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved)))
    gains = [v for path, v in jax.tree_util.tree_flatten_with_path(got)[0] if path[-1].key == "scale"]
    assert gains and all(np.any(g != 1.0) for g in gains)
    fwd = {r.name: r for r in from_json(str(out / "scales.json")) if r.kind == "forward"}
    leaf = jax.tree_util.tree_flatten_with_path(got)[0][0]
    name = "/".join(k.key for k in leaf[0])
    assert fwd[name].rms == pytest.approx(float(np.sqrt(np.mean(np.square(leaf[1])))), rel=1e-5)

    with pytest.raises(SystemExit, match="no checkpoint at step 7"):
        cli.main(["--workdir", str(workdir), "--step", "7", "--out", str(out)])
    with pytest.raises(SystemExit, match="--compare"):
        cli.main(["--workdir", str(workdir), "--compare", "param=sp,unit", "--out", str(out)])


# The smallest and the largest presets (the others lie between; all of them, at full
# depth, were dry-run by hand).
@pytest.mark.parametrize("config,sizes", [("configs/bert.py", ["tiny", "base", "large"]),
                                          ("configs/causal_lm.py", ["tiny", "125m", "1.3b"])])
def test_presets_build_abstractly(config, sizes):
    """A dry run (`--dry_run`: eval_shape of the init and of the whole analysis) of
    presets at their width, one layer deep (the layers are identical; full depth takes
    ~5-10 s per preset)."""
    module = importlib.import_module(config.removesuffix(".py").replace("/", "."))
    assert set(sizes) <= set(module.SIZES)
    for size in sizes:
        result = cli.main(small(f"{config}:{size},param=umup", ONE_LAYER, "--batch_size", "1",
                                "--dry_run"))
        (summary,) = result["summary"]
        d_model = module.get_config(size).model.d_model
        # One layer's attention and MLP weights (>= 12 d^2) and the embedding (vocab 1000).
        assert summary["parameters"] > 12 * d_model**2 + 1000 * d_model, (size, summary)
        assert summary["tensors"] > 15 and summary["tracked_bytes"] > 0, (size, summary)
