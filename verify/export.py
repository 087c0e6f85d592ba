"""Exports that prove themselves: each builds with `rpiae.export` and records the result of
running what it built against PyTorch in the bundle's manifest (`manifest.parity`).

- `export_bundle`: `build_bundle` + ONNX Runtime (CPU) parity of every precision, measured on
  the complete bundle before it is committed;
- `package_bundle`: `compile_packages` + the AOTInductor packages' parity on their device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rpiae.export.aoti import PRECISION, compile_packages
from rpiae.export.build import build_bundle
from rpiae.export.bundle import Bundle
from rpiae.export.profile import BatchProfile
from rpiae.export.spec import GRAPHS, graph_spec
from rpiae.model import RPiAE
from rpiae.verify.parity import record_parity, verify_bundle

PARITY_IMAGES = 4


def _photos() -> np.ndarray:
    from rpiae.samples import sample_photos

    return sample_photos()[1][:PARITY_IMAGES]


def export_bundle(
    checkpoint: str | Path | RPiAE | None,
    out: str | Path,
    *,
    parity_images: np.ndarray | None = None,
    **build_options: Any,
) -> Bundle:
    """`rpiae.export.build_bundle` (same keyword options: precisions, calib, calib_count,
    int8_high_precision, overwrite, progress, latent_stats) with parity against PyTorch
    measured on ONNX Runtime's CPU provider and recorded in the manifest. Parity images:
    `parity_images`, else the first calibration images, else the shipped sample photos."""

    def measure(bundle: Bundle, calibration: np.ndarray | None) -> None:
        images = parity_images if parity_images is not None else (
            calibration[:PARITY_IMAGES] if calibration is not None else _photos())
        record_parity(bundle, verify_bundle(bundle, "ort", images=images, batches=[len(images)])["results"])

    return build_bundle(checkpoint, out, check=measure, **build_options)


def package_bundle(bundle: Bundle | str | Path, device: str = "cpu", profile: BatchProfile = BatchProfile(),
                   parity: bool = True, **compile_options) -> Bundle:
    """`rpiae.export.aoti.compile_packages` (same options), then, with `parity` and both graphs
    compiled, the packages against eager PyTorch FP32 at the ONNX FP32 tolerances."""
    bundle = compile_packages(bundle, device=device, profile=profile, **compile_options)
    if not parity or set(compile_options.get("graphs", GRAPHS)) != set(GRAPHS):
        return bundle
    try:
        images = _photos()
    except (ImportError, RuntimeError):  # scikit-image missing: seeded random images
        images = graph_spec(bundle.config, "encode").sample(PARITY_IMAGES).numpy()
    batch = min(max(len(images), profile.min), profile.max)
    rows = verify_bundle(bundle, backend="aoti", images=images, batches=[batch], precisions=[PRECISION],
                         device=device)["results"]
    record_parity(bundle, rows)
    bundle.write_manifest()
    return bundle
