"""`python -m unit_scaling.train.compile`: the train step compiled ahead of time for a
named topology, on the tests' 8 CPU devices standing in for it."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.common import REPO, load_config
from unit_scaling.errors import ConfigError
from unit_scaling.train import compile as compile_lib


@pytest.mark.parametrize("name,chip,devices", [
    ("v5e-16", "TPU v5e", 16), ("v5p-128", "TPU v5p", 64), ("v4-8", "TPU v4", 4),
    ("H100-8", "H100", 8)])
def test_topology_names(name, chip, devices):
    topo = compile_lib.parse_topology(name)
    assert (topo.chip.kind, topo.devices) == (chip, devices)


@pytest.mark.parametrize("name", ["v7x-8", "v5e", "v5p-3", "tpu-v5e-16"])
def test_a_bad_topology_is_a_config_error(name):
    with pytest.raises(ConfigError, match="--topology"):
        compile_lib.parse_topology(name)


def test_count_collectives():
    hlo = """
  %all-reduce.1 = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}, to_apply=%add
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(f32[2]{0} %q), dimensions={0}
  %agd = f32[8]{0} all-gather-done((f32[2]{0}, f32[8]{0}) %ags)
  ROOT %rs = f32[1]{0} reduce-scatter(f32[4]{0} %all-reduce.1), dimensions={0}
"""
    assert compile_lib.count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1,
                                                   "reduce-scatter": 1}


def test_plan_of_a_tiny_model_on_8_devices():
    config = load_config("configs/bert.py:tiny,param=umup")
    config.model.update(d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
    config.data.update(seq_len=32, vocab_size=512)
    config.train.global_batch_size = 8
    config.mesh.update(data=2, fsdp=2, tensor=2)
    result = compile_lib.plan(config, "v5e-8")
    assert result["devices"] == 8 and result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert result["fits"] and 0 < result["params_bytes"] < result["total_bytes"]
    # fsdp and tensor shard the parameters: a device holds a fraction of them.
    assert result["params_bytes"] < result["params_global_bytes"] / 2
    assert 0 < result["optimizer_bytes"] and result["activation_bytes"] > 0
    # tensor=2 splits some residuals: the saved activations are given as a range.
    assert result["activation_bytes_min"] == pytest.approx(result["activation_bytes"] / 2)
    assert result["model_flops_per_step"] > 0 and result["xla_flops_per_device"] > 0
    assert result["collectives"].get("all-reduce", 0) > 0  # the data-parallel gradient sum
    text = compile_lib.report(result)
    assert "topology v5e-8: 8 x TPU v5e (16 GiB HBM each), mesh data=2 fsdp=2 tensor=2" in text
    assert "fits in HBM: yes" in text and "collectives per step: " in text
    assert "tensor=2 splits the heads' and the MLP's" in text


def test_the_command_reports_a_bad_topology_in_one_line():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "unit_scaling.train.compile", "--config",
         "configs/bert.py:tiny", "--topology", "v9z-8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: --topology 'v9z-8' is unknown")
    assert "Traceback" not in result.stderr
