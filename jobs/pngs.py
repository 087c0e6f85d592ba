"""PNG folders: one 8-bit PNG per sample, named by its number, and the ADM evaluation suite's
`.npz` packed from them (uint8 `arr_0`, shape (N, H, W, 3), streamed into a temporary file
renamed when complete). Shared by the decode engines (`rpiae.jobs.decode`, the Ray engine)
and `rpiae eval`."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from rpiae.fileio import atomic_file
from rpiae.imageio import save_image


def png_names(ids: np.ndarray, width: int) -> list[str]:
    return [f"{int(i):0{width}d}.png" for i in ids]


def pending(out_dir: Path, names: list[str], overwrite: bool) -> bool:
    """Whether a batch still needs decoding: some PNG is missing (or `overwrite`)."""
    return overwrite or not all((out_dir / n).is_file() for n in names)


def write_pngs(out_dir: Path, names: list[str], images: np.ndarray) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, img in zip(names, images):
        save_image(img, out_dir / name)


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
