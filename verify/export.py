"""Exports that prove themselves: each builds with `rpiae.export` and records the result of
running what it built against PyTorch in the bundle's manifest (`manifest.parity`).

- `export_target`: `rpiae export --target T` for every target of `rpiae.export.targets`: build ->
  check (the target's `checked_by` backend) -> record;
- `export_bundle`: `build_bundle` + ONNX Runtime (CPU) parity of every precision, measured on
  the complete bundle before it is committed (the `onnx` target);
- `package_bundle`: `compile_packages` + the AOTInductor packages' parity on their device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rpiae.export.aoti import PRECISION, compile_packages
from rpiae.export.build import build_bundle
from rpiae.export.bundle import Bundle, BundleError
from rpiae.export.profile import BatchProfile
from rpiae.export.spec import GRAPHS, graph_spec, parse_precisions
from rpiae.export.targets import ONNX_TARGET, Built, target_info
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
    int8_high_precision, int8_weight_bits, overwrite, progress, latent_stats) with parity against PyTorch
    measured on ONNX Runtime's CPU provider and recorded in the manifest. Parity images:
    `parity_images`, else the first calibration images, else the shipped sample photos."""

    def measure(bundle: Bundle, calibration: np.ndarray | None) -> None:
        images = parity_images if parity_images is not None else (
            calibration[:PARITY_IMAGES] if calibration is not None else _photos())
        rows = verify_bundle(bundle, target_info(ONNX_TARGET).checked_by, images=images, batches=[len(images)])
        record_parity(bundle, rows["results"])

    return build_bundle(checkpoint, out, check=measure, **build_options)


def export_target(
    checkpoint: str | Path | RPiAE | None,
    out: str | Path,
    target: str = ONNX_TARGET,
    *,
    precisions: str | list[str] = ("fp32",),
    profile: BatchProfile = BatchProfile(),
    device: str = "auto",
    overwrite: bool = False,
    latent_stats: str | Path | None = None,
    progress: bool = True,
    target_options: dict[str, Any] | None = None,
    say: Callable[[str], None] | None = None,
    **build_options: Any,
) -> Bundle:
    """`rpiae export --target TARGET`: build -> check -> record, the same for every target.

    1. The ONNX bundle (`export_bundle`, its ONNX Runtime parity recorded), or, for another
       target, an existing bundle at `out` exported from `checkpoint` (reused, `reusable_bundle`).
    2. The target's builder adds its files (`rpiae.export.targets`; `target_options` are its own).
    3. What it built runs on the target's `checked_by` backend on real photos, against eager
       PyTorch FP32; the rows go into the manifest (`manifest.parity`, replacing that backend's
       earlier rows). A failed check is recorded, not raised: callers read `ok` in the rows.
    The target's early check runs first, before minutes of ONNX export; what it notes (how
    `--device auto` was resolved) goes to `say`.
    """
    spec = target_info(target)
    precisions = parse_precisions(precisions)
    device, note = spec.resolve(device)
    if note and say is not None:
        say(note)
    if spec.name != ONNX_TARGET and Bundle.is_bundle(out) and not overwrite:
        bundle = reusable_bundle(out, checkpoint, precisions, latent_stats)
    else:
        bundle = export_bundle(checkpoint, out, precisions=precisions, overwrite=overwrite, latent_stats=latent_stats,
                               progress=progress, **build_options)
    if spec.name == ONNX_TARGET:
        return bundle
    built = spec.build(bundle, precisions, profile, device, progress=progress, **(target_options or {}))
    record_target_parity(bundle, spec.checked_by, built, profile)
    return bundle


def record_target_parity(bundle: Bundle, backend: str, built: Built, profile: BatchProfile = BatchProfile()) -> list[dict]:
    """The check and record steps of an export: `built`'s files run by `backend` on the parity
    photos, at a batch inside `profile`, against PyTorch FP32; the rows recorded in the manifest
    (and returned)."""
    images = _photos_or_seeded(bundle)
    batch = min(max(len(images), profile.min), profile.max)
    rows = verify_bundle(bundle, backend=backend, images=images, batches=[batch], precisions=built.precisions,
                         device=built.device)["results"]
    record_parity(bundle, rows)
    bundle.write_manifest()
    return rows


def reusable_bundle(out: str | Path, checkpoint: str | Path | None, precisions: list[str],
                    latent_stats: str | Path | None) -> Bundle:
    """The bundle at `out`, whose ONNX graphs a target other than onnx reuses: only if it came
    from `checkpoint` (its sha256 is the manifest's source), with these latent statistics and
    every asked precision. Raises BundleError (one line) otherwise."""
    from rpiae.checkpoints import checkpoint_sha256
    from rpiae.engines import check_bundle_latent_stats
    from rpiae.hub import resolve_model

    bundle = Bundle.open(out)
    path = resolve_model(checkpoint)
    source = bundle.manifest.source
    if source.get("sha256") != checkpoint_sha256(path):
        came_from = (f"{source.get('path')} (sha256 {source['sha256'][:12]}...)" if source.get("sha256")
                     else "a model in memory (no source hash)")
        raise BundleError(f"{out} was exported from {came_from}, not from {path}: pass that --checkpoint, "
                          "or --overwrite to export this one")
    check_bundle_latent_stats(bundle, latent_stats)
    missing = [p for p in precisions if p not in bundle.precisions()]
    if missing:
        raise BundleError(f"{out} has no {', '.join(missing)} graphs; re-export with --overwrite")
    return bundle


def _photos_or_seeded(bundle: Bundle) -> np.ndarray:
    try:
        return _photos()
    except (ImportError, RuntimeError):  # scikit-image missing: seeded random images
        return graph_spec(bundle.config, "encode").sample(PARITY_IMAGES).numpy()


def package_bundle(bundle: Bundle | str | Path, device: str = "cpu", profile: BatchProfile = BatchProfile(),
                   parity: bool = True, **compile_options) -> Bundle:
    """`rpiae.export.aoti.compile_packages` (same options), then, with `parity` and both graphs
    compiled, the packages against eager PyTorch FP32 at the ONNX FP32 tolerances (the `aoti`
    target's check step, `record_target_parity`)."""
    bundle = compile_packages(bundle, device=device, profile=profile, **compile_options)
    if parity and set(compile_options.get("graphs", GRAPHS)) == set(GRAPHS):
        record_target_parity(bundle, target_info("aoti").checked_by, Built([PRECISION], device), profile)
    return bundle
