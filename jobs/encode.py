"""`rpiae encode`: image files -> one `.npy` of latents, in input order, streaming.

Images are read and cropped by loader worker processes, batch by batch, and each batch's
latents go straight into a memory-mapped `.npy` under a temporary name, renamed when every
image is in. One unreadable image stops the job, names the file and leaves nothing behind.
For whole datasets (shards, labels, statistics, resume, many GPUs) use `rpiae.jobs.extract`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rpiae.data import STREAM_BATCH
from rpiae.data.sources import files_source, image_loader
from rpiae.engines import Backend
from rpiae.fileio import atomic_file, remove_stale_temps
from rpiae.imageio import DEFAULT_CROP

PROGRESS_FROM = 64  # fewer images than this: no progress bar


class EncodeError(ValueError):
    """An image that cannot be encoded (one line; nothing was written)."""


def _reserve(path: Path) -> None:
    """Allocate the whole (sparse) memory-mapped file now: on a full disk the write through the
    mapping would otherwise die of SIGBUS; here it is an OSError (ENOSPC), reported as one line.
    File systems that cannot preallocate are left as they are."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            return
        raise
    finally:
        os.close(fd)


def encode_files(paths: Sequence[str | Path], output: str | Path, backend: Backend, crop: str = DEFAULT_CROP,
                 workers: int = 0, batch_size: int | None = None, progress: bool = True) -> dict:
    """Encode the images of `paths` (files, or folders searched recursively) with `backend`
    into `output` (.npy, float32 (N, C, H, W), input order). Returns {"images", "shape", "out"}."""
    output = Path(output)
    if output.suffix != ".npy":
        raise ValueError(f"{output}: the output must be a .npy file")
    source = files_source(paths)
    n, step = len(source), batch_size or STREAM_BATCH
    batches = [list(range(i, min(i + step, n))) for i in range(0, n, step)]
    shape = (n, *backend.config.latent_shape)
    remove_stale_temps(output.resolve().parent, name=output.name)  # what a killed encode left
    with atomic_file(output) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        _reserve(tmp)
        loader = image_loader(source, batches, crop, backend.config.image_size, min(workers, len(batches)))
        with tqdm(total=n, unit="img", desc="encode", disable=not progress or n < PROGRESS_FROM) as bar:
            for ids, x, errors in loader:
                bad = next((e for e in errors if e), None)
                if bad:
                    raise EncodeError(f"{bad}; nothing was written")
                out[ids[0] : ids[-1] + 1] = backend.encode(x.numpy())  # numpy in, numpy out
                bar.update(len(ids))
        out.flush()
        del out
    return {"images": n, "shape": shape, "out": str(output)}
