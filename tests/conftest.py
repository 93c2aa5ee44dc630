"""Test setup: 8 CPU devices, forced before JAX initialises its backend.

Every test in the suite sees the same 8-device CPU platform, so sharding tests can
build a 2x2x2 data/fsdp/tensor mesh without a TPU or GPU.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == 8, "tests expect 8 forced CPU devices"
