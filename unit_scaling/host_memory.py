"""Keep the host allocator's freed memory for the next step, where JAX runs on the CPU.

XLA:CPU allocates each execution's temporaries (511 MiB for the train step of the 8M-param
causal LM in `benchmarks/vs_torch_reference.py`) with malloc, on its worker threads.
glibc gives each such thread its own arena, which can only serve an allocation that large
with a fresh `mmap`, and `free` hands it straight back with `munmap`: every step then
page-faults its whole temp buffer in again, 131k faults and 0.23 s of kernel time per
0.44 s step on a 2-core EPYC. With one arena that never returns memory to the system
and never maps a chunk of its own, the step reuses the same pages: 0 faults, 0.34 s
(idle, and the same next to two busy-loop processes). Reuse is not guaranteed: a
synthetic 64 MiB temporary (`tests/test_host_memory.py`) still mapped anew on about
half its calls under the test suite's parallel load, for reasons not pinned down.

Set `UNIT_SCALING_KEEP_FREED_MEMORY=0` to leave malloc as it is (the price of the
setting: memory a run has freed is not returned to the system until it exits).

This must run before JAX creates its CPU client (the first `jax.devices()`, computation
or `jax.distributed.initialize`): a thread keeps the arena it first allocated from.
It only changes malloc's policy, never a result, and does nothing off glibc, or where an
accelerator plugin is installed and the platform is not forced to the CPU (there the
temporaries live on the device, and the host's threads keep their own arenas).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # bytes free at the top of the heap before glibc returns them: an int
OPT_OUT_ENV = "UNIT_SCALING_KEEP_FREED_MEMORY"
_applied = False


def runs_on_cpu() -> bool:
    """Whether JAX in this process will compute on the CPU, judged without creating a
    backend: JAX_PLATFORMS puts cpu first, or no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")  # how JAX finds them
    return not plugins and not any(importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to one arena that neither maps large chunks nor trims its
    heap, when JAX will run on the CPU (and $UNIT_SCALING_KEEP_FREED_MEMORY is not 0).
    Returns whether it did."""
    global _applied
    if _applied:  # e.g. train.main called once per run of an in-process sweep
        return True
    if os.environ.get(OPT_OUT_ENV, "1").strip() == "0" or not runs_on_cpu():
        return False
    try:
        libc = ctypes.CDLL(None)  # this process's own symbols: libc's, where it is glibc
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl, macOS, Windows: their allocators have other knobs
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else 1
    if threads > 1:  # e.g. JAX's CPU client: its threads keep the arenas they have
        logging.warning("host_memory.keep_freed_memory: called with %d threads running; "
                        "those that already allocated keep their own arenas, so call it "
                        "before JAX computes anything", threads)
    _applied = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM)))
    return _applied
