"""Give freed heap memory back to the operating system during long streaming jobs.

`release_free_memory` (glibc's `malloc_trim`) is called by `extract` at most every
`TRIM_EVERY_S` seconds and by `decode` after every batch; `mmap_large_blocks` is set in each
DataLoader worker, whose photos and crops are large, short-lived blocks (not in the process
that runs the model: there it would turn every large activation into an mmap, 20 % slower).

Batches of latents and images are allocated and freed over and over; glibc's allocator keeps
the freed pages in its arenas, fragmented, so the resident size of a streaming job creeps up
batch after batch although nothing is kept (measured with `rpiae extract`: +76 MB over 1000
images with the shipped model, flat with a trim after each shard). `malloc_trim(0)` returns
those pages; it is glibc's own call, made every few seconds, and absent elsewhere (musl,
macOS, Windows), where this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time

_last_trim = 0.0
TRIM_EVERY_S = 0.5  # how often the streaming jobs trim


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


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
    fragment it. Called once per process (the main one and each DataLoader worker); False
    where the C library has no mallopt."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


@functools.cache
def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)


def release_free_memory(every_s: float = 0.0) -> bool:
    """Return the heap's free pages to the OS, at most once per `every_s` seconds (a trim walks
    the whole heap: once per small batch it cost 8 % of the tiny model's extraction rate);
    False where the C library cannot or when the last trim is more recent."""
    global _last_trim
    trim = _malloc_trim()
    now = time.monotonic()
    if trim is None or now - _last_trim < every_s:
        return False
    trim(0)
    _last_trim = now
    return True
