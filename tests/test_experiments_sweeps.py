"""The lr-transfer and u-μP-mults experiments: their points and commands (the print
path, no training) and their reports, built from fake run directories."""

import json
import math
import os
import shlex
import subprocess

import pytest

from experiments import lr_transfer, sweep, umup_mults


def _read(path):
    with open(path) as f:
        return f.read()


def _commands(capsys, main, argv):
    assert main(argv) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]


def _flag(cmd, name):
    (value,) = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    return value


def test_lr_transfer_points_scale_heads_and_mlp_with_width(capsys, tmp_path):
    cmds = _commands(capsys, lr_transfer.main, [
        "--print", "--widths", "32,64", "--sp_lrs=-10,-8", "--umup_lrs=-1,0,1",
        "--head_dim", "16", "--workdir", str(tmp_path), "--steps", "7", "--", "--config.x=1"])
    assert len(cmds) == 2 * (2 + 3)
    assert not os.listdir(tmp_path)  # printing trains nothing
    by_width = {}
    for cmd in cmds:
        width = int(_flag(cmd, "config.model.d_model"))
        assert int(_flag(cmd, "config.model.num_heads")) * 16 == width
        assert int(_flag(cmd, "config.model.mlp_dim")) == 3 * width
        assert _flag(cmd, "config.train.steps") == "7" and cmd[-1] == "--config.x=1"
        assert _flag(cmd, "config.train.checkpoint_every") == "0"
        assert _flag(cmd, "config.train.log_every") == "1"
        param = _flag(cmd, "config").split("param=")[1]
        by_width.setdefault(width, {}).setdefault(param, []).append(
            float(_flag(cmd, "config.train.lr")))
        # the run directory names the point; collect() can read it back
        assert _flag(cmd, "workdir").startswith(str(tmp_path) + f"/param={param},model.d_model=")
    assert by_width[64] == {"sp": [2.0**-10, 2.0**-8], "umup": [0.5, 1.0, 2.0]}
    assert sorted(by_width) == [32, 64]


def test_lr_transfer_rejects_width_not_multiple_of_head_dim(capsys):
    with pytest.raises(ValueError, match="head_dim"):
        lr_transfer.main(["--print", "--widths", "40", "--head_dim", "16"])


def test_lr_transfer_config_bert_with_overrides(capsys, tmp_path):
    post_norm = ["--config.model.norm_position=post", "--config.model.norm=layer_norm"]
    cmds = _commands(capsys, lr_transfer.main, [
        "--print", "--config", "configs/bert.py:tiny", "--params", "umup", "--widths", "64,128",
        "--umup_lrs=-1,0", "--head_dim", "64", "--mlp_ratio", "4", "--seq_len", "40",
        "--workdir", str(tmp_path), "--", *post_norm])
    assert len(cmds) == 2 * 2
    for cmd in cmds:
        assert _flag(cmd, "config") == "configs/bert.py:tiny,param=umup"
        width = int(_flag(cmd, "config.model.d_model"))
        assert int(_flag(cmd, "config.model.num_heads")) * 64 == width
        assert int(_flag(cmd, "config.model.mlp_dim")) == 4 * width
        assert _flag(cmd, "config.model.max_len") == "40"  # BERT's positions follow seq_len
        assert _flag(cmd, "config.data.max_predictions_per_seq") == "6"  # 15% of 40
        assert cmd[-2:] == post_norm
    # the causal LM (the default) gets neither BERT flag
    (cmd,) = _commands(capsys, lr_transfer.main, [
        "--print", "--params", "umup", "--widths", "32", "--umup_lrs=-1",
        "--workdir", str(tmp_path)])
    assert _flag(cmd, "config").startswith("configs/causal_lm.py:tiny")
    assert not any("max_predictions_per_seq" in a or "max_len" in a for a in cmd)


def test_umup_mults_points(capsys):
    cmds = _commands(capsys, umup_mults.main, ["--print", "--width", "64"])
    names = [_flag(c, "workdir") for c in cmds]
    assert len(names) == len(set(names)) == 5 * 4 + 1 + 4  # mults x values, default, lrs
    for mult in umup_mults.MULTS:
        values = sorted(float(_flag(c, f"config.model.{mult}")) for c in cmds
                        if any(a.startswith(f"--config.model.{mult}=") for a in c))
        assert values == [0.25, 0.5, 2.0, 4.0]
    defaults = [c for c in cmds if not any("_mult=" in a or "_ratio=" in a for a in c)]
    assert sorted(float(_flag(c, "config.train.lr")) for c in defaults) == [
        2.0**-5, 2.0**-3, 0.5, 2.0, 8.0]
    assert all(_flag(c, "config.model.d_model") == "64" for c in cmds)
    assert all("param=umup" in _flag(c, "config") for c in cmds)
    more = _commands(capsys, umup_mults.main, ["--print", "--lr_mults", "attn_mult"])
    assert len(more) == len(cmds) + 2 * 4  # lr 2^-1 runs already in the mult sweep


def test_sweep_explicit_points_cross_the_grid(capsys):
    sweep.main(["--config", "configs/causal_lm.py:tiny",
                "--point", "config.model.d_model=64,config.model.num_heads=2",
                "--point", "config.model.d_model=128,config.model.num_heads=4",
                "--grid", "param=sp,umup", "--workdir", "runs/s", "--print"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert "--config=configs/causal_lm.py:tiny,param=umup" in lines[3]
    assert "--config.model.d_model=128 --config.model.num_heads=4" in lines[3]
    assert "runs/s/model.d_model=128,model.num_heads=4,param=umup" in lines[3]
    with pytest.raises(ValueError, match="KEY=V"):
        sweep.parse_point("d_model")


def test_keep_going_records_failure_and_skips_it(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_run(cmd, workdir, log_name):
        calls.append(workdir)
        os.makedirs(workdir, exist_ok=True)
        return 1

    monkeypatch.setattr(sweep, "_run", fake_run)
    point = [{"config.train.lr": "8.0"}]
    with pytest.raises(subprocess.CalledProcessError):
        sweep.run_points("configs/causal_lm.py:tiny", point, str(tmp_path))
    sweep.run_points("configs/causal_lm.py:tiny", point, str(tmp_path), keep_going=True)
    run = tmp_path / "train.lr=8.0"
    assert sweep.failed(str(run)) and len(calls) == 2
    sweep.run_points("configs/causal_lm.py:tiny", point, str(tmp_path), keep_going=True)
    assert len(calls) == 2 and "failed already" in capsys.readouterr().out
    (row,) = sweep.collect(str(tmp_path))
    assert row["failed"] and not row["finished"] and row["train.lr"] == "8.0"


def test_optimum_edge_fit_and_missing():
    xs = [2.0**k for k in range(-3, 2)]
    best = sweep.optimum(xs, [(k + 1.5) ** 2 for k in range(-3, 2)])  # min at 2^-1.5
    assert best["x"] in (2.0**-2, 2.0**-1) and not best["edge"]
    assert math.isclose(math.log2(best["x_fit"]), -1.5)
    best = sweep.optimum(xs, [5.0, 4.0, 3.0, None, float("nan")])
    assert best == {"x": 0.5, "loss": 3.0, "edge": True, "x_fit": None}
    assert sweep.optimum(xs, [None] * 5) is None
    assert sweep.tail_mean([{"step": 1, "l": 1.0}, {"step": 2, "l": 2.0},
                            {"step": 3, "l": 4.0}], "l", 2) == 3.0


def _fake_run(workdir, loss, steps=8, diverged=False):
    """A run directory as train.py leaves it: config.json, metrics.jsonl (per step)."""
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"train": {"steps": steps}}, f)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(1, steps + 1 - (3 if diverged else 0)):
            # the loss falls to `loss` over the run; the last quarter averages to it
            value = loss + (0.0 if step > steps * 3 // 4 else 1.0)
            f.write(json.dumps({"step": step, "train/loss": value, "perf/step_s": 0.1}) + "\n")
    if diverged:
        with open(os.path.join(workdir, "train.log"), "w") as f:
            f.write("unit_scaling.train.loop.NonFiniteLossError: loss is nan\n")
        with open(os.path.join(workdir, "failed"), "w") as f:
            f.write("exit status 1\n")


def test_lr_transfer_report_from_fake_runs(tmp_path, capsys):
    argv = ["--widths", "32,64,128", "--sp_lrs=-10,-9,-8,-7,-6", "--umup_lrs=-2,-1,0,1",
            "--steps", "8", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    args, _ = lr_transfer.parse_args(argv)
    for point in lr_transfer.points(args):
        width, lr = int(point["config.model.d_model"]), float(point["config.train.lr"])
        if point["param"] == "sp":  # optimum 2^-7 at width 32, halving with each doubling
            opt = -7 - math.log2(width / 32)
        else:  # u-μP: the optimum stays at 2^-1
            opt = -1
        diverged = point["param"] == "umup" and lr == 2.0 and width == 128
        _fake_run(lr_transfer.point_dir(args, point), 3 + 0.1 * (math.log2(lr) - opt) ** 2,
                  diverged=diverged)
    assert lr_transfer.main([*argv, "--report_only"]) == 0
    saved = json.loads(_read(tmp_path / "out" / "results.json"))
    optima = {(r["param"], r["width"]): r for r in saved["rows"] if r["kind"] == "optimum"}
    assert [optima["sp", w]["best_lr"] for w in (32, 64, 128)] == [2.0**-7, 2.0**-8, 2.0**-9]
    assert [optima["umup", w]["best_lr"] for w in (32, 64, 128)] == [0.5] * 3
    assert math.isclose(optima["sp", 64]["loss"], 3.0)
    assert optima["umup", 128]["runs"] == "3/4"
    assert math.isclose(optima["sp", 64]["fit_lr"], 2.0**-8)
    statuses = {r["status"] for r in saved["rows"] if r["kind"] == "run"}
    assert statuses == {"done", "diverged"}
    md = _read(tmp_path / "out" / "results.md")
    assert "| sp | 64 | 2^-8 (0.00391) |" in md
    assert "sp: optimum moves -2 octaves (grid) from width 32 to 128" in md
    assert "umup: optimum moves +0 octaves" in md
    assert "| 128 | 3.100 | 3.000 | 3.100 | div |" in md  # the umup grid, width 128
    figure = tmp_path / "out" / "out.png"
    assert 0 < figure.stat().st_size < 1_000_000
    assert "Optimum per width" in capsys.readouterr().out


def test_umup_mults_report_from_fake_runs(tmp_path, capsys):
    argv = ["--steps", "8", "--mults", "act_mult,loss_mult", "--lr_mults", "loss_mult",
            "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    args, _ = umup_mults.parse_args(argv)
    for mult, value, lr, point in umup_mults.settings(args):
        # act_mult's best value is 2; the loss_mult runs are missing at 4; lr optimum 2^-1
        loss = 3 + 0.1 * (math.log2(lr) + 1) ** 2
        loss += 0.05 * (math.log2(value) - 1) ** 2 - 0.05 if mult == "act_mult" else 0.0
        if not (mult == "loss_mult" and value == 4.0):
            _fake_run(os.path.join(args.workdir, sweep.run_name(point)), loss)
    assert umup_mults.main([*argv, "--report_only"]) == 0
    saved = json.loads(_read(tmp_path / "out" / "results.json"))
    mults = {r["mult"]: r for r in saved["rows"] if r["kind"] == "mult"}
    assert mults["act_mult"]["best"] == 2.0 and mults["act_mult"]["values"][2] == 1.0
    assert mults["loss_mult"]["losses"][-1] is None
    lrs = [r for r in saved["rows"] if r["kind"] == "lr"]
    assert [(r["mult"], r["best_lr"]) for r in lrs] == [
        ("default", 0.5), ("loss_mult", 0.5), ("loss_mult", None)]  # 4: no runs
    md = _read(tmp_path / "out" / "results.md")
    assert "| act_mult | 3.400 | 3.150 | 3.000 | 2.950 | 3.000 | 2^1 | 0.450 |" in md
    assert "| loss_mult | 3.000 | 3.000 | 3.000 | 3.000 | - | 2^-2 | 0.000 |" in md
    assert "loss_mult=2^-2: optimum lr moves +0 octaves" in md
    assert 0 < (tmp_path / "out" / "out.png").stat().st_size < 1_000_000


def test_in_process_runs_parse_each_commands_flags(tmp_path, monkeypatch):
    import train

    seen = []

    def fake_main(argv):
        config = train._CONFIG.value
        seen.append((config.param, config.train.lr, config.model.d_model, train._WORKDIR.value))
        os.write(1, b"final: fake\n")  # file descriptor 1 goes to the run's log
        if config.train.lr > 1:
            raise FloatingPointError("NonFiniteLossError: loss is nan")

    monkeypatch.setattr(train, "main", fake_main)
    todo = [{"param": "umup", "config.model.d_model": "64", "config.train.lr": "0.25"},
            {"param": "sp", "config.train.lr": "0.001"},
            {"param": "umup", "config.train.lr": "4.0"}]
    sweep.run_points("configs/causal_lm.py:tiny", todo, str(tmp_path), keep_going=True,
                     log_name="train.log", in_process=True)
    dirs = [str(tmp_path / sweep.run_name(p)) for p in todo]
    assert seen == [("umup", 0.25, 64, dirs[0]), ("sp", 0.001, 128, dirs[1]),
                    ("umup", 4.0, 128, dirs[2])]
    assert "final: fake" in _read(os.path.join(dirs[0], "train.log"))
    assert not sweep.failed(dirs[1]) and sweep.failed(dirs[2])
    assert "NonFiniteLossError" in _read(os.path.join(dirs[2], "train.log"))


def test_sweep_wall_time_is_logged_and_reported(tmp_path, monkeypatch, capsys):
    def fake_run_points(config, todo, sweep_dir, extra, **kwargs):
        assert kwargs["keep_going"] and kwargs["in_process"] and "--config.train.steps=8" in extra
        for point in todo:
            _fake_run(os.path.join(sweep_dir, sweep.run_name(point)), 3.0)

    monkeypatch.setattr(sweep, "run_points", fake_run_points)
    argv = ["--widths", "32", "--sp_lrs=-8", "--umup_lrs=-1", "--steps", "8", "--no-fast_compile",
            "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert lr_transfer.main(argv) == 0
    (entry,) = sweep.read_metrics(str(tmp_path / "runs"), lr_transfer.SWEEP_LOG)
    assert entry["trained"] == 2 and entry["command"].startswith("python -m experiments.lr_transfer")
    assert lr_transfer.main([*argv, "--report_only"]) == 0  # trains nothing, logs nothing
    assert len(sweep.read_metrics(str(tmp_path / "runs"), lr_transfer.SWEEP_LOG)) == 1
    md = _read(tmp_path / "out" / "results.md")
    assert "--report_only" not in md and "Sweeps logged in the workdir" in md and ", 2." in md


def test_idle_seconds_counts_the_compile_interval_then_the_fast_tail():
    # log_every 10 over 100 steps: the first interval (compile) as logged, then the
    # other 90 steps at the 10th percentile of the later intervals, not at their mean.
    later = [0.2] * 8 + [0.9]  # a loaded box slowed one interval
    logged = [(10, 2.0), *((10 * (i + 2), s) for i, s in enumerate(later))]
    assert lr_transfer.idle_seconds(logged) == pytest.approx(10 * 2.0 + 90 * 0.2)
    assert lr_transfer.idle_seconds([(1, 5.0)]) == pytest.approx(5.0)  # one step: compile only
    with pytest.raises(ValueError, match="perf/step_s"):
        lr_transfer.idle_seconds([])


def test_lr_transfer_other_axes_set_only_their_field(capsys, tmp_path):
    for axis, flag in (("depth", "config.model.num_layers"),
                       ("batch", "config.train.global_batch_size"), ("steps", "config.train.steps")):
        cmds = _commands(capsys, lr_transfer.main, [
            "--print", "--axis", axis, "--values", "4,8", "--params", "umup", "--umup_lrs=-1,0",
            "--width", "48", "--workdir", str(tmp_path)])
        assert len(cmds) == 2 * 2
        assert sorted({_flag(c, flag) for c in cmds}) == ["4", "8"]  # once per command
        assert all(_flag(c, "config.model.d_model") == "48" for c in cmds)  # --width
        assert all(f"{flag.removeprefix('config.')}=" in _flag(c, "workdir") for c in cmds)
    with pytest.raises(SystemExit, match="--values"):
        lr_transfer.main(["--print", "--axis", "depth", "--values", "0,2"])


def test_transfer_prints_every_axis_umup_first_and_a_gpu_scale(capsys, tmp_path):
    from experiments import transfer

    cmds = _commands(capsys, transfer.main, ["--print", "--workdir", str(tmp_path)])
    values = {"depth": [2, 4, 8, 16], "batch": [8, 16, 32], "steps": [50, 100, 200]}
    assert len(cmds) == 2 * 5 * sum(map(len, values.values()))
    params = [_flag(c, "config").split("param=")[1] for c in cmds]
    assert params == sorted(params, reverse=True)  # every umup run before the first sp one
    for axis, flag in (("depth", "model.num_layers"), ("batch", "train.global_batch_size"),
                       ("steps", "train.steps")):
        mine = [c for c in cmds if _flag(c, "workdir").startswith(str(tmp_path / axis) + "/")]
        assert sorted({int(_flag(c, f"config.{flag}")) for c in mine}) == values[axis]
    assert {float(_flag(c, "config.train.lr")) for c in cmds if "param=umup" in _flag(c, "config")
            } == {2.0**k for k in range(-3, 2)}
    gpu = _commands(capsys, transfer.main, ["--print", "--scale", "gpu", "--axes", "depth",
                                            "--params", "umup", "--steps", "500"])
    assert {_flag(c, "config.model.d_model") for c in gpu} == {"256"}
    assert {_flag(c, "config.train.steps") for c in gpu} == {"500"}  # a flag beats the preset
    with pytest.raises(SystemExit):
        transfer.main(["--print", "--axes", "width"])


def test_transfer_report_from_fake_runs(tmp_path, capsys):
    from experiments import transfer

    argv = ["--depths", "2,4,8", "--batches", "8,16", "--step_values", "4,8",
            "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    args, _ = transfer.parse_args(argv)
    for axis in transfer.AXES:
        one = transfer.axis_args(args, axis)
        for point in lr_transfer.points(one):
            value, lr = int(point[next(k for k in point if k.startswith("config.") and
                                       k != "config.train.lr")]), float(point["config.train.lr"])
            # sp's optimum falls one octave per doubling of depth; u-μP's stays at 2^-1
            opt = (-7 - math.log2(value / 2) if axis == "depth" else -8) if point["param"] == "sp" else -1
            if point["param"] == "sp" and axis == "depth" and value == 8 and lr == 2.0**-6:
                continue  # an unfinished grid: depth 8 does not count for sp
            _fake_run(lr_transfer.point_dir(one, point), 3 + 0.1 * (math.log2(lr) - opt) ** 2,
                      steps=value if axis == "steps" else 8)
    assert transfer.main([*argv, "--report_only"]) == 0
    saved = json.loads(_read(tmp_path / "out" / "results.json"))
    moves = {(r["axis"], r["param"]): r for r in saved["rows"]}
    assert moves["depth", "sp"]["grid"] == -1 and math.isclose(moves["depth", "sp"]["fit"], -1)
    assert moves["depth", "umup"]["grid"] == 0 and moves["batch", "sp"]["grid"] == 0
    assert moves["depth", "sp"]["runs"] == "14/15" and moves["depth", "umup"]["to"] == 8
    assert "| depth | sp | 2,4,8 | 2 | 4 | -1 | -1.00 |" in _read(tmp_path / "out" / "results.md")
    # 29 depth + 20 batch + 20 steps runs, less the 10 at depth 2 = batch 16 (the base)
    assert "over 59 finished runs" in _read(tmp_path / "out" / "results.md")
    for axis in transfer.AXES:
        assert (tmp_path / "out" / axis / f"{axis}.png").stat().st_size > 0
        assert f"Optimum per {axis}" in _read(tmp_path / "out" / axis / "results.md")
    assert (tmp_path / "out" / "transfer.png").stat().st_size > 0


def test_param_dtype_points_and_report_from_fake_runs(capsys, tmp_path, monkeypatch):
    from experiments import param_dtype

    argv = ["--widths", "32,64", "--steps", "8", "--workdir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "out")]
    cmds = _commands(capsys, param_dtype.main, ["--print", *argv])
    assert len(cmds) == 2 * 3 * 2  # widths x settings x seeds
    sr = [c for c in cmds if "--config.train.param_rounding=stochastic" in c]
    assert len(sr) == 4 and all(_flag(c, "config.model.param_dtype") == "bfloat16" for c in sr)
    assert {_flag(c, "config.seed") for c in cmds} == {"0", "1"}
    args, _ = param_dtype.parse_args(argv)
    for width, seed, name, point in param_dtype.runs(args):
        _fake_run(lr_transfer.point_dir(args, point), 3.0 + {"fp32": 0, "bf16": 0.05,
                                                             "bf16_sr": 0.01}[name])
    monkeypatch.setattr(param_dtype, "state_bytes",
                        lambda workdir: {"params_bytes": 2**20, "opt_bytes": 2**21})
    assert param_dtype.main([*argv, "--report_only"]) == 0
    md = _read(tmp_path / "out" / "results.md")
    assert "| 64 | bf16 | 3.050 | +0.050, +0.050 | 1.00 | 2.00 | 3.00 | 2/2 |" in md
    assert (tmp_path / "out" / "param_dtype.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        param_dtype.main(["--print", "--settings", "fp8"])


def test_param_dtype_state_bytes_halve_with_bf16(tmp_path):
    from configs.common import load_config
    from experiments import param_dtype
    from unit_scaling.train.rundir import RunDir

    sizes = {}
    for name, overrides in (("fp32", {}), ("bf16", param_dtype.SETTINGS["bf16"])):
        config = load_config("configs/causal_lm.py:tiny")
        config.model.d_model, config.model.num_heads, config.model.mlp_dim = 32, 2, 64
        config.data.vocab_size = 256
        for key, value in overrides.items():
            section, field = key.removeprefix("config.").split(".")
            config[section][field] = value
        (tmp_path / name).mkdir()
        RunDir(str(tmp_path / name)).write_config(config)
        sizes[name] = param_dtype.state_bytes(str(tmp_path / name))
    assert sizes["bf16"]["params_bytes"] * 2 == sizes["fp32"]["params_bytes"]
    # two moments per parameter (in the moment dtype), plus a few int32 step counts
    counters = {n: s["opt_bytes"] - 2 * s["params_bytes"] for n, s in sizes.items()}
    assert counters["fp32"] == counters["bf16"] and 0 < counters["fp32"] <= 16


def test_transfer_trains_the_base_run_once(tmp_path):
    from experiments import transfer

    args, _ = transfer.parse_args(["--params", "umup", "--umup_lrs=-1", "--steps", "8",
                                   "--step_values", "4,8", "--workdir", str(tmp_path)])
    depth = transfer.axis_args(args, "depth")
    (point,) = [p for p in lr_transfer.points(depth) if p["config.model.num_layers"] == "2"]
    assert transfer.reuse_base_runs(args, "umup") == 0  # nothing finished yet
    _fake_run(lr_transfer.point_dir(depth, point), 3.0)
    assert transfer.reuse_base_runs(args, "umup") == 2  # into batch=16 and steps=8
    assert sweep.finished(str(tmp_path / "batch" / "param=umup,train.global_batch_size=16,train.lr=0.5"))
    assert sweep.finished(str(tmp_path / "steps" / "param=umup,train.steps=8,train.lr=0.5"))
    assert transfer.reuse_base_runs(args, "umup") == 0
