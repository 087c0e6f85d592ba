"""The streaming jobs hand freed heap pages back to the OS (glibc's malloc_trim)."""

import ctypes.util
import sys

import numpy as np
import pytest

from rpiae.data.heap import release_free_memory


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="needs glibc")
def test_release_free_memory_returns_freed_pages():
    # many small blocks below the mmap threshold, freed except for every 64th: the heap keeps
    # the holes (fragmented, as after many batches) until it is trimmed
    blocks = [np.ones(4096, np.uint8) for _ in range(40000)]  # ~160 MB of 4 KiB blocks
    kept = blocks[::64]
    del blocks
    before = _rss_kib()
    assert release_free_memory() is True
    after = _rss_kib()
    assert before - after > 50_000, (before, after)  # at least 50 MB given back
    del kept


_CYCLES = """
import resource, sys
import numpy as np
from rpiae.data.heap import reuse_heap_blocks
if sys.argv[1] == "reuse":
    assert reuse_heap_blocks() is True
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # two live 30 MB blocks per cycle, like the activations of one batch
    live = [np.ones(30 << 20, np.uint8) for _ in range(2)]
    del live
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="needs glibc")
def test_reuse_heap_blocks_reuses_pages_across_batches():
    import subprocess

    # each setting in its own process: mallopt changes the process for good
    faults = {mode: int(subprocess.run([sys.executable, "-c", _CYCLES, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "reuse")}
    # glibc's defaults map (and fault in) fresh pages for these blocks again and again
    assert faults["reuse"] * 5 < faults["default"], faults
