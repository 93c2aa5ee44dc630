"""The scaling law (unit_scaling.scaling_law), the planner (unit_scaling.plan) and the
experiment that fits one (experiments/scaling_law.py), on synthetic data from known laws."""

import json
import math
import os
import shlex

import jax
import numpy as np
import pytest

from experiments import scaling_law as experiment
from experiments import sweep
from unit_scaling import plan
from unit_scaling import scaling_law as sl
from unit_scaling.models import causal_lm

TRUE = sl.Law(E=2.0, A=100.0, B=100.0, alpha=0.4, beta=0.3)
NS = [1e4, 3e4, 1e5, 3e5, 1e6, 3e6]
DS = [1e5, 3e5, 1e6, 3e6]


def _synthetic(law=TRUE, noise=0.0, seed=0):
    n, d = (np.array(x, float).ravel() for x in np.meshgrid(NS, DS))
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0, noise, n.shape))
    return n, d, loss


def test_fit_recovers_a_known_law():
    law = sl.fit(*_synthetic())
    for k in sl.PARAM_NAMES:
        assert math.isclose(getattr(law, k), getattr(TRUE, k), rel_tol=0.02), k


def test_bootstrap_intervals_cover_the_truth_under_noise():
    n, d, loss = _synthetic(noise=0.005, seed=1)
    law = sl.fit(n, d, loss)
    samples = sl.bootstrap(n, d, loss, 10, start=law)
    assert len(samples) == 10
    for k in ("alpha", "beta", "E"):
        lo, hi = sl.interval([getattr(s, k) for s in samples], 0.95)
        assert lo < hi and lo - 0.05 < getattr(TRUE, k) < hi + 0.05, (k, lo, hi)


def test_fit_refuses_too_little_data():
    with pytest.raises(sl.LawError, match="2 sizes"):
        sl.fit([1e4] * 6, [1e5, 2e5, 3e5, 4e5, 5e5, 6e5], [3.0] * 6)


def test_target_and_compute_allocations_agree_and_are_optimal():
    n, d = TRUE.for_target(3.0)
    assert math.isclose(float(TRUE.loss(n, d)), 3.0, rel_tol=1e-9)
    # the compute-optimal split of that compute reaches the same loss at the same point
    n2, d2 = TRUE.compute_optimal(6 * n * d)
    assert math.isclose(n2, n, rel_tol=1e-6) and math.isclose(d2, d, rel_tol=1e-6)
    for f in (0.8, 1.25):  # moving along 6ND = C raises the loss
        assert TRUE.loss(n * f, d / f) > TRUE.loss(n, d)
    with pytest.raises(sl.LawError, match="irreducible loss E = 2"):
        TRUE.for_target(1.9)


@pytest.mark.parametrize("depth", [1, 3])
def test_non_embedding_count_matches_the_model(depth):
    shape = sl.shape(depth, 16, 3)
    model = causal_lm.CausalLM(causal_lm.CausalLMConfig(vocab_size=64, max_len=8, **shape))
    batch = {"input_ids": np.zeros((1, 8), np.int32), "targets": np.zeros((1, 8), np.int32),
             "segment_ids": np.ones((1, 8), np.int32), "weights": np.ones((1, 8), np.float32),
             "positions": np.arange(8, dtype=np.int32)[None]}
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch, deterministic=True))
    params = shapes["params"]
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    tables = sum(math.prod(x.shape) for k in ("token_embed", "readout")
                 for x in jax.tree.leaves(params[k]))
    assert total - tables == sl.non_embedding_params(depth, 16, 3)
    assert sl.depth_for(sl.non_embedding_params(depth, 16, 3) * 1.1, 16, 3) == depth


def _law_file(tmp_path, law=TRUE):
    rng = np.random.default_rng(0)  # stand-ins for bootstrap refits: the law, perturbed
    samples = [sl.Law(**{k: v * (1 + 0.05 * rng.normal()) for k, v in law.as_dict().items()})
               for _ in range(10)]
    path = str(tmp_path / "fit.json")
    sl.save(path, law, samples, {"head_dim": 16, "mlp_ratio": 3},
            {"config": "configs/causal_lm.py:tiny,param=umup", "lr": 0.5,
             "global_batch_size": 16, "seq_len": 64, "vocab_size": 1024},
            {"runs": len(NS) * len(DS), "N": [min(NS), max(NS)], "D": [min(DS), max(DS)]})
    return path


def test_plan_target_prints_sizes_intervals_and_a_launch_that_reaches_it(tmp_path, capsys):
    path = _law_file(tmp_path)
    assert plan.main(["--law", path, "--target_loss", "3.0"]) == 0
    out = capsys.readouterr().out
    n, d = TRUE.for_target(3.0)
    assert f"N (non-embedding parameters) {n:.3g}  [" in out and f"D (tokens)" in out
    command = shlex.split(out.strip().splitlines()[-1])
    flags = dict(a[2:].split("=", 1) for a in command if a.startswith("--"))
    depth = int(flags["config.model.num_layers"])
    assert sl.shape(depth, 16, 3)["d_model"] == int(flags["config.model.d_model"])
    tokens = int(flags["config.train.steps"]) * 16 * 64
    n_run = sl.non_embedding_params(depth, 16, 3)
    assert TRUE.loss(n_run, tokens) <= 3.0 < TRUE.loss(n_run, tokens - 16 * 64)
    assert flags["config.train.lr"] == "0.5" and flags["config"].endswith("param=umup")


def test_plan_compute(tmp_path, capsys):
    path = _law_file(tmp_path)
    assert plan.main(["--law", path, "--compute", "1e13"]) == 0
    out = capsys.readouterr().out
    n, _ = TRUE.compute_optimal(1e13)
    assert "compute 1e+13 FLOPs, compute-optimal" in out and f"{n:.3g}" in out


@pytest.mark.parametrize("argv, message", [
    (["--target_loss", "1.5"], "--target_loss 1.5 is not above the fitted irreducible loss"),
    (["--target_loss", "3", "--compute", "1e12"], "give exactly one of --target_loss"),
    ([], "give exactly one of --target_loss"),
    (["--compute", "-1"], "--compute -1"),
])
def test_plan_bad_input_is_one_error_line(tmp_path, capsys, argv, message):
    path = _law_file(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        plan.main(["--law", path, *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}"[:60])


def test_plan_bad_law_file(tmp_path, capsys):
    for content, message in [(None, "no such file"), ("{", "cannot be read as JSON"),
                             ('{"schema": "x"}', "not a scaling-law file")]:
        path = tmp_path / "law.json"
        if content is not None:
            path.write_text(content)
        with pytest.raises(SystemExit):
            plan.main(["--law", str(path), "--target_loss", "3"])
        assert f"--law {path}: {message}" in capsys.readouterr().err


def _fake_run(workdir, steps, eval_loss):
    """A finished run directory: config.json and metrics.jsonl with a final eval loss."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"train": {"steps": steps}}, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": steps, "train/loss": eval_loss}) + "\n")
        f.write(json.dumps({"step": steps, "eval/loss": eval_loss}) + "\n")


def test_experiment_prints_its_grid(capsys, tmp_path):
    argv = ["--print", "--depths", "1,2,3", "--budgets", "10,20", "--sp_depths", "1,2",
            "--sp_lrs=-8,-6", "--workdir", str(tmp_path)]
    assert experiment.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    commands = [shlex.split(x) for x in lines if not x.startswith("#")]
    assert len(commands) == 3 * 2 + 2 * 2 and lines[-1].startswith("# SP at the other budgets")
    assert not os.listdir(tmp_path)
    first = dict(a[2:].split("=", 1) for a in commands[0] if a.startswith("--"))
    assert (first["config.model.num_layers"], first["config.model.d_model"],
            first["config.model.num_heads"], first["config.model.mlp_dim"]) == ("1", "32", "2", "96")
    assert first["config.train.steps"] == "10" and first["config.train.lr"] == "0.5"
    sp_steps = {dict(a[2:].split("=", 1) for a in c if a.startswith("--"))["config.train.steps"]
                for c in commands if "param=sp" in c[2]}
    assert sp_steps == {"20"}  # the SP lr sweep runs at the middle budget


def test_experiment_fits_and_reports_fake_runs(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--depths", "1,2,3,4,5", "--budgets", "10,20,40", "--sp_depths", "1,3",
            "--sp_lrs=-8,-6,-4", "--bootstrap", "5", "--workdir", str(tmp_path / "runs"),
            "--out", str(out)]
    args, _ = experiment.parse_args(argv)
    tokens = args.batch * args.seq_len
    for p in experiment.umup_points(args):
        depth, steps = int(p["config.model.num_layers"]), int(p["config.train.steps"])
        loss = TRUE.loss(sl.non_embedding_params(depth, 16, 3), steps * tokens)
        _fake_run(os.path.join(args.workdir, sweep.run_name(p)), steps, float(loss))
    for p in experiment.sp_tune_points(args):  # SP's best lr is 2^-6, 0.1 worse than u-μP
        depth, lr = int(p["config.model.num_layers"]), float(p["config.train.lr"])
        loss = TRUE.loss(sl.non_embedding_params(depth, 16, 3), 20 * tokens) + 0.1
        _fake_run(os.path.join(args.workdir, sweep.run_name(p)), 20,
                  float(loss + 0.05 * (math.log2(lr) + 6) ** 2))
    assert [p["config.train.lr"] for p in experiment.sp_budget_points(args)] == [repr(2.0**-6)] * 4
    assert experiment.main([*argv, "--report_only"]) == 0
    law, samples, content = sl.load(str(out / "fit.json"))
    assert math.isclose(law.alpha, TRUE.alpha, rel_tol=0.05) and len(samples) == 5
    assert content["held_out"]["mean_abs_error"] < 0.01
    assert content["launch"]["lr"] == 0.5 and content["fitted_on"]["runs"] == 15
    md = (out / "results.md").read_text()
    assert "| 1 | 20 |" in md and "| 2^-6 | " in md and "+0.000" not in md
    assert "| 3 | 20 | " in md and "-0.100 |" in md  # u-μP 0.1 lower at equal compute
    assert "Held out: the fit without the largest size" in md
    assert (out / "scaling_law.png").stat().st_size > 0
