"""Image I/O policy, shared by every backend (the graphs take exactly 256x256 float RGB).

How a file becomes the model input is a named crop policy, applied identically before any
backend runs. Unreadable, corrupt or truncated files raise `ImageError` naming the file.

`adm` (the default): what the RPiAE authors do for training, evaluation and DiT training,
i.e. torchvision's ImageFolder loader and ADM's `center_crop_arr` (guided-diffusion):

1. `Image.open(f).convert("RGB")`: no EXIF rotation; alpha is dropped; grayscale replicated.
2. While the short side is >= 2 x 256, halve the image with `Image.BOX`.
3. Resize with `Image.BICUBIC` so that the short side is 256 (`round(side * 256 / short)`).
4. Take the centre 256x256 (top-left `(h - 256) // 2, (w - 256) // 2`); then `/ 255`.

A 256x256 RGB image passes through untouched. These are the authors' exact uint8 pixels.
So are their failures: Pillow's `convert("RGB")` clips 16-bit and 32-bit integer grayscale
(`I;16`, `I`) at 255, which turns most such images white. `adm` keeps that (it is what the
authors' model saw) and warns once per process; `torch-aa` scales 16-bit to [0, 1].

`torch-aa`: decoded with Pillow, EXIF orientation applied; grayscale replicated; alpha
composited over white; 8-bit / 255, 16-bit / 65535, float clipped, kept in float32; the short
side resized to 256 by torch's antialiased bicubic, then the centre 256x256.

Both policies refuse an image so elongated that scaling its short side to 256 would make a
resized image of more than `MAX_RESIZED_PIXELS` (2^25: an aspect ratio over 512:1 at 256; a
1x20000 line would need 256x5120000): `ImageError` naming the file, which `--skip-bad` skips.
Every other image goes through exactly the steps above.

(The model itself then resizes to 224 for the encoder: that step is part of the graph.)
Outputs are clamped to [0, 1] and quantised to 8-bit PNG (the model does not clamp).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from rpiae.fileio import atomic_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
CROPS = ("adm", "torch-aa")  # the crop policies; the first is the default
DEFAULT_CROP = CROPS[0]


MAX_RESIZED_PIXELS = 1 << 25  # the largest intermediate image a crop policy makes (see the module docstring)


class ImageError(ValueError):
    """An input image that cannot be used."""


def resized_size(width: int, height: int, size: int = 256, crop: str = DEFAULT_CROP) -> tuple[int, int]:
    """(width, height) of the intermediate image `crop` makes before its centre crop: ADM's BOX
    halvings then the short side scaled to `size`; torch-aa's short side scaled to `size`."""
    w, h = width, height
    if crop == "adm":
        while min(w, h) >= 2 * size:
            w, h = w // 2, h // 2
        scale = size / min(w, h)
        return round(w * scale), round(h * scale)
    scale = size / min(w, h)
    return max(size, round(w * scale)), max(size, round(h * scale))


def check_resizable(width: int, height: int, size: int = 256, crop: str = DEFAULT_CROP, name: str | None = None) -> None:
    """Refuse an image whose resize would exceed `MAX_RESIZED_PIXELS` (an extreme aspect ratio)."""
    if min(width, height) < 1:
        return
    rw, rh = resized_size(width, height, size, crop)
    if rw * rh > MAX_RESIZED_PIXELS:
        raise ImageError(f"{name or 'image'}: {width}x{height} is too elongated to crop: scaling its short side to "
                         f"{size} makes {rw}x{rh}, over {MAX_RESIZED_PIXELS} pixels (aspect ratio over "
                         f"{MAX_RESIZED_PIXELS // (size * size)}:1)")


def to_rgb_float(img: Image.Image) -> np.ndarray:
    """A decoded PIL image -> float32 (H, W, 3) in [0, 1], per the policy above."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float32) / 65535.0
        a = np.clip(a, 0.0, 1.0)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "F":
        a = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
        return np.repeat(a[..., None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        return rgb * alpha + (1.0 - alpha)  # over white
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def resize_short(x: torch.Tensor, size: int, antialias: bool | None = None) -> torch.Tensor:
    """(3, H, W) -> (3, H', W') with the short side `size`: torch's bicubic, antialiased always
    (True), never (False) or only when shrinking (None); clamped to [0, 1]. A tensor already at
    that size comes back as it is."""
    _, h, w = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) == (h, w):
        return x
    aa = scale < 1 if antialias is None else antialias
    return F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=aa)[0].clamp(0.0, 1.0)


def fit_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size): short side to `size` (bicubic, antialiased), centre crop."""
    x = resize_short(x, size, antialias=True)  # (3, >= size, >= size)
    _, h, w = x.shape
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top : top + size, left : left + size]


def adm_center_crop(img: Image.Image, size: int = 256) -> Image.Image:
    """ADM's `center_crop_arr`: BOX halving while the short side >= 2 * size, BICUBIC to a
    short side of `size`, centre crop. Returns a PIL image of size x size."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top : top + size, left : left + size])


_WIDE_GRAY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_warned_wide_gray = False


def _warn_wide_gray(img: Image.Image, name: str | None = None) -> None:
    global _warned_wide_gray
    if img.mode in _WIDE_GRAY and not _warned_wide_gray:
        _warned_wide_gray = True
        import warnings

        name = name or getattr(img, "filename", "") or "an image"
        warnings.warn(f"{name}: {img.mode} grayscale under --crop adm is clipped at 255 by Pillow's RGB conversion, as "
                      "in the RPiAE authors' loader (mostly white); --crop torch-aa scales 16-bit to [0, 1] "
                      "(said once per process)", stacklevel=3)


def crop_image(img: Image.Image, size: int = 256, crop: str = DEFAULT_CROP, name: str | None = None) -> np.ndarray:
    """A PIL image as opened from a file -> float32 (3, size, size) in [0, 1], per `crop`.
    `name`: the file or sample, for messages (default: the file Pillow opened)."""
    if crop in CROPS:
        check_resizable(img.width, img.height, size, crop, name or getattr(img, "filename", "") or None)
    if crop == "adm":
        _warn_wide_gray(img, name)
        arr = np.asarray(adm_center_crop(img.convert("RGB"), size), dtype=np.float32) / 255.0
        return np.ascontiguousarray(arr.transpose(2, 0, 1))
    if crop == "torch-aa":
        arr = to_rgb_float(ImageOps.exif_transpose(img))
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError("empty image")
        return fit_square(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), size).numpy()
    raise ValueError(f"unknown crop policy {crop!r}; choose one of: {', '.join(CROPS)}")


def load_image(path: str | Path, size: int = 256, crop: str = DEFAULT_CROP) -> np.ndarray:
    """One image file -> float32 (3, size, size) in [0, 1]."""
    if crop not in CROPS:
        raise ValueError(f"unknown crop policy {crop!r}; choose one of: {', '.join(CROPS)}")
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with Image.open(path) as img:
            img.load()
            if min(img.size) < 1:
                raise ValueError("empty image")
            return crop_image(img, size, crop, str(path))
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_images(paths: Sequence[str | Path], size: int = 256, crop: str = DEFAULT_CROP) -> np.ndarray:
    """Several files -> (N, 3, size, size). Fails on the first bad file, naming it."""
    if not paths:
        raise ImageError("no input images given")
    return np.stack([load_image(p, size, crop) for p in paths])


def walk_folder(root: str | Path, on_error=None, outer: Sequence[str | Path] = ()):
    """`os.walk(root, followlinks=True)` as torchvision's ImageFolder walks, with two guards:
    a symlink back to a folder above it (a loop) is not entered again, and a folder that cannot
    be listed is reported, never dropped in silence: `on_error(path, OSError)` (default: raise
    `ImageError` naming it). `outer`: folders above `root` that count as its ancestors (an
    ImageFolder tree's root for each class walk). Yields (dirpath, dirnames, filenames)."""
    import os

    def report(e: OSError) -> None:
        where = e.filename if e.filename is not None else root
        if on_error is None:
            raise ImageError(f"{where}: cannot list folder ({e.strerror or e})")
        on_error(str(where), e)

    def inode(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    above = {os.fspath(root): frozenset([inode(root), *map(inode, map(os.fspath, outer))])}  # each folder's chain of real folders
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=report):
        chain = above.pop(dirpath, frozenset())
        keep = []
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            try:
                ino = inode(sub)
            except OSError as e:
                report(e)
                continue
            if ino in chain:
                continue  # a symlink loop: this folder is already being walked above
            keep.append(d)
            above[sub] = chain | {ino}
        dirnames[:] = keep
        yield dirpath, dirnames, filenames


def find_images(folder: str | Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Image files (by suffix) under a folder, recursively (symlinked folders followed, loops
    not), sorted as paths. A sub-folder that cannot be listed is an `ImageError` naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a directory")
    found = []
    for dirpath, _, filenames in walk_folder(folder):
        for f in filenames:
            p = Path(dirpath, f)
            if p.suffix.lower() in suffixes and p.is_file():
                found.append(p)
    return sorted(found)


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Float images -> the float values an 8-bit image holds: clamped to [0, 1], rounded to k/255."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def to_8bit(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (any layout) -> uint8 tensor on the CPU: clamped and rounded, as a
    saved PNG holds them."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float (3, H, W) model output -> uint8 (H, W, 3): clamp to [0, 1], round."""
    arr = np.asarray(image, dtype=np.float32)
    if not arr.flags.writeable:  # a read-only view (Ray's object store): torch wants a writable array
        arr = arr.copy()
    return to_8bit(torch.from_numpy(arr)).numpy().transpose(1, 2, 0)


def save_image(image: np.ndarray, path: str | Path) -> Path:
    """Write one model output as an 8-bit PNG, atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        Image.fromarray(to_uint8(image)).save(tmp, format="PNG")
    return path
