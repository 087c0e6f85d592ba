"""Keep the resident size of long streaming jobs flat, and their model's memory warm.

Batches of latents and images are allocated and freed over and over; glibc's allocator keeps
the freed pages in its arenas, fragmented, so the resident size of a streaming job creeps up
batch after batch although nothing is kept (measured with `rpiae extract`: +76 MB over 1000
images with the shipped model, flat with regular trims). Three glibc calls, which do nothing
where the C library lacks them (musl, macOS, Windows):

- `release_free_memory` (`malloc_trim`), called by `extract` at most every `TRIM_EVERY_S`
  seconds and by `decode` after every batch. A trim also hands back the pages the next
  batch's activations would have reused, so it is not done more often than that;
- `reuse_heap_blocks` (`mallopt`), set by `extract` in the process that runs the model:
  activations up to 32 MB come from the heap and reuse the last batch's pages instead of
  fresh mappings (with glibc's defaults the shipped model's encode calls took 1.7 M page
  faults per 1024 images and 17 % longer than on batches in memory);
- `mmap_large_blocks` (`mallopt`), set in each DataLoader worker, whose photos and crops are
  large, short-lived blocks that should go back to the OS at once.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time

TRIM_EVERY_S = 2.0  # how often `extract` trims
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # the largest value glibc accepts on 64-bit
INT_MAX = 2**31 - 1  # mallopt takes a C int

_last_trim = 0.0


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply (parameter, value) pairs with glibc's mallopt; False where it is missing or refuses."""
    mallopt = getattr(_libc(), "mallopt", None)
    return mallopt is not None and all(bool(mallopt(param, value)) for param, value in settings)


def mmap_large_blocks(threshold: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold` bytes or more by its own mmap, so that freeing it
    returns it to the OS at once. glibc otherwise raises its threshold (up to 32 MB) after the
    first large free, and batches of images (12 MB for 16 crops) land in the heap, where they
    fragment it. Set for the whole process; False where the C library has no mallopt."""
    # a worker forked from a process that called `reuse_heap_blocks` shrinks its heap again
    return _mallopt((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, 128 << 10))


def reuse_heap_blocks(threshold: int = MMAP_THRESHOLD_MAX) -> bool:
    """For the process that runs the model: serve blocks below `threshold` from the heap and
    never shrink it on `free`, so that each batch's activations reuse the pages of the last
    one. glibc's defaults map a fresh region for every large activation until its dynamic
    threshold has grown, and give the heap's top back on free; either way the next batch
    touches new pages (measured with `rpiae extract` and the shipped model: 1.7 M page faults
    over 1024 images and encode calls 17 % slower; 0.2 M with this). The heap is still
    returned to the OS by `release_free_memory`. False where the C library has no mallopt."""
    return _mallopt((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, INT_MAX))


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
