"""Give freed heap memory back to the operating system during long streaming jobs.

Batches of latents and images are allocated and freed over and over; glibc's allocator keeps
the freed pages in its arenas, fragmented, so the resident size of a streaming job creeps up
batch after batch although nothing is kept (measured with `rpiae extract`: +76 MB over 1000
images with the shipped model, flat with regular trims). Two glibc calls keep it flat, and
do nothing where the C library lacks them (musl, macOS, Windows):

- `release_free_memory` (`malloc_trim`), called by `extract` at most every `TRIM_EVERY_S`
  seconds and by `decode` after every batch;
- `mmap_large_blocks` (`mallopt`), set in each DataLoader worker, whose photos and crops are
  large, short-lived blocks. Not in the process that runs the model: there it would turn every
  large activation into an mmap (measured 20 % slower).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time

TRIM_EVERY_S = 0.5  # how often `extract` trims
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

_last_trim = 0.0


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def mmap_large_blocks(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more by its own mmap, so that freeing it
    returns it to the OS at once. glibc otherwise raises its threshold (up to 32 MB) after the
    first large free, and batches of images (12 MB for 16 crops) land in the heap, where they
    fragment it. Set for the whole process; False where the C library has no mallopt."""
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_memory(every_s: float = 0.0) -> bool:
    """Return the heap's free pages to the OS, at most once per `every_s` seconds (a trim walks
    the whole heap: once per small batch it cost 8 % of the tiny model's extraction rate);
    False where the C library cannot or when the last trim is more recent."""
    global _last_trim
    trim = getattr(_libc(), "malloc_trim", None)
    now = time.monotonic()
    if trim is None or now - _last_trim < every_s:
        return False
    trim(0)
    _last_trim = now
    return True
