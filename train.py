r"""Pretrain or fine-tune a unit-scaled model.

  python train.py --config configs/bert.py:tiny --workdir runs/bert-tiny
  python train.py --config configs/causal_lm.py:125m,param=umup,precision=fp8 \
      --workdir runs/lm-125m --config.train.lr=0.03
  python train.py --config configs/finetune.py:kjv --config.init_from=runs/bert-tiny \
      --workdir runs/bert-tiny-kjv

Multi-host (TPU pod slice, multi-node GPU): run the same command on every host with
--multihost; JAX finds the coordinator on TPU, SLURM and Open MPI, otherwise pass
--coordinator_address, --num_processes and --process_id. Rerunning a command resumes
from the latest checkpoint in its --workdir.

Exit status: 0 done; 2 a configuration or input error, printed as one `error:` line
naming the field and the fix (UNIT_SCALING_VERBOSE=1 for the traceback); 143 preempted
by SIGTERM and 130 interrupted by Ctrl-C, each after saving a checkpoint (rerun the
command to resume); 1 anything else.
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from unit_scaling import errors, host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


@errors.reported
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.keep_freed_memory()  # before JAX's CPU client exists: see host_memory.py
    if _MULTIHOST.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from unit_scaling.train import loop, rundir  # after jax.distributed.initialize

    logging.info("process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices())
    try:
        final = loop.run(_CONFIG.value, _WORKDIR.value)
    except loop.Preempted as e:
        if jax.process_index() == 0:
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)
    if jax.process_index() == 0:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items()) if "/" in k and not k.startswith("rms/"))
        print(f"final: {summary}")
        run_dir = rundir.RunDir(_WORKDIR.value)
        print(f"TensorBoard: tensorboard --logdir {run_dir.tensorboard}")
        print(f"metrics: {run_dir.metrics_path}; checkpoints: {run_dir.checkpoints}")


if __name__ == "__main__":
    app.run(main, flags_parser=errors.flags_parser)
