"""One process of the two-process localhost tests (`test_multihost.py`).

Usage: python -m tests.multihost_worker PROCESS_ID NUM_PROCESSES PORT WORKDIR [KILL_AT]
Each process has 4 CPU devices; together they run the toy loop on an 8-device mesh,
each feeding its half of every global batch. With KILL_AT, process 0 alone receives
SIGTERM when it draws batch KILL_AT; the process exits with the loop's status.
"""

import os
import sys

process_id, num_processes, port, workdir = sys.argv[1:5]
kill_at = int(sys.argv[5]) if len(sys.argv) > 5 else None
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
    process_id=int(process_id), initialization_timeout=60,
)

from tests import helpers  # noqa: E402
from unit_scaling.train import loop  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
batches = helpers.Batches(shard=(jax.process_index(), jax.process_count()),
                            kill_at=kill_at if jax.process_index() == 0 else None)
try:
    loop.run(helpers.toy_loop_config(), workdir, helpers.make_task_factory(batches))
except loop.Preempted as e:
    print(f"process {jax.process_index()}: {e}")
    jax.distributed.shutdown()
    sys.exit(e.exit_code)
jax.distributed.shutdown()
