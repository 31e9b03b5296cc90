"""How many CPU threads torch uses for a model, when the user has not said.

Measured on this project's 2-core machine (`benchmarks/bench_shipped.py`, one U-Net pass, and one guided
SD1.5-size U-Net step at 64 x 64 latents, fp32):

- the shipped 7 M-parameter U-Net (one pass of the guided batch of 2 at 16 x 16 latents): 37 ms with 1
  thread and 30 ms with 2 when the machine is idle, but 36 ms and 72 ms while another process keeps one
  core busy: its operations are small, so every parallel region waits for the thread whose core is taken.
  A whole `sdlab txt2img` (14 steps), interleaved medians, 1 against 2 threads: 1.79 / 1.64 s, 1.90 / 1.78 s
  and, in a slow phase of the shared machine, 2.01 / 2.06 s;
- an 860 M-parameter SD1.5 U-Net: 20.0 s per step with 1 thread, 12.1 s with 2 (idle): the matrix products
  are large enough to use every core.

So a large model runs on torch's default (the physical cores); a small one on the cores that are free when it
starts (Linux: the CPUs this process may use less the other runnable tasks, `/proc/loadavg`'s count of
runnable tasks), at most `SMALL_MODEL_THREADS`, at least one. OMP_NUM_THREADS or an explicit count always
wins. The generate commands and `sdlab eval` choose once; the server before every job, so a large model
after a small one gets torch's default back (`DEFAULT_THREADS`, read when this module is imported).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch
from torch import nn

SMALL_MODEL_PARAMETERS = 100_000_000        # below this, only the free cores (see the module docstring)
SMALL_MODEL_THREADS = 2                     # the most a small model gets: more were never measured to help
LOADAVG = Path("/proc/loadavg")
OWN_TASKS = Path("/proc/self/task")        # this process's threads, each with its scheduler state
DEFAULT_THREADS = torch.get_num_threads()   # torch's own choice: the physical cores, or OMP_NUM_THREADS


def free_cores() -> int | None:
    """The CPUs this process may use that no other runnable task wants right now; None where the system
    does not say (no `/proc/loadavg`). Its fourth field is "runnable/total" tasks (threads), this process's
    included: its own runnable threads are not counted against it (torch's OpenMP workers keep spinning,
    runnable, for a while after each parallel region, so right after loading a model the loader's own
    worker made an idle 2-core machine look half busy)."""
    try:
        runnable = int(LOADAVG.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return len(os.sched_getaffinity(0)) - max(runnable - _own_runnable_threads(), 0)


def _own_runnable_threads() -> int:
    """This process's threads in state R (at least one: the caller's); 1 where `/proc/self/task` says nothing."""
    try:
        tasks = list(OWN_TASKS.iterdir())
    except OSError:
        return 1
    running = 0
    for task in tasks:
        try:   # "tid (name) state ...": the name may hold spaces and parentheses
            running += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue   # the thread ended meanwhile
    return max(running, 1)


def threads_for(model: nn.Module, explicit: int | None = None) -> int:
    """The thread count to run `model` with on the CPU."""
    if explicit is not None:
        return explicit
    if os.environ.get("OMP_NUM_THREADS"):
        return DEFAULT_THREADS
    if sum(p.numel() for p in model.parameters()) >= SMALL_MODEL_PARAMETERS:
        return DEFAULT_THREADS
    return max(1, min(free_cores() or 1, SMALL_MODEL_THREADS))


def use_threads_for(model: nn.Module, device: torch.device, explicit: int | None = None) -> None:
    """Set torch's CPU thread count for `model` in the calling thread (nothing to do on an accelerator).

    Each thread has its own count (OpenMP's), but `torch.set_num_threads` also stores it as the one every thread
    takes at its first parallel operation, for good: after a small model's job on the server's worker, an
    `asyncio.to_thread` thread started later (a model load, an extras upscale) would run on its 1-2 threads on
    any machine. So that process-wide count is put back to `DEFAULT_THREADS`, by a thread of its own."""
    if device.type != "cpu":
        return
    count = threads_for(model, explicit)
    torch.get_num_threads()    # this thread's first: takes the process-wide count now, not over `count` later
    torch.set_num_threads(count)
    if count != DEFAULT_THREADS:
        restore = threading.Thread(target=torch.set_num_threads, args=(DEFAULT_THREADS,), name="sdlab-threads")
        restore.start()
        restore.join()


__all__ = ["DEFAULT_THREADS", "SMALL_MODEL_PARAMETERS", "SMALL_MODEL_THREADS", "free_cores", "threads_for", "use_threads_for"]
