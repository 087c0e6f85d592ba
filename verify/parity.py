"""Parity of a bundle's graphs against PyTorch, with the tolerances in one place.

Reference: eager PyTorch FP32 on the same weights. Per precision (`rpiae.precisions`):
- fp32: latent max|diff| <= 1e-4 * max|z|, per-image cosine >= 0.99999, decoded PSNR >= 60 dB
- fp16: decoded image PSNR >= 40 dB against the FP32 reference
- bf16: decoded image PSNR >= 30 dB against the FP32 reference (OpenVINO's bf16 hint)
- int8: reconstruction PSNR against the input photos within 1 dB of FP32's
Decoded/reconstructed images are clamped to [0, 1] before PSNR (what a user saves).

`compare` takes any object with `encode`/`decode` on numpy arrays (an `rpiae.engines`
backend); `verify_bundle` opens the backends by name, which is why this module sits above
the runtimes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rpiae.engines import open_backend
from rpiae.engines.base import Backend, PrecisionUnsupported
from rpiae.export.bundle import Bundle, BundleError
from rpiae.export.backends import BUNDLE_DEFAULT, REFERENCE, backend_info, runnable
from rpiae.export.manifest import KIND_ONNX
from rpiae.export.targets import FILE_KIND_TARGET
from rpiae.metrics import psnr
from rpiae.precisions import TOLERANCES  # declared with each precision

AT_MOST = ("latent_max_abs_rel", "recon_psnr_drop_db")  # the bounds that are upper bounds
MAX_PSNR_DB = 150.0  # per image, where two outputs are identical


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def _psnr_batch(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over images of the per-image PSNR, images clamped to [0, 1]."""
    return float(np.mean(psnr(np.clip(a, 0, 1), np.clip(b, 0, 1), max_db=MAX_PSNR_DB)))


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
        ok = value <= bound if key in AT_MOST else value >= bound
        checks[key] = {"value": value, "bound": bound, "ok": bool(ok)}
    return {"precision": precision, "metrics": metrics, "checks": checks, "ok": all(c["ok"] for c in checks.values())}


def repeat_to(images: np.ndarray, batch: int) -> np.ndarray:
    """`batch` images: `images` repeated (and cut) to that count."""
    reps = -(-batch // len(images))
    return np.concatenate([images] * reps)[:batch]


def verify_bundle(
    bundle: Bundle | str | Path,
    backend: str = BUNDLE_DEFAULT,
    images: np.ndarray | None = None,
    batches: list[int] | None = None,
    precisions: list[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every precision of `bundle` on `backend` (opened with its keyword `options`) against
    eager PyTorch FP32.

    Without `precisions`, a precision this machine cannot run (`PrecisionUnsupported`: OpenVINO's
    bf16 on a CPU without bf16) is reported as skipped with the reason; one asked for is an error."""
    asked = precisions is not None
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    if images is None:
        from rpiae.samples import sample_photos

        images = sample_photos()[1]
    batches = batches or [len(images)]
    info = backend_info(backend)
    kind = KIND_ONNX if info.from_weights else info.runs  # from weights: the bundle's ONNX precisions
    precisions = precisions or (bundle.precisions(kind) if info.from_weights else runnable(backend, bundle.precisions(kind)))
    if not precisions:
        raise BundleError(f"bundle {bundle.root} has no {kind} files to verify; build them with "
                          f"`rpiae export --target {FILE_KIND_TARGET[kind]}`")
    reference: Backend = open_backend(bundle, REFERENCE, "fp32", device)
    results = []
    jobs = [(p, b) for p in precisions for b in batches]
    unsupported: dict[str, str] = {}
    for precision, batch in tqdm(jobs, desc=f"verify {backend}", unit="run", disable=not progress):
        if precision in unsupported:
            continue
        try:
            cand = open_backend(bundle, backend, precision, device, **(options or {}))
        except PrecisionUnsupported as e:
            if asked:
                raise
            unsupported[precision] = str(e)
            results.append({"precision": precision, "backend": backend, "device": device, "status": "skipped",
                            "reason": str(e), "checks": {}, "ok": None})
            continue
        x = repeat_to(images, batch)
        ref = reference_outputs(reference, x)
        with cand:
            row = compare(cand, x, ref, precision)
            providers = cand.describe().get("providers")  # what actually ran (ONNX Runtime)
        row.update(backend=backend, device=device, **({"providers": providers} if providers else {}))
        results.append(row)
    ran = [r for r in results if r.get("status") != "skipped"]
    return {"bundle": str(bundle.root), "results": results, "ok": bool(ran) and all(r["ok"] for r in ran)}


def record_parity(bundle: Bundle, rows: list[dict[str, Any]]) -> None:
    """Put `rows` into the manifest's parity list, replacing earlier rows of the same backend and
    device (the manifest is written by the caller)."""
    measured = {(r.get("backend"), r.get("device")) for r in rows}
    kept = [r for r in bundle.manifest.parity if (r.get("backend"), r.get("device")) not in measured]
    bundle.manifest.parity = kept + rows
