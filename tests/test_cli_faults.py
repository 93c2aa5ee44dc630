"""End to end, as a user meets them: `train.py` (and `generate`) as subprocesses, one
test per fault class; each asserts the exit status, the message and what is on disk.

Kept few (each launch pays ~5 s of imports): configuration and input errors in one
parametrized test, and one run that is locked out, preempted, found corrupt and
resumed from an earlier step."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/bert.py:tiny shrunk as tests/helpers.py:tiny does; conftest's XLA_FLAGS (8 CPU
# devices) and tokenizer cache are inherited, so the tokenizer is trained once.
TINY = [
    "--config=configs/bert.py:tiny", "--config.data.corpus=kjv:Genesis+Matthew",
    "--config.data.tokenizer=bpe", "--config.data.vocab_size=1000", "--config.data.seq_len=64",
    "--config.data.max_predictions_per_seq=10", "--config.data.shuffle_window=16",
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
    "--config.model.mlp_dim=64", "--config.model.max_len=64", "--config.train.global_batch_size=16",
    "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.warmup_steps=2",
    "--config.train.checkpoint_every=5", "--config.train.steps=30",
]


def command(workdir, *extra, program=("train.py",)):
    return [sys.executable, *program, f"--workdir={workdir}", *extra]


def launch(cmd, **kwargs):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kwargs)


def error_line(done) -> str:
    """The one `error:` line; asserts there is no traceback."""
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("extra,expected", [
    (["--config.train.lrr=1"], 'error: --config.train.lrr: no such config field. Did you mean "lr"'),
    (["--config.train.grad_accum=0"], "error: config.train.grad_accum=0 must be >= 1"),
    (["--config.mesh.data=2", "--config.mesh.tensor=4"],
     "error: config.model.num_heads=2 does not divide over config.mesh.tensor=4"),
    (["--config.data.corpus=text:/nonexistent/*.txt"], "error: data.corpus='text:/nonexistent/*.txt' matches no files"),
    ("workdir-is-a-file", "is a file, not a directory"),
    ("generate-missing", "does not exist; pass the --workdir of a train.py run"),
    ("analysis-missing", "does not exist; pass the --workdir of a train.py run"),
    ("data-unknown-field", "error: --config.data.seq_lenn: no such config field"),
    ("generate-bad-combination", "error: --scales=per_channel applies to 8-bit storage"),
    ("evaluate-bad-combination", "error: --rank_fraction=0.5 with --weights=int8"),
])
def test_configuration_and_input_errors_are_one_line_exit_2(tmp_path, extra, expected):
    workdir = tmp_path / "run"
    if extra == "workdir-is-a-file":
        workdir.write_text("")
        cmd = command(workdir, *TINY)
    elif extra == "generate-missing":
        cmd = command(workdir, program=("-m", "unit_scaling.generate"))
    elif extra == "generate-bad-combination":  # refused before the workdir is read
        cmd = command(workdir, "--weights=bf16", "--scales=per_channel",
                      program=("-m", "unit_scaling.generate"))
    elif extra == "evaluate-bad-combination":
        cmd = command(workdir, "--weights=int8", "--rank_fraction=0.5",
                      program=("-m", "unit_scaling.evaluate"))
    elif extra == "analysis-missing":
        cmd = command(workdir, f"--out={tmp_path}", program=("-m", "unit_scaling.analysis"))
    elif extra == "data-unknown-field":
        cmd = [sys.executable, "-m", "unit_scaling.data", "--config=configs/bert.py:tiny",
               "--config.data.seq_lenn=3"]
    else:
        cmd = command(workdir, *TINY, *extra)
    done = launch(cmd)
    assert done.returncode == 2, done.stderr[-3000:]
    assert expected in error_line(done)


def test_locked_preempted_corrupt_and_resumed(tmp_path):
    workdir = tmp_path / "run"
    cmd = command(workdir, *TINY)

    # 1. One run per workdir: a live process holds the lock.
    workdir.mkdir()
    (workdir / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0}))
    done = launch(cmd)
    assert done.returncode == 2 and f"in use by process {os.getpid()}" in error_line(done)
    (workdir / "lock").unlink()

    # 2. SIGTERM: saves the step it is at and exits 143, saying so (not "final:").
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert "preempted by SIGTERM: saved step" in err and "final:" not in out
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    stopped = steps[-1]
    assert 7 <= stopped < 30 and len(steps) == 2  # keep_checkpoints=2
    assert max(json.loads(line)["step"] for line in metrics.read_text().splitlines()) == stopped
    assert not (workdir / "lock").exists()

    # 3. Resuming with another learning rate is refused, naming it; nothing is written.
    before = (workdir / "config.json").read_text()
    done = launch([*cmd, "--config.train.lr=0.25"])
    assert done.returncode == 2 and "train.lr: 0.5 -> 0.25" in error_line(done)
    assert (workdir / "config.json").read_text() == before

    # 4. The latest checkpoint is corrupt: one line naming the step and the fix.
    for root, _, files in os.walk(workdir / "checkpoints" / str(stopped) / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    done = launch(cmd)
    assert done.returncode == 2, done.stderr[-3000:]
    line = error_line(done)
    earlier = steps[-2]
    assert f"checkpoint step {stopped}" in line and f"--config.train.restore_step={earlier}" in line

    # 5. The offered fix resumes from the earlier step and finishes the run.
    done = launch([*cmd, f"--config.train.restore_step={earlier}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "final:" in done.stdout
    assert os.listdir(workdir / "skipped_checkpoints") == [str(stopped)]
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert logged == list(range(1, 31))  # each step once
    assert (workdir / "tokenizer.model").exists()


def test_a_failed_save_stops_the_run_naming_the_step_and_the_free_space(tmp_path):
    """No file over 1 MB may be written (RLIMIT_FSIZE: the tokenizer, ~250 kB, fits; a
    512-wide model's 1000 x 512 embedding, 2 MB, does not, however tensorstore groups
    arrays into files: at width 128 their 0.5 MB arrays sometimes fitted one a file):
    the first save fails, the run stops with exit 2 at the latest at the next save,
    naming the step it lost."""
    workdir = tmp_path / "run"
    cmd = command(workdir, *TINY, "--config.model.d_model=512", "--config.train.checkpoint_every=2",
                  "--config.train.steps=6")
    limited = [sys.executable, "-c", (  # sets the limit, then becomes train.py
        "import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (10**6, 10**6)); "
        "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"), *cmd[1:]]
    done = launch(limited)
    assert done.returncode == 2, done.stderr[-3000:]
    # tensorstore's threads may still print "Event loop is closed" tracebacks of their
    # own while the error is reported, so a line of theirs may run into ours.
    lines = re.findall(r"error: could not save[^\n]*", done.stderr)
    assert len(lines) == 1, done.stderr[-3000:]
    line = lines[0]
    assert f"could not save step 2 in {workdir}/checkpoints" in line and "GB free there" in line
    assert "File too large" in line and "no checkpoint had been saved yet" in line
    assert not [s for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert not (workdir / "lock").exists()  # released: the rerun may start
    # (that a rerun then starts over cleanly is tests/test_loop.py's
    # test_failed_save_stops_the_run_and_keeps_the_previous_checkpoint)


@pytest.mark.parametrize("module", [
    "experiments.low_precision", "experiments.lr_transfer", "experiments.param_dtype",
    "experiments.scaling_law", "experiments.transfer", "experiments.umup_mults",
    "benchmarks.ab_trees", "benchmarks.attention", "benchmarks.speed",
    "benchmarks.vs_torch_reference"])
def test_help_renders(module, capsys):
    # argparse %-formats help strings: a bare "10%" printed the whole action dict.
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage:")
    assert "option_strings" not in out, out
