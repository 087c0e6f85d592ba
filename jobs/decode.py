"""Streaming decode: latents -> one 8-bit PNG per latent, and optionally an ADM `.npz`.

Latents are read batch by batch (`LatentFile`), decoded, and written as they come; each PNG
is written atomically, so PNGs already present are complete and a re-run skips them. The
`.npz` of the ADM evaluation suite (uint8 `arr_0`, shape (N, 256, 256, 3)) is packed from the
PNGs afterwards, one image at a time, into a temporary file renamed when complete: it holds
exactly the PNGs' pixels and memory does not grow with N. `rpiae.jobs.ray_engine` runs the
same batches on a Ray cluster.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rpiae.data import STREAM_BATCH
from rpiae.data.heap import release_free_memory
from rpiae.data.latents import LatentFile
from rpiae.fileio import remove_stale_temps
from rpiae.jobs.pngs import pack_npz, pending, png_names, write_pngs
from rpiae.jobs.ray_engine import RayEngine


def sample_ids(latents: LatentFile) -> np.ndarray:
    """The sample number of every latent, in order (an extract directory's `index`, else the row)."""
    if latents.kind != "dir":
        return np.arange(len(latents))
    from safetensors import safe_open

    out = []
    for path, _ in latents.parts:
        with safe_open(str(path), framework="np") as f:
            out.append(f.get_tensor("index"))
    return np.concatenate(out)


def decode_latents(
    latents: LatentFile,
    out_dir: str | Path,
    backend,
    batch_size: int = STREAM_BATCH,
    npz: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Decode every latent of `latents` with `backend`: an `rpiae.engines` Backend (here) or a
    `RayEngine` (its actors decode, its tasks write the PNGs)."""
    out_dir = Path(out_dir)
    latents.check(tuple(backend.config.latent_shape))
    remove_stale_temps(out_dir)  # PNGs (and .npz parts) a killed run left half-written
    if npz is not None:
        remove_stale_temps(Path(npz).resolve().parent, name=Path(npz).name)
    width = max(6, len(str(max(len(latents), _last_index(latents)))))
    t0 = time.time()
    with tqdm(total=len(latents), unit="img", desc="decode", disable=not progress, dynamic_ncols=True) as bar:
        if isinstance(backend, RayEngine):
            decoded = backend.decode_pngs(latents, out_dir, width, batch_size, overwrite, bar)
            bar.update(len(latents) - decoded)
        else:
            decoded = _decode_pngs(backend, latents, out_dir, width, batch_size, overwrite, bar)
    summary = {"latents": len(latents), "decoded": decoded, "kept": len(latents) - decoded, "out": str(out_dir),
               "seconds": round(time.time() - t0, 2)}
    if npz is not None:
        pack_npz([out_dir / n for n in png_names(sample_ids(latents), width)], npz, progress=progress)
        summary["npz"] = str(npz)
    return summary


def _decode_pngs(backend, latents: LatentFile, out_dir: Path, width: int, batch_size: int, overwrite: bool, bar) -> int:
    decoded = 0
    for ids, z in latents.batches(batch_size):
        names = png_names(ids, width)
        if pending(out_dir, names, overwrite):
            write_pngs(out_dir, names, backend.decode(z))  # checked first: NaN/Inf stop the run before this batch is written
            decoded += len(ids)
            release_free_memory()  # every batch: a trim is cheap next to decoding a batch
        bar.update(len(ids))
    return decoded


def _last_index(latents: LatentFile) -> int:
    if latents.kind == "dir":
        import json

        return int(json.loads((latents.path / "manifest.json").read_text())["samples"]) - 1
    return len(latents) - 1
