"""Streaming decode: latents -> one 8-bit PNG per latent, and optionally an ADM `.npz`.

Latents are read batch by batch (`LatentFile`), decoded, and written as they come; each PNG
is written atomically, so PNGs already present are complete and a re-run skips them. The
`.npz` of the ADM evaluation suite (uint8 `arr_0`, shape (N, 256, 256, 3)) is packed from the
PNGs afterwards, one image at a time, into a temporary file renamed when complete: it holds
exactly the PNGs' pixels and memory does not grow with N.
"""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rpiae.data.latents import LatentFile
from rpiae.fileio import atomic_file
from rpiae.imageio import save_image


def png_names(ids: np.ndarray, width: int) -> list[str]:
    return [f"{int(i):0{width}d}.png" for i in ids]


def decode_latents(
    latents: LatentFile,
    out_dir: str | Path,
    backend,
    batch_size: int = 32,
    npz: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Decode every latent of `latents` with `backend` (anything with `decode` and `config`)."""
    out_dir = Path(out_dir)
    latents.check(tuple(backend.config.latent_shape))
    width = max(6, len(str(max(len(latents), _last_index(latents)))))
    t0, decoded, kept, all_ids = time.time(), 0, 0, []
    with tqdm(total=len(latents), unit="img", desc="decode", disable=not progress, dynamic_ncols=True) as bar:
        for ids, z in latents.batches(batch_size):
            batch_names = png_names(ids, width)
            all_ids.append(np.asarray(ids, np.int64))
            if not overwrite and all((out_dir / n).is_file() for n in batch_names):
                kept += len(ids)
            else:
                images = backend.decode(z)  # checked first: NaN/Inf stop the run before this batch is written
                out_dir.mkdir(parents=True, exist_ok=True)
                for name, img in zip(batch_names, images):
                    save_image(img, out_dir / name)
                decoded += len(ids)
            bar.update(len(ids))
    summary = {"latents": len(latents), "decoded": decoded, "kept": kept, "out": str(out_dir),
               "seconds": round(time.time() - t0, 2)}
    if npz is not None:
        pack_npz([out_dir / n for n in png_names(np.concatenate(all_ids), width)], npz, progress=progress)
        summary["npz"] = str(npz)
    return summary


def _last_index(latents: LatentFile) -> int:
    if latents.kind == "dir":
        import json

        return int(json.loads((latents.path / "manifest.json").read_text())["samples"]) - 1
    return len(latents) - 1


def pack_npz(pngs: list[Path], out: str | Path, progress: bool = True) -> Path:
    """PNG files (all the same size, RGB) -> `.npz` with uint8 `arr_0` (N, H, W, 3), streamed."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"{out}: the ADM sample file must end in .npz")
    if not pngs:
        raise ValueError("no images to pack")
    with Image.open(pngs[0]) as first:
        h, w = first.height, first.width
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(pngs), h, w, 3)}
    with atomic_file(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for p in tqdm(pngs, unit="img", desc="pack npz", disable=not progress, dynamic_ncols=True):
                    with Image.open(p) as img:
                        a = np.asarray(img.convert("RGB"), dtype=np.uint8)
                    if a.shape != (h, w, 3):
                        raise ValueError(f"{p}: {a.shape[1]}x{a.shape[0]}, the others are {w}x{h}")
                    f.write(a.tobytes())
    return out
