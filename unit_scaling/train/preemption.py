"""Stopping on SIGTERM (a preempted job) or Ctrl-C: the loop saves a checkpoint at
the same step on every host, then raises `Preempted`, whose `exit_code` tells a job
scheduler to rerun the command (which resumes).
"""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np

# Exit statuses of a preempted run (128 + the signal, as shells report a killed job), so
# a job scheduler sees a stop that is neither success nor a crash: rerun to resume.
EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130


class Preempted(Exception):
    """The run stopped on SIGTERM or SIGINT after saving a checkpoint at `step`.
    `exit_code` is `EXIT_PREEMPTED` (SIGTERM) or `EXIT_INTERRUPTED` (Ctrl-C)."""

    def __init__(self, signum: int, step: int, directory):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        super().__init__(
            f"preempted by {signal.Signals(signum).name}: saved step {step} in {directory}; "
            "rerun the same command to resume")


class Preemption:
    """Turns SIGTERM and SIGINT into a flag the loop checks between steps. A second
    Ctrl-C interrupts at once (KeyboardInterrupt), without waiting for the save."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, check_every: int = 1):
        self.signum, self.check_every = 0, check_every

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning("%s: saving a checkpoint and exiting after this step",
                        signal.Signals(signum).name)
        self.signum = signum

    def agreed(self, step: int) -> int:
        """The signal to stop on after `step` (0: none), the same on every process: a
        signal seen by any host stops all of them at the same step, so all save the same
        step. With several processes the hosts agree every `check_every` steps only:
        the all-gather waits for the step to finish, which would otherwise end the
        overlap of one step's dispatch with the previous step's compute."""
        if jax.process_count() == 1:
            return self.signum
        if step % self.check_every:
            return 0
        from jax.experimental import multihost_utils

        return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
