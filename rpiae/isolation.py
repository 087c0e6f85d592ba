"""Run one memory-hungry step in a fresh child process.

The ONNX exporter and NVIDIA ModelOpt's INT8 pass each peak at several times the size of the
graph and do not give all of it back (after the paper-size decoder's export, with the model
freed, the process still holds ~4 GB; glibc keeps freed heap). In a child process that memory goes
back to the system when the step ends, so steps do not add up. `spawn`, not `fork`: the parent
may hold torch/OpenMP threads.

The child's standard error passes through the parent (a pipe the parent copies to its own
standard error as it comes), so that when the child ends without a result the parent can say
why: killed by a signal (typically the out-of-memory killer), or exited with an error, whose
last line it quotes. A spawned child re-imports the main script; a script that calls
`run_in_child` (e.g. `rpiae.verify.export_bundle`) at module level, outside
`if __name__ == "__main__":`, makes the child try to start a process of its own while it is
still starting, and the message says so.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import re
import sys
import threading
import time
from collections import deque
from typing import Any, Callable


class ChildProcessDied(RuntimeError):
    """The child process ended without a result (killed, typically by the out-of-memory killer,
    or exited with an error before it could run the step)."""


_START_LOCK = threading.Lock()  # one child start at a time redirects this process's fd 2
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b)(:\s*(.*))?$")
_BOOTSTRAP = "bootstrapping phase"


class _StderrTap:
    """Gives a child started inside `start()` a pipe as its standard error, copies what comes
    through it to this process's standard error, and keeps the last lines."""

    def __init__(self, keep: int = 200) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._thread: threading.Thread | None = None

    def start(self, begin: Callable[[], Any]) -> Any:
        """`begin()` (which starts the child) with fd 2 pointing at the pipe."""
        try:
            sys.stderr.flush()
            read_fd, write_fd = os.pipe()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            return begin()  # no fd 2 to redirect: the child's errors go where they go
        with _START_LOCK:
            try:
                os.dup2(write_fd, 2)
                try:
                    return begin()
                finally:
                    os.dup2(saved, 2)
            finally:
                os.close(write_fd)  # the child (and anything else started meanwhile) holds the write end
                self._thread = threading.Thread(target=self._copy, args=(read_fd, saved), daemon=True)
                self._thread.start()

    def _copy(self, read_fd: int, out_fd: int) -> None:
        partial = b""
        try:
            while chunk := os.read(read_fd, 65536):
                try:
                    os.write(out_fd, chunk)
                except OSError:
                    pass
                *done, partial = (partial + chunk).split(b"\n")
                self.lines.extend(line.decode(errors="replace") for line in done)
        except OSError:
            pass
        finally:
            if partial:
                self.lines.append(partial.decode(errors="replace"))
            os.close(read_fd)
            os.close(out_fd)

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def last_error(self) -> str | None:
        """The child's last `SomeError: message` line (the message's first line when it starts
        on the next one), or its last non-empty line."""
        lines = [line.rstrip() for line in self.lines]
        for i in range(len(lines) - 1, -1, -1):
            m = _ERROR_LINE.match(lines[i].strip())
            if m and not m.group(2).endswith("Warning"):
                message = m.group(4)
                if not message:  # a message that starts on the next line: its first paragraph
                    rest = [line.strip() for line in lines[i + 1:]]
                    while rest and not rest[0]:
                        rest.pop(0)
                    message = " ".join(rest[: rest.index("")] if "" in rest else rest)
                return f"{m.group(1)}: {message}" if message else m.group(1)
        return next((line.strip() for line in reversed(lines) if line.strip()), None)

    def text(self) -> str:
        return "\n".join(self.lines)


def _died(what: str, exitcode: int | None, tap: _StderrTap) -> ChildProcessDied:
    error = tap.last_error()
    if (exitcode is not None and exitcode < 0) or (exitcode is None and not error):
        # a signal (typically the out-of-memory killer's SIGKILL), or an end that left no trace
        return ChildProcessDied(f"{what} was killed before it finished (out of memory?)")
    if _BOOTSTRAP in tap.text():
        return ChildProcessDied(
            f"{what} could not start: its process re-imported the main script, which started another "
            f"process at module level ({error or 'RuntimeError'}); a script that calls rpiae (e.g. "
            'export_bundle) must guard that code with `if __name__ == "__main__":`'
        )
    code = f"exit code {exitcode}" if exitcode is not None else "no exit code"
    if error:
        return ChildProcessDied(f"{what} failed: its process exited with an error ({code}): {error}")
    return ChildProcessDied(f"{what} failed: its process exited ({code}) before it finished")


def _exit_code(procs: list) -> int | None:
    """The exit code of the pool's dead child. The pool's own thread reaps it too: when it wins,
    our wait sees no child and the code appears only once that thread has stored it."""
    deadline = time.monotonic() + 5
    for p in procs:
        p.join(5)
    while True:
        codes = [p.exitcode for p in procs]
        failed = next((c for c in codes if c not in (None, 0)), None)
        if failed is not None or time.monotonic() > deadline or (codes and None not in codes):
            return failed if failed is not None else (codes[0] if codes else None)
        time.sleep(0.01)


def run_in_child(fn: Callable[..., Any], *args: Any, what: str = "a child process") -> Any:
    """`fn(*args)` in a fresh spawned process; its exceptions are re-raised here. A child that
    ends without a result is a `ChildProcessDied` saying how it ended.

    `fn` must be a module-level function and its arguments picklable."""
    tap = _StderrTap()
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        future = tap.start(lambda: pool.submit(fn, *args))
        procs = list((getattr(pool, "_processes", None) or {}).values())  # started by submit (spawn)
        try:
            return future.result()
        except cf.process.BrokenProcessPool:
            exitcode = _exit_code(procs)
            tap.stop()
            raise _died(what, exitcode, tap) from None
        finally:
            tap.stop(0)
