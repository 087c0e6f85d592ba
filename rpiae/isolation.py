"""Run one memory-hungry step in a fresh child process.

The ONNX exporter and NVIDIA ModelOpt's INT8 pass each peak at several times the size of the
graph and do not give all of it back (after the paper-size decoder's export, with the model
freed, the process still holds ~4 GB; glibc keeps freed heap). In a child process that memory goes
back to the system when the step ends, so steps do not add up. `spawn`, not `fork`: the parent
may hold torch/OpenMP threads.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
from typing import Any, Callable


class ChildProcessDied(RuntimeError):
    """The child process ended without a result (killed, typically by the out-of-memory killer)."""


def run_in_child(fn: Callable[..., Any], *args: Any, what: str = "a child process") -> Any:
    """`fn(*args)` in a fresh spawned process; its exceptions are re-raised here.

    `fn` must be a module-level function and its arguments picklable."""
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except cf.process.BrokenProcessPool:
            raise ChildProcessDied(f"{what} was killed before it finished (out of memory?)") from None
