"""Facts about this machine and process that several layers record or check: the CPU's model
name and feature flags (one reader of /proc/cpuinfo), the process's own peak RSS, the versions
of installed libraries, and environment variables set for the length of a block."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator
from importlib import metadata


def cpu_info() -> dict[str, object]:
    """{"model": CPU model name, "flags": set of /proc/cpuinfo feature flags} (flags empty where
    /proc/cpuinfo cannot be read, e.g. not Linux)."""
    out: dict[str, object] = {"model": platform.processor() or platform.machine(), "flags": set()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return out
    if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
        out["model"] = m.group(1).strip()
    if m := re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M):
        out["flags"] = set(m.group(1).split())
    return out


def peak_rss() -> int:
    """This process's own peak resident set size in bytes, since it started.

    On Linux the high-water mark of its address space (`VmHWM` in /proc/self/status), not
    `getrusage`'s `ru_maxrss`: the kernel carries the peak of the address space a process
    replaces at `exec` into its `ru_maxrss`, so a child started by `spawn` (fork or vfork, then
    exec) reports at least its parent's peak. Elsewhere `ru_maxrss` (bytes on macOS, KiB on
    other systems)."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def start_rss_measure() -> bool:
    """Make what this process holds now its memory baseline: freed heap memory is handed back to
    the system (glibc's `malloc_trim`: memory a measurement before freed, such as the matmul
    peak's matrices, would otherwise stay resident and be counted as baseline), and the peak
    (`VmHWM`) is reset to the current RSS (Linux: `5` written to /proc/self/clear_refs), so
    `peak_rss` then reports the peak of what runs from here. True where the peak was reset;
    False elsewhere, where `peak_rss` keeps the peak since the process started."""
    import gc

    from rpiae.data.heap import release_free_memory

    gc.collect()
    release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where unreadable)."""
    return cpu_info()["flags"]  # type: ignore[return-value]


def dist_version(dist: str) -> str | None:
    """The installed version of a distribution, None where it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def library_versions(dists: tuple[str, ...]) -> dict[str, str]:
    """{"python": version, dist: version} for each installed distribution of `dists`."""
    out = {"python": platform.python_version()}
    out.update({dist: v for dist in dists if (v := dist_version(dist)) is not None})
    return out


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables inside the block; restore (or remove) them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
