"""benchmarks/speed.py: the FP8-GEMM detectors, the matmul limit and an end-to-end smoke
run; benchmarks/attention.py: a smoke run; benchmarks/profile_summary.py."""

import gzip
import json
import sys

import jax
import jax.numpy as jnp
import pytest

from configs.common import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import speed

# What XLA prints: operands by name (types looked up), or with inline types; cuBLAS
# FP8 GEMMs as custom calls with a tuple output (the result and a workspace).
CPU_HLO = """
%fused_computation (param_0: f8e4m3fn[8,32], param_1: f8e5m2[32,16]) -> f32[8,16] {
  %param_0 = f8e4m3fn[8,32]{1,0} parameter(0)
  %param_1 = f8e5m2[32,16]{1,0} parameter(1)
  ROOT %dot.0 = f32[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (a: f32[8,32], b: f32[32,16]) -> f32[8,16] {
  %a = f32[8,32]{1,0} parameter(0)
  %b = f32[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""
GPU_HLO = """
  %x = f8e4m3fn[64,128]{1,0} parameter(0)
  %cublas-lt-matmul.2 = (bf16[64,32]{1,0}, s8[33554432]{0}) custom-call(f8e4m3fn[64,128]{1,0} %x, f8e4m3fn[32,128]{1,0} %w, f32[] %s, f32[] %t), custom_call_target="__cublas$lt$matmul$f8"
  %cublas-gemm.3 = (bf16[64,32]{1,0}, s8[4194304]{0}) custom-call(%y, %v), custom_call_target="__cublas$gemm"
  %fusion.1 = bf16[64,32]{1,0} fusion(%y), kind=kLoop, calls=%fused
"""


def test_count_fp8_gemms_on_hlo_text():
    assert speed.count_fp8_gemms(CPU_HLO) == (1, 2)
    assert speed.count_fp8_gemms(GPU_HLO) == (1, 2)
    assert speed.count_fp8_gemms("") == (0, 0)


def test_fp8_detectors_on_a_jitted_fp8_matmul():
    def f(a, b):
        return jnp.matmul(a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e5m2),
                          preferred_element_type=jnp.bfloat16)

    lowered = jax.jit(f).lower(jnp.ones((8, 32)), jnp.ones((32, 16)))
    assert speed.count_fp8_matmuls_requested(lowered.as_text()) == 1
    fp8, total = speed.count_fp8_gemms(lowered.compile().as_text())
    # CPU XLA upcasts float8 operands before its GEMM; a GPU keeps them (fp8 == 1).
    assert total == 1 and fp8 <= total
    bf16 = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 32)), jnp.ones((32, 16)))
    assert speed.count_fp8_matmuls_requested(bf16.as_text()) == 0


def test_fp8_matmuls_requested_counts_every_call_of_a_nested_jit():
    # The FP8 matmul is a nested jit: StableHLO holds its body once, called per layer.
    fp8_matmul = jax.jit(lambda a, b: jnp.matmul(
        a.astype(jnp.float8_e4m3fn), b.astype(jnp.float8_e4m3fn), preferred_element_type=jnp.float32))
    lowered = jax.jit(lambda x, w: fp8_matmul(fp8_matmul(x, w), w)).lower(
        jnp.ones((8, 8)), jnp.ones((8, 8)))
    assert lowered.as_text().count("stablehlo.dot_general") == 1
    assert speed.count_fp8_matmuls_requested(lowered.as_text()) == 2


def test_split_configs_and_overrides():
    assert speed.split_configs("configs/bert.py:tiny,corpus=kjv,configs/causal_lm.py:tiny") == [
        "configs/bert.py:tiny,corpus=kjv", "configs/causal_lm.py:tiny"]
    config = speed.load("configs/causal_lm.py:tiny", "sp", "fp8",
                        {"data.seq_len": "32", "model.scan_layers": "True"}, real_fp8=True)
    assert config.data.seq_len == 32 and config.model.max_len == 32  # max_len follows seq_len
    assert config.model.scan_layers is True and config.model.real_fp8 is True


def test_the_matmul_limit_is_measured_at_the_steps_shapes():
    config = speed.load("configs/bert.py:tiny", "sp", "bf16", {}, real_fp8=False)
    # batch 64 x seq 64 on 2 devices; d 128, mlp 512, vocab 4096, 10 predictions a row.
    assert speed.step_matmul_shapes(config, devices=2) == [
        (2048, 128, 384), (2048, 128, 128), (2048, 128, 512), (2048, 512, 128),
        (320, 128, 4096)]
    peak = speed.matmul_peak(jnp.bfloat16, [(8, 16, 32), (16, 16, 16)], repeats=1)
    assert peak["dtype"] == "bfloat16" and len(peak["by_shape"]) == 2
    assert peak["flops_per_s"] == max(row[3] for row in peak["by_shape"]) > 0


def test_speed_smoke(tmp_path):
    result = speed.main([
        "--configs", "configs/bert.py:tiny", "--params", "sp,umup", "--precisions", "fp32",
        "--steps", "2", "--warmup", "1", "--batch_size", "8", "--seq_len", "16",
        "--override", "model.num_layers=1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["command"].startswith("python benchmarks/speed.py --configs configs/bert.py:tiny")
    rows = saved["rows"]
    assert [(r["param"], r["precision"], r["timing"]) for r in rows] == [
        ("sp", "fp32", "interleaved"), ("umup", "fp32", "interleaved")]
    for row in rows:
        assert len(row["step_times_s"]) == 2 and row["step_s"] > 0 and row["compile_s"] > 0
        assert row["tokens_per_s"] == 8 * 16 / row["step_s"]
        assert row["model_flops_per_step"] > 0 and row["xla_bytes"] > 0
        assert row["matmul_peak"]["dtype"] == "float32" and row["matmul_mfu"] > 0
    assert rows[0]["ratio_to_sp"] == 1.0 and rows[1]["ratio_to_sp"] > 0
    markdown = (tmp_path / "speed.md").read_text()
    assert markdown.startswith("Command: `python benchmarks/speed.py")
    header, _rule, *lines = result["markdown"].splitlines()
    assert header.split(" | ")[7] == "ratio to sp" and len(lines) == 2
    assert "MFU vs matmul" in header and "Matmul peak, configs/bert.py:tiny fp32" in markdown
    assert lines[0].split(" | ")[7] == "1.00" and result["markdown"] in markdown


def test_attention_benchmark_smoke(tmp_path):
    import attention

    result = attention.main(["--seq_lens", "16", "--batch", "1", "--heads", "2",
                             "--head_dim", "8", "--steps", "1", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [(r["implementation"], r["seq_len"]) for r in rows] == [("reference", 16), ("xla", 16)]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0 and rows[1]["temp_bytes"] >= 0
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["command"].startswith("python benchmarks/attention.py --seq_lens 16")
    assert (tmp_path / "attention.md").read_text().startswith("Command: `python benchmarks/")


def test_vs_torch_reference_refuses_without_torch():
    import importlib.util

    import vs_torch_reference

    with pytest.raises(SystemExit, match="no torch environment given"):
        vs_torch_reference.check_torch_python(None)
    if importlib.util.find_spec("torch") is None:  # this project's venv has no torch
        with pytest.raises(SystemExit, match="cannot import torch"):
            vs_torch_reference.check_torch_python(sys.executable)


def test_vs_torch_reference_ratios_are_paired_per_round():
    import vs_torch_reference

    rounds = [{"load_1min": 3.0, "jax umup": {"wall": [1.0, 1.0], "cpu": [2.0, 2.0]},
               "torch": {"wall": [2.0, 2.0], "cpu": [3.0, 3.0]},
               "torch, kept memory": {"wall": [1.0, 1.0], "cpu": [2.0, 2.0]}},
              {"load_1min": 9.0, "jax umup": {"wall": [4.0, 4.0], "cpu": [2.0, 2.0]},
               "torch": {"wall": [6.0, 6.0], "cpu": [3.0, 3.0]},
               "torch, kept memory": {"wall": [2.0, 2.0], "cpu": [2.0, 2.0]}}]
    refs = ["torch", "torch, kept memory"]
    result = vs_torch_reference.summarize(rounds, ["jax umup", *refs], refs, 100, {})
    to = result["sides"]["jax umup"]["ratio_to"]
    assert to["torch"]["wall_rounds"] == [2.0, 1.5]
    assert to["torch"]["wall"] == 1.75 and to["torch"]["cpu"] == 1.5
    assert to["torch, kept memory"]["wall_rounds"] == [1.0, 0.5]
    assert "ratio_to" not in result["sides"]["torch"]
    assert result["load_1min"] == {"min": 3.0, "median": 6.0, "max": 9.0}


def test_profile_summary_groups_ops_by_kind(tmp_path, capsys):
    import profile_summary

    xla = [{"ph": "X", "pid": 1, "tid": 7, "name": n, "dur": d} for n, d in (
        ("ynn_fusion.3", 60), ("dot.1", 20), ("multiply_add_fusion.12", 15),
        ("multiply_add_fusion.2", 5), ("ThunkExecutor::Execute", 1000))]
    host = [{"ph": "X", "pid": 1, "tid": 1, "name": "$train.py:1 f", "dur": 999}]
    names = [{"ph": "M", "pid": 1, "tid": t, "name": "thread_name", "args": {"name": n}}
             for t, n in ((7, "tf_XLAEigen/1"), (1, "python"))]
    directory = tmp_path / "plugins" / "profile" / "1"
    directory.mkdir(parents=True)
    with gzip.open(directory / "vm.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": xla + host + names}, f)
    assert profile_summary.main([str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "op time per step: 0.1 ms" in out  # 100 us of ops over 2 steps
    assert "| matmul | 80.0% |" in out and "| multiply_add_fusion | 20.0% |" in out
