"""`host_memory.keep_freed_memory`: a step's temporaries stop page-faulting in again."""

import json
import subprocess
import sys

import pytest

from unit_scaling import host_memory

# x @ w is a 64 MiB temporary of a jitted call: the fewest page faults of 8 calls after
# warm-up. The default allocator maps it afresh on every call, so even its fewest are
# ~16k; the kept heap reuses it (0), though not on every call when the machine is busy
# (the full suite's parallel workers: about half the calls mapped anew).
_FAULTS_PER_CALL = """
import json, resource, sys
from unit_scaling import host_memory
kept = sys.argv[1] == "keep" and host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
x, w = jnp.ones((16384, 64), jnp.float32), jnp.ones((64, 1024), jnp.float32)
step = jax.jit(lambda x, w: (x.T @ (x @ w)).sum()).lower(x, w).compile()
faults = []
for call in range(11):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": bool(kept), "faults": min(faults[3:]), "all": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL, mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_kept_memory_is_not_faulted_in_again_each_call():
    kept, default = _faults("keep"), _faults("default")
    if not kept["kept"]:
        pytest.skip("keep_freed_memory does nothing here (not glibc, not on the CPU, or "
                    "UNIT_SCALING_KEEP_FREED_MEMORY=0)")
    if default["faults"] < 8000:  # 64 MiB is 16k pages of 4 KiB
        pytest.skip(f"the default allocator took {default['faults']} faults per call here "
                    "(huge pages?): nothing for the setting to remove")
    assert kept["faults"] < default["faults"] / 4, (kept, default)


def test_only_where_jax_runs_on_the_cpu(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_memory.runs_on_cpu() and not host_memory.keep_freed_memory()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,cuda")  # the first is the default
    assert host_memory.runs_on_cpu()
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "0")
    assert not host_memory.keep_freed_memory()
