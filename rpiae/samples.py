"""Real photos available offline (scikit-image and scikit-learn ship them), for demos,
INT8 calibration and accuracy checks when the user has no folder of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rpiae.imageio import fit_square, save_image

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
SKLEARN_PHOTOS = ("china", "flower")


def sample_photos_uint8() -> dict[str, np.ndarray]:
    """name -> (H, W, 3) uint8, native sizes."""
    try:
        from skimage import data
    except ImportError:
        raise RuntimeError("sample photos need scikit-image (pip install scikit-image)") from None
    photos = {name: getattr(data, name)()[..., :3] for name in SKIMAGE_PHOTOS}
    try:
        from sklearn.datasets import load_sample_images

        for name, img in zip(SKLEARN_PHOTOS, load_sample_images().images):
            photos[name] = img
    except ImportError:
        pass
    return photos


def sample_photos(size: int = 256) -> tuple[list[str], np.ndarray]:
    """(names, (N, 3, size, size) float32 in [0, 1]) through the standard image policy."""
    names, arrays = [], []
    for name, img in sample_photos_uint8().items():
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float() / 255.0
        arrays.append(fit_square(x, size).numpy())
        names.append(name)
    return names, np.stack(arrays)


def write_sample_photos(out: str | Path, size: int = 256) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names, images = sample_photos(size)
    return [save_image(img, out / f"{name}.png") for name, img in zip(names, images)]
