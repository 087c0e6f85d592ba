"""Training data: an image folder, resized (short side, bicubic) and randomly cropped.

Two pipelines (`TrainConfig.image_pipeline`):

- "pil", the authors' (torchvision's ImageFolder loader, `Resize(size, BICUBIC)` on the PIL
  image, `RandomCrop`, `ToTensor`): the file as 8-bit RGB (`convert("RGB")`, no EXIF
  rotation), resized by PIL's bicubic to a short side of `size` and a long side of
  int(size * long / short) (truncated), cropped, then / 255.
- "torch", ours before: EXIF rotation, float pixels (16-bit and alpha as `imageio.to_rgb_float`
  reads them), torch's bicubic (antialiased when shrinking), the long side rounded.

Augmentation randomness comes from a generator seeded by (seed, epoch, sample index), so a
run resumed mid-epoch sees exactly the crops it would have seen.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from rpiae.imageio import ImageError, find_images, load_image, resize_short, to_rgb_float

TRAIN_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _decode(path: Path) -> torch.Tensor:
    """The "torch" pipeline's decode: EXIF rotation, float (3, H, W) in [0, 1]."""
    with Image.open(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        arr = to_rgb_float(img)
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError("empty image")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


def _decode_rgb8(path: Path) -> Image.Image:
    """The "pil" pipeline's decode, torchvision's `pil_loader`: 8-bit RGB, no EXIF rotation."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    if min(rgb.size) < 1:
        raise ValueError("empty image")
    return rgb


def resize_short_pil(img: Image.Image, size: int) -> Image.Image:
    """torchvision's `Resize(size, BICUBIC)` of a PIL image: the short side to `size`, the long
    side to int(size * long / short) (truncated), PIL's bicubic (which filters when shrinking)."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.BICUBIC)


def pil_to_float(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float (3, H, W) in [0, 1] (torchvision's `ToTensor`)."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()).float() / 255.0


def jitter_colour(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation of (3, H, W) in [0, 1], in that order, each scaled
    by a factor drawn from [1 - strength, 1 + strength]."""
    f = 1.0 + strength * (2.0 * torch.rand(3, generator=g) - 1.0)
    x = x * f[0]  # brightness
    x = (x - x.mean()) * f[1] + x.mean()  # contrast (around the mean intensity)
    gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
    x = (x - gray) * f[2] + gray  # saturation
    return x.clamp(0.0, 1.0)


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images under a folder -> float (3, crop, crop) in [0, 1].

    An unreadable file is skipped with a warning (the next readable file is used in its
    place) and counted in `skipped`; a run never crashes on one.
    """

    def __init__(
        self,
        folder: str | Path,
        crop: int = 256,
        resize_min: int = 384,
        resize_max: int = 384,
        hflip: bool = False,
        seed: int = 0,
        epoch_size: int = 0,
        color_jitter: float = 0.0,
        pipeline: str = "pil",
    ) -> None:
        if pipeline not in ("pil", "torch"):
            raise ValueError(f"unknown image pipeline {pipeline!r}; choose pil or torch")
        self.files = find_images(folder, TRAIN_SUFFIXES)
        if not self.files:
            raise ImageError(f"{folder}: no images (jpg/png/webp) found")
        self.pipeline = pipeline
        self.crop, self.resize_min, self.resize_max = crop, resize_min, resize_max
        self.hflip, self.seed, self.epoch = hflip, seed, 0
        self.color_jitter = color_jitter
        self.epoch_size = epoch_size or len(self.files)
        self.bad: set[str] = set()

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.epoch_size

    def _read(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        """The first readable file from `index` on, decoded per the pipeline, and how many
        unreadable ones were met first."""
        n, newly_bad = len(self.files), 0
        decode = _decode_rgb8 if self.pipeline == "pil" else _decode
        for k in range(n):
            path = self.files[(index + k) % n]
            if str(path) in self.bad:
                continue
            try:
                return decode(path), newly_bad
            except Exception as e:  # corrupt, truncated, not an image, unreadable
                self.bad.add(str(path))
                newly_bad += 1
                warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})", stacklevel=2)
        raise ImageError("no readable images left in the training folder")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, number of unreadable files first met while producing it)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 100_003 + index)
        img, newly_bad = self._read(index % len(self.files))
        size = int(torch.randint(self.resize_min, self.resize_max + 1, (1,), generator=g))
        x = pil_to_float(resize_short_pil(img, size)) if self.pipeline == "pil" else resize_short(img, size)
        _, h, w = x.shape  # (3, H, W), short side `size`
        top = int(torch.randint(0, h - self.crop + 1, (1,), generator=g))
        left = int(torch.randint(0, w - self.crop + 1, (1,), generator=g))
        x = x[:, top : top + self.crop, left : left + self.crop]
        if self.hflip and bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(-1)
        if self.color_jitter > 0:
            x = jitter_colour(x, self.color_jitter, g)
        return x.contiguous(), newly_bad


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded over ranks, optionally starting mid-epoch."""

    def __init__(self, length: int, batch_per_rank: int, rank: int = 0, world: int = 1, seed: int = 0) -> None:
        self.length, self.batch, self.rank, self.world, self.seed = length, batch_per_rank, rank, world, seed
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self) -> int:
        return self.length // (self.batch * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
        order = torch.randperm(self.length, generator=g)
        per_rank = self.batches_per_epoch() * self.batch
        mine = order[: per_rank * self.world][self.rank :: self.world]
        return iter(mine[self.start_batch * self.batch :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch


def load_eval_images(folder: str | Path, limit: int = 0, size: int = 256) -> tuple[torch.Tensor, list[Path], int]:
    """Held-out images, per the inference policy (short side 256, centre crop).

    Returns (images (N, 3, size, size), their paths, number of unreadable files skipped).
    """
    images, paths, skipped = [], [], 0
    for p in find_images(folder, TRAIN_SUFFIXES):
        try:
            images.append(torch.from_numpy(load_image(p, size)))
            paths.append(p)
        except ImageError as e:
            warnings.warn(f"skipping unreadable held-out image: {e}", stacklevel=2)
            skipped += 1
        if limit and len(images) >= limit:
            break
    if not images:
        raise ImageError(f"{folder}: no readable held-out images")
    return torch.stack(images), paths, skipped
