"""Reconstruction metrics, per image, on float images (N, 3, H, W) in [0, 1].

- `psnr`: the RPiAE authors' definition (`src/eval`): `20 * log10(1 / sqrt(mse))` per image,
  mse clamped at 1e-10 (scikit-image's PSNR, capped at 100 dB); the one PSNR of the project.
- `ssim`: theirs too, torchmetrics' `structural_similarity_index_measure` (Gaussian 11x11
  window, sigma 1.5, data range 1), per image.
- `patch_border_ratio`: how visible a decoder's patch grid is. The mean absolute luminance
  step between neighbouring pixels that straddle a patch border (pixel columns/rows
  `k * patch - 1 | k * patch`), divided by the mean step between all other neighbours; both
  horizontal and vertical steps count. About 1.0 for natural images; a decoder whose patches
  do not join up scores well above 1.
- `patch_step_profile`: the same steps averaged by their offset inside the patch (offset
  `patch - 1` is the step across a border): where a ratio comes from. A decoder can lower
  the ratio without joining its patches up, by roughening the steps next to each border
  (they count in the denominator); the profile shows that.
- `FeatureMoments`, `frechet_distance`, `fid`: the Fréchet distance between two sets of
  feature vectors (rFID on Inception-v3 pool features) from their moments, which accumulate
  batch by batch in float64 so that no set is ever held whole.
"""

from __future__ import annotations

import numpy as np

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
EVAL_REPORT_FORMAT = "rpiae-eval"  # the "format" of an `rpiae eval --json` report of these metrics


def _as_batch(x) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"expected images (N, 3, H, W), got shape {a.shape}")
    return a


def psnr(recon, target, max_db: float = 100.0) -> np.ndarray:
    """Per-image PSNR in dB, (N,), of images with data range 1: scikit-image's
    `peak_signal_noise_ratio` on float64, capped at `max_db` (100 dB is the authors' mse clamp
    at 1e-10). Inputs are used as given (clamp/quantise beforehand)."""
    from skimage.metrics import peak_signal_noise_ratio

    r, t = _as_batch(recon), _as_batch(target)
    if r.shape != t.shape:
        raise ValueError(f"images of shapes {r.shape} and {t.shape} cannot be compared")
    with np.errstate(divide="ignore"):  # identical images: inf, then the cap
        return np.array([min(float(peak_signal_noise_ratio(b, a, data_range=1.0)), max_db) for a, b in zip(r, t)])


def ssim(recon, target, dtype: str = "float64", chunk: int = 1) -> np.ndarray:
    """Per-image SSIM, (N,): torchmetrics' `structural_similarity_index_measure`, data range 1.

    `dtype="float32"` runs the Gaussian filtering about 8x faster on a CPU (what `rpiae eval`
    uses over whole datasets); the result differs from float64's by about 1e-5. Images are
    measured `chunk` at a time: torchmetrics holds about 50 MB of filtered maps per 256x256
    image (1.6 GB for a batch of 32), and each image's SSIM is its own."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    r, t = _as_batch(recon), _as_batch(target)
    if r.shape != t.shape:
        raise ValueError(f"images of shapes {r.shape} and {t.shape} cannot be compared")
    out = [structural_similarity_index_measure(torch.from_numpy(r[i : i + chunk].astype(dtype)),
                                               torch.from_numpy(t[i : i + chunk].astype(dtype)),
                                               data_range=1.0, reduction="none").double().numpy()
           for i in range(0, len(r), chunk)]
    return np.concatenate(out) if out else np.zeros(0)


def _luma_steps(images, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """|horizontal| (N, H, W-1) and |vertical| (N, H-1, W) luminance steps between neighbouring
    pixels; an error for images too small to hold a `patch`-pixel border."""
    a = _as_batch(images)
    y = np.tensordot(np.asarray(LUMA), a, axes=([0], [1]))  # (N, H, W)
    dx = np.abs(np.diff(y, axis=2))  # (N, H, W-1): step between columns j and j+1
    dy = np.abs(np.diff(y, axis=1))  # (N, H-1, W)
    if dx.shape[2] < patch or dy.shape[1] < patch:
        raise ValueError(f"images of {a.shape[2]}x{a.shape[3]} have no {patch}-pixel patch borders")
    return dx, dy


def patch_border_ratio(images, patch: int = 16) -> np.ndarray:
    """Per-image ratio of the luminance step across patch borders to the step elsewhere, (N,)."""
    dx, dy = _luma_steps(images, patch)
    n = len(dx)
    on_x = (np.arange(dx.shape[2]) % patch) == patch - 1
    on_y = (np.arange(dy.shape[1]) % patch) == patch - 1
    on = np.concatenate([dx[:, :, on_x].reshape(n, -1), dy[:, on_y, :].reshape(n, -1)], axis=1)
    off = np.concatenate([dx[:, :, ~on_x].reshape(n, -1), dy[:, ~on_y, :].reshape(n, -1)], axis=1)
    return on.mean(axis=1) / np.maximum(off.mean(axis=1), 1e-12)


def patch_step_profile(images, patch: int = 16) -> np.ndarray:
    """Mean absolute luminance step between neighbouring pixels by the step's offset within the
    patch, (N, patch): entry k averages the steps from pixel k to k+1 of each patch (horizontal
    and vertical); entry `patch - 1` is the step across a border."""
    dx, dy = _luma_steps(images, patch)
    n = len(dx)
    out = np.empty((n, patch))
    for k in range(patch):
        out[:, k] = np.concatenate([dx[:, :, k::patch].reshape(n, -1), dy[:, k::patch, :].reshape(n, -1)], axis=1).mean(axis=1)
    return out


class FeatureMoments:
    """Mean and covariance of feature vectors (N, D), accumulated batch by batch in float64.

    Holds the count, the running mean and the running sum of centred outer products (D, D);
    each batch is merged with Chan et al.'s pairwise update, so the result equals the
    moments of all vectors at once, whatever the batch sizes. `dim=None`: set by the first batch."""

    def __init__(self, dim: int | None = None) -> None:
        self.count = 0
        self.mean = np.zeros(dim) if dim else None
        self.m2 = np.zeros((dim, dim)) if dim else None

    def update(self, features) -> "FeatureMoments":
        x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features, dtype=np.float64)
        if self.mean is None and x.ndim == 2:
            self.mean, self.m2 = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        if x.ndim != 2 or x.shape[1] != len(self.mean):
            raise ValueError(f"expected features (N, {len(self.mean) if self.mean is not None else 'D'}), got shape {x.shape}")
        if not len(x):
            return self
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or Inf values")
        n_b = len(x)
        mean_b = x.mean(axis=0)
        centred = x - mean_b
        m2_b = centred.T @ centred
        n = self.count + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + np.outer(delta, delta) * (self.count * n_b / n)
        self.mean += delta * (n_b / n)
        self.count = n
        return self

    @property
    def cov(self) -> np.ndarray:
        """The unbiased covariance (`np.cov(x, rowvar=False)`, as FID implementations use)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        return self.m2 / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), with the real part of
    `scipy.linalg.sqrtm`; where the product is singular to working precision the square root
    is taken of (sigma1 + eps I)(sigma2 + eps I) instead, as pytorch-fid and TTUR do."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"moments do not match: means {mu1.shape} {mu2.shape}, covariances {s1.shape} {s2.shape}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(np.real(covmean)))


def fid(a: FeatureMoments, b: FeatureMoments) -> float:
    """The Fréchet distance between two accumulated feature sets."""
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
