"""The low-precision experiment (BERT and the causal LM): its runs and commands, the
runner's handling of a diverged run, and the report from fake run directories (no
training)."""

import json
import shlex
import sys

import pytest

from configs import common
from experiments import low_precision as lp


def _commands(capsys, *argv):
    assert lp.main(["--print", *argv]) == 0
    return [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]


def test_print_lists_every_run_with_loss_scale_only_for_fp16_fp8(capsys, tmp_path):
    cmds = _commands(capsys, "--steps", "7", "--runs_dir", str(tmp_path), "--",
                     "--config.train.rms_every=7")
    # fp32, bf16: sp, unit, umup; fp16, fp8: sp, sp+ls, unit, umup
    assert len(cmds) == 14
    assert not list(tmp_path.iterdir())  # --print trains nothing and creates nothing
    workdirs = [next(a for a in c if a.startswith("--workdir=")) for c in cmds]
    assert len(set(workdirs)) == 14
    scaled = [c for c in cmds if "--config.train.loss_scale=static" in c]
    assert sorted(next(a for a in c if a.startswith("--config=")) for c in scaled) == [
        "--config=configs/bert.py:tiny,param=sp,precision=fp16",
        "--config=configs/bert.py:tiny,param=sp,precision=fp8"]
    for c in cmds:
        assert c[1].endswith("train.py")
        assert "--config.train.steps=7" in c and "--config.train.eval_every=7" in c
        assert "--config.train.checkpoint_every=0" in c and c[-1] == "--config.train.rms_every=7"
    assert f"--workdir={tmp_path}/param=sp,precision=fp8,train.loss_scale=static" in scaled[1]


def test_subsets_sizes_and_bad_values(capsys, tmp_path):
    cmds = _commands(capsys, "--config", "configs/bert.py:mini", "--precisions", "fp8,fp32", "--variants",
                     "umup,sp+ls", "--loss_scale", "dynamic", "--runs_dir", str(tmp_path))
    configs = [next(a for a in c if a.startswith("--config=")) for c in cmds]
    # precision-major in the canonical order; no sp+ls in fp32
    assert configs == ["--config=configs/bert.py:mini,param=umup,precision=fp32",
                       "--config=configs/bert.py:mini,param=sp,precision=fp8",
                       "--config=configs/bert.py:mini,param=umup,precision=fp8"]
    assert "--config.train.loss_scale=dynamic" in cmds[1]
    with pytest.raises(SystemExit):
        lp.main(["--print", "--precisions", "fp4"])
    assert "--precisions='fp4'" in capsys.readouterr().err


def test_every_override_is_a_config_field(tmp_path):
    """The commands' config argument and overrides load (as train.py would)."""
    for run in lp.plan(lp.DEFAULT_CONFIG, 5, lp.PRECISIONS, lp.VARIANTS, str(tmp_path)):
        config_arg = next(a for a in run.cmd if a.startswith("--config=")).split("=", 1)[1]
        config = common.load_config(config_arg)
        assert config.precision == run.precision
        assert config.param == run.variant.removesuffix("+ls")
        for flag in run.cmd:
            if flag.startswith("--config."):
                keys, value = flag.removeprefix("--config.").split("=", 1)
                section, field = keys.split(".")
                assert field in config[section]
                if field == "loss_scale":
                    assert value == "static" and run.variant == "sp+ls"


def _fake_run(runs_dir, name, losses, steps, evals=None, log_every=1, rms=None,
              accuracy="mlm_accuracy"):
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"train": {"steps": steps, "log_every": log_every, "lr": 1e-3, "loss_scale": "none"}}))
    rows = [{"step": (i + 1) * log_every, "train/loss": loss, f"train/{accuracy}": 0.1,
             "train/loss_scale": 1.0} for i, loss in enumerate(losses)]
    if rms:
        rows[-1].update({f"rms/grads/{k}": v for k, v in rms.items()})
    if evals:
        rows.append({"step": steps, **evals})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_report_marks_diverged_and_compares_with_fp32(tmp_path, capsys):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    _fake_run(runs_dir, "param=sp,precision=fp32", [8.0, 7.0, 6.5], 3,
              {"eval/loss": 6.4, "eval/mlm_accuracy": 0.12})
    _fake_run(runs_dir, "param=sp,precision=fp16,train.loss_scale=static", [8.0, 7.0, 6.6], 3,
              {"eval/loss": 6.5, "eval/mlm_accuracy": 0.11}, rms={"qkv": 0.0, "wo": 1e-4})
    _fake_run(runs_dir, "param=unit,precision=fp32", [8.0, 7.5, 7.0], 3,
              {"eval/loss": 7.0, "eval/mlm_accuracy": 0.08})
    # diverged: metrics end before the last step; the runner marked it failed, the log
    # says why
    bad = _fake_run(runs_dir, "param=sp,precision=fp16", [8.0], 3)
    (bad / "failed").write_text("exit status 1\n")
    (bad / lp.LOG_FILE).write_text("loop.NonFiniteLossError: non-finite values\n")
    # unit fp16 was never run: "missing"
    assert lp.main(["--report_only", "--steps", "3", "--precisions", "fp32,fp16", "--variants",
                    "sp,sp+ls,unit", "--runs_dir", str(runs_dir), "--out", str(out)]) == 0
    saved = json.loads((out / "results.json").read_text())
    by = {(r["variant"], r["precision"]): r for r in saved["rows"]}
    assert by[("sp", "fp16")]["status"] == "diverged"
    assert by[("sp", "fp16")]["nonfinite_by_step"] == 2
    assert by[("unit", "fp16")]["status"] == "missing"
    assert by[("sp", "fp32")]["eval/loss"] == 6.4 and by[("sp", "fp32")]["status"] == "ok"
    assert ("sp+ls", "fp32") not in by
    assert by[("sp+ls", "fp16")]["zero_grad_tensors"] == "1/2"
    assert by[("sp+ls", "fp16")]["rms_step"] == 3
    md = (out / "results.md").read_text()
    assert md.startswith("Command: `python -m experiments.low_precision --steps 3")
    grid = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()
            if line.startswith(("| SP", "| unit"))}
    assert "**non-finite** (by step 2)" in grid["SP"] and "6.400 / 12.0%" in grid["SP"]
    assert "6.500 (+0.100) / 11.0%" in grid["SP + loss scale"]
    assert "missing" in grid["unit scaling"]
    assert (out / "loss_curves.png").stat().st_size > 0


def test_runner_records_divergence_and_carries_on(tmp_path, capsys):
    """A run that raises NonFiniteLossError is recorded and the next run still runs;
    a second pass skips both."""
    diverges = ("import sys; print('loop.NonFiniteLossError: non-finite values', "
                "file=sys.stderr); sys.exit(1)")
    finishes = ("import json, sys; w = sys.argv[1]; "
                "open(w + '/config.json', 'w').write(json.dumps({'train': {'steps': 2}})); "
                "open(w + '/metrics.jsonl', 'w').write(json.dumps({'step': 2, 'train/loss': 1.0}))")
    a, b = tmp_path / "a", tmp_path / "b"
    runs = [lp.Run("sp", "fp16", "a", str(a), (sys.executable, "-c", diverges)),
            lp.Run("unit", "fp16", "b", str(b), (sys.executable, "-c", finishes, str(b)))]
    lp.run_all(runs)
    assert lp.status(str(a)) == "diverged" and lp.status(str(b)) == "ok"
    assert (a / "failed").read_text() == "exit status 1\n"
    assert "NonFiniteLossError" in (a / lp.LOG_FILE).read_text()
    capsys.readouterr()
    lp.run_all(runs)
    out = capsys.readouterr().out
    assert f"failed already: {a}" in out and f"done already: {b}" in out
    lp.run_all(runs, retry_failed=True)  # runs a again, not b
    assert f"running: {sys.executable}" in capsys.readouterr().out


def test_default_paths_per_config():
    args, _ = lp.parse_args(["--steps", "150"])
    assert args.config == "configs/bert.py:tiny" and args.out == lp.DEFAULT_OUT
    assert args.runs_dir.endswith("runs/low_precision/tiny-150steps")  # the recorded runs
    args, _ = lp.parse_args(["--config", "configs/causal_lm.py:tiny", "--steps", "20"])
    assert args.out == f"{lp.DEFAULT_OUT}/causal_lm_tiny"
    assert args.runs_dir.endswith("runs/low_precision/causal_lm_tiny-20steps")


def test_causal_lm_commands_load(capsys, tmp_path):
    cmds = _commands(capsys, "--config", "configs/causal_lm.py:tiny", "--variants",
                     "sp,sp+ls,umup", "--precisions", "fp32,fp16,fp8", "--runs_dir", str(tmp_path))
    assert len(cmds) == 8  # sp, umup in each precision; sp+ls in fp16, fp8
    for c in cmds:
        config_arg = next(a for a in c if a.startswith("--config=")).split("=", 1)[1]
        assert config_arg.startswith("configs/causal_lm.py:tiny,param=")
        config = common.load_config(config_arg)
        assert config.precision in ("fp32", "fp16", "fp8") and config.param in ("sp", "umup")
    assert sum("--config.train.loss_scale=static" in c for c in cmds) == 2


def test_causal_lm_report_uses_accuracy(tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    acc = {"accuracy": "accuracy"}
    _fake_run(runs_dir, "param=sp,precision=fp32", [8.0, 7.0], 2,
              {"eval/loss": 6.0, "eval/accuracy": 0.2}, **acc)
    _fake_run(runs_dir, "param=sp,precision=fp8", [8.0, 7.5], 2,
              {"eval/loss": 6.5, "eval/accuracy": 0.15}, **acc)
    _fake_run(runs_dir, "param=umup,precision=fp32", [8.0, 6.9], 2,
              {"eval/loss": 5.9, "eval/accuracy": 0.21}, **acc)
    _fake_run(runs_dir, "param=umup,precision=fp8", [8.0, 6.9], 2,
              {"eval/loss": 5.95, "eval/accuracy": 0.205}, **acc)
    assert lp.main(["--report_only", "--config", "configs/causal_lm.py:tiny", "--steps", "2",
                    "--precisions", "fp32,fp8", "--variants", "sp,umup",
                    "--runs_dir", str(runs_dir), "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "causal LM `tiny` (configs/causal_lm.py)" in md and "BERT" not in md
    assert "/ eval accuracy." in md and "MLM" not in md and "nsp" not in md
    assert "| eval/accuracy |" in md
    grid = {line.split(" | ")[0].strip("| "): line for line in md.splitlines()
            if line.startswith(("| SP", "| u-μP"))}
    assert "6.000 / 20.0%" in grid["SP"] and "6.500 (+0.500) / 15.0%" in grid["SP"]
    assert "5.950 (+0.050) / 20.5%" in grid["u-μP"]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["train/accuracy"] for r in rows} == {0.1}
    assert lp.accuracy_metric(rows) == ("accuracy", "accuracy")
    assert (out / "loss_curves.png").stat().st_size > 0
