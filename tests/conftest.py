"""Test setup: 8 CPU devices, forced before JAX initialises its backend; a private
tokenizer cache.

Every test in the suite sees the same 8-device CPU platform, so sharding tests can
build a 2x2x2 data/fsdp/tensor mesh without a TPU or GPU.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tokenizers trained by the tests are cached in a directory of this process: tests
# never write to the user's home, and pytest-xdist workers never race on one cache.
_CACHE = tempfile.mkdtemp(prefix="unit-scaling-tests-")
os.environ["UNIT_SCALING_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == 8, "tests expect 8 forced CPU devices"
