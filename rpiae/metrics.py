"""Reconstruction metrics, per image, on float images (N, 3, H, W) in [0, 1].

- `psnr`: the RPiAE authors' definition (`src/eval`): `20 * log10(1 / sqrt(mse))` per image,
  mse clamped at 1e-10.
- `ssim`: theirs too, torchmetrics' `structural_similarity_index_measure` (Gaussian 11x11
  window, sigma 1.5, data range 1), per image.
- `patch_border_ratio`: how visible a decoder's patch grid is. The mean absolute luminance
  step between neighbouring pixels that straddle a patch border (pixel columns/rows
  `k * patch - 1 | k * patch`), divided by the mean step between all other neighbours; both
  horizontal and vertical steps count. About 1.0 for natural images; a decoder whose patches
  do not join up scores well above 1.
"""

from __future__ import annotations

import numpy as np

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _as_batch(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got shape {a.shape}")
    return a


def psnr(recon, target) -> np.ndarray:
    """Per-image PSNR in dB, (N,). Inputs are used as given (clamp/quantise beforehand)."""
    r, t = _as_batch(recon), _as_batch(target)
    mse = np.maximum(((r - t) ** 2).mean(axis=(1, 2, 3)), 1e-10)
    return 20.0 * np.log10(1.0 / np.sqrt(mse))


def ssim(recon, target) -> np.ndarray:
    """Per-image SSIM, (N,): torchmetrics' `structural_similarity_index_measure`, data range 1."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    r, t = (torch.from_numpy(_as_batch(a)) for a in (recon, target))
    return structural_similarity_index_measure(r, t, data_range=1.0, reduction="none").numpy()


def patch_border_ratio(images, patch: int = 16) -> np.ndarray:
    """Per-image ratio of the luminance step across patch borders to the step elsewhere, (N,)."""
    a = _as_batch(images)
    y = np.tensordot(np.asarray(LUMA), a, axes=([0], [1]))  # (N, H, W)
    dx = np.abs(np.diff(y, axis=2))  # (N, H, W-1): step between columns j and j+1
    dy = np.abs(np.diff(y, axis=1))  # (N, H-1, W)
    on_x = (np.arange(dx.shape[2]) % patch) == patch - 1
    on_y = (np.arange(dy.shape[1]) % patch) == patch - 1
    if not on_x.any() or not on_y.any():
        raise ValueError(f"images of {a.shape[2]}x{a.shape[3]} have no {patch}-pixel patch borders")
    on = np.concatenate([dx[:, :, on_x].reshape(len(a), -1), dy[:, on_y, :].reshape(len(a), -1)], axis=1)
    off = np.concatenate([dx[:, :, ~on_x].reshape(len(a), -1), dy[:, ~on_y, :].reshape(len(a), -1)], axis=1)
    return on.mean(axis=1) / np.maximum(off.mean(axis=1), 1e-12)
