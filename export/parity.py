"""Parity of every graph against PyTorch, with the tolerances in one place.

Reference: eager PyTorch FP32 on the same weights. Per precision:
- fp32: latent max|diff| <= 1e-4 * max|z|, per-image cosine >= 0.99999, decoded PSNR >= 60 dB
- fp16: decoded image PSNR >= 40 dB against the FP32 reference
- int8: reconstruction PSNR against the input photos within 1 dB of FP32's
Decoded/reconstructed images are clamped to [0, 1] before PSNR (what a user saves).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rpiae.engines.base import Backend
from rpiae.imageio import psnr

TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"latent_max_abs_rel": 1e-4, "latent_cosine_min": 0.99999, "decoded_psnr_db": 60.0},
    "fp16": {"decoded_psnr_db": 40.0},
    "bf16": {"decoded_psnr_db": 30.0},
    "int8": {"recon_psnr_drop_db": 1.0},
}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def _psnr_batch(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image PSNR, images clamped to [0, 1]."""
    a, b = np.clip(a, 0, 1), np.clip(b, 0, 1)
    return float(np.mean([min(psnr(x, y), 150.0) for x, y in zip(a, b)]))


def reference_outputs(reference: Backend, images: np.ndarray) -> dict[str, np.ndarray]:
    z = reference.encode(images)
    y = reference.decode(z)
    return {"latent": z, "decoded": y}


def compare(candidate: Backend, images: np.ndarray, ref: dict[str, np.ndarray], precision: str) -> dict[str, Any]:
    """Metrics of `candidate` against the FP32 reference outputs, with pass/fail."""
    z_ref, y_ref = ref["latent"], ref["decoded"]
    z = candidate.encode(images)
    y = candidate.decode(z_ref)  # decode graph alone, on the reference latent
    recon = candidate.decode(z)  # the candidate's full round trip
    max_abs = float(np.abs(z - z_ref).max())
    metrics = {
        "batch": int(len(images)),
        "latent_max_abs": max_abs,
        "latent_max_abs_rel": max_abs / float(np.abs(z_ref).max()),
        "latent_cosine_min": float(_cosines(z, z_ref).min()),
        "decoded_psnr_db": _psnr_batch(y, y_ref),
        "recon_psnr_db": _psnr_batch(recon, images),
        "reference_recon_psnr_db": _psnr_batch(y_ref, images),
    }
    metrics["recon_psnr_drop_db"] = metrics["reference_recon_psnr_db"] - metrics["recon_psnr_db"]
    checks = {}
    for key, bound in TOLERANCES.get(precision, {}).items():
        value = metrics[key]
        ok = value <= bound if key in ("latent_max_abs_rel", "recon_psnr_drop_db") else value >= bound
        checks[key] = {"value": value, "bound": bound, "ok": bool(ok)}
    return {"precision": precision, "metrics": metrics, "checks": checks, "ok": all(c["ok"] for c in checks.values())}
