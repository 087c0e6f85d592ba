"""`export_bundle` and `verify_bundle`: checkpoint -> bundle of checked graphs, and its proof."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from rpiae.engines.base import Backend
from rpiae.export.bundle import WEIGHTS, Bundle, BundleError, onnx_name
from rpiae.export.checks import assert_graph_ok
from rpiae.export.graphs import GRAPH_MODULES, GRAPHS
from rpiae.export.onnx_export import OPSET, export_graph_from_checkpoint
from rpiae.export.parity import compare, reference_outputs
from rpiae.export.precision import PRECISIONS, check_int8_memory, precision_report, to_fp16, to_int8
from rpiae.checkpoints import checkpoint_sha256
from rpiae.fileio import atomic_dir, sha256_file
from rpiae.imageio import find_images, load_images
from rpiae.isolation import run_in_child
from rpiae.model import RPiAE


def parse_precisions(value: str | list[str] | tuple[str, ...]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [p.strip().lower() for p in items if p.strip()]
    bad = [p for p in items if p not in PRECISIONS]
    if bad or not items:
        raise ValueError(f"unknown precision {', '.join(bad) or '(none)'}; choose from: {', '.join(PRECISIONS)}")
    return [p for p in PRECISIONS if p in items]


def calibration_images(calib: str | Path | np.ndarray | None, count: int) -> np.ndarray:
    """Calibration set: a folder of real images (first `count`, sorted) or an array."""
    if calib is None:
        raise ValueError("INT8 needs calibration images: pass --calib DIR (a folder of real photos)")
    if isinstance(calib, np.ndarray):
        return calib[:count].astype(np.float32)
    files = find_images(calib)[:count]
    if not files:
        raise ValueError(f"{calib}: no images found for calibration")
    return np.stack([load_images([f])[0] for f in tqdm(files, desc="calibration images", unit="img", leave=False)])


def export_bundle(
    checkpoint: str | Path | RPiAE | None,
    out: str | Path,
    precisions: str | list[str] = ("fp32",),
    calib: str | Path | np.ndarray | None = None,
    calib_count: int = 64,
    int8_high_precision: str = "fp16",
    parity_images: np.ndarray | None = None,
    overwrite: bool = False,
    progress: bool = True,
    latent_stats: str | Path | None = None,
) -> Bundle:
    """Export the encode/decode graphs of a checkpoint in each precision into a bundle.

    FP32 is always included (the variants are derived from it). INT8 needs `calib`.
    `latent_stats` (from `rpiae extract`, or the RPiAE authors' `.pt`) bakes latent
    normalisation into both graphs and the bundle's weights.
    Parity against PyTorch is measured and recorded in the manifest. The ONNX export and the
    INT8 pass each run in a child process (`rpiae.isolation`), from the bundle's own weights:
    their memory peaks do not add up.
    """
    from rpiae.engines import resolve_model

    precisions = parse_precisions(precisions)
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")
    if isinstance(checkpoint, RPiAE):
        model, source = checkpoint, {"path": getattr(checkpoint, "source", None), "sha256": None}
    else:
        path = resolve_model(checkpoint)
        model = RPiAE.from_checkpoint(path)
        source = {"path": str(path), "sha256": checkpoint_sha256(path)}
    model = model.float().eval()
    if latent_stats is not None:
        from rpiae.checkpoints import read_latent_stats

        model.set_latent_stats(*read_latent_stats(latent_stats))
    calib_x = calibration_images(calib, calib_count) if "int8" in precisions else None
    if calib_x is not None:  # refuse now, not after minutes of FP32 export
        for graph in GRAPHS:
            check_int8_memory(_fp32_graph_bytes(model, graph), onnx_name(graph, "fp32"))

    steps = [("weights", None, None)] + [("onnx", g, p) for p in precisions for g in GRAPHS] + [("parity", None, None)]
    bar = tqdm(steps, desc="export", unit="step", disable=not progress)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        bundle = Bundle.new(tmp, model.config, source, OPSET)
        if latent_stats is not None:
            bundle.manifest["latent_stats"] = {"file": Path(latent_stats).name, "sha256": sha256_file(latent_stats),
                                               "eps": model.config.latent_norm_eps}
        for kind, graph, precision in bar:
            bar.set_postfix_str(f"{graph or kind} {precision or ''}".strip())
            if kind == "weights":
                model.save(tmp / WEIGHTS)
                bundle.add_file(WEIGHTS, kind="weights", dtype="float32")
                latents_calib = _encode_all(model, calib_x) if calib_x is not None else None
                model = None  # from here on every graph comes from the bundle's own weights, in a child process
                gc.collect()
                continue
            if kind == "parity":
                images = parity_images if parity_images is not None else _default_parity_images(calib_x)
                bundle.manifest["parity"] = verify_bundle(bundle, "ort", images=images, batches=[len(images)])["results"]
                continue
            name = onnx_name(graph, precision)
            fp32 = tmp / onnx_name(graph, "fp32")
            if precision == "fp32":  # the exporter peaks at several times the graph and keeps some: a child process
                run_in_child(export_graph_from_checkpoint, str(tmp / WEIGHTS), graph, str(tmp / name),
                             what=f"the {graph} ONNX export")
            elif precision == "fp16":
                to_fp16(fp32, tmp / name)
            else:
                data = calib_x if graph == "encode" else latents_calib
                to_int8(fp32, tmp / name, data, high_precision=int8_high_precision)
            assert_graph_ok(tmp / name, precision)
            extra = [name + ".data"] if (tmp / (name + ".data")).exists() else []
            for dep in extra:
                bundle.add_file(dep, kind="onnx-external-data", graph=graph, precision=precision)
            entry: dict[str, Any] = {"kind": "onnx", "graph": graph, "precision": precision, "opset": OPSET,
                                     "external_data": extra, "precision_report": precision_report(tmp / name)}
            if precision == "int8":
                entry["calibration"] = {"images": len(calib_x), "source": str(calib) if not isinstance(calib, np.ndarray) else "array",
                                        "method": "max", "high_precision": int8_high_precision}
            bundle.add_file(name, **entry)
            bundle.manifest["precisions"] = [p for p in PRECISIONS if bundle.find("encode", p) and bundle.find("decode", p)]
        bundle.write_manifest()
    return Bundle.open(out)  # reopened at its final location


def _fp32_graph_bytes(model: RPiAE, graph: str) -> int:
    """Size of a graph's FP32 ONNX file from the parameters of the parts it runs, within a few
    percent (E's 37x37 pos-embed is a 16x16 constant in the graph: rpiae-b +1 %, tiny up to +4 %)."""
    return 4 * sum(p.numel() for m in GRAPH_MODULES[graph] for p in getattr(model, m).parameters())


def _encode_all(model: RPiAE, images: np.ndarray, batch: int = 8) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model.encode(torch.from_numpy(images[i : i + batch])).numpy()
                               for i in range(0, len(images), batch)])


def _default_parity_images(calib_x: np.ndarray | None) -> np.ndarray:
    if calib_x is not None:
        return calib_x[:4]
    from rpiae.samples import sample_photos

    return sample_photos()[1][:4]


def verify_bundle(
    bundle: Bundle | str | Path,
    backend: str = "ort",
    images: np.ndarray | None = None,
    batches: list[int] | None = None,
    precisions: list[str] | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Run every precision of `bundle` on `backend` against eager PyTorch FP32."""
    from rpiae.engines import open_backend
    from rpiae.engines.torch_backend import TorchBackend

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    if images is None:
        from rpiae.samples import sample_photos

        images = sample_photos()[1]
    batches = batches or [len(images)]
    kind = {"ort": "onnx", "trt": "trt-engine", "aoti": "aoti-package"}.get(backend, "onnx")
    precisions = precisions or bundle.precisions(kind)
    if not precisions:
        target = {"onnx": "onnx", "trt-engine": "trt", "aoti-package": "aoti"}[kind]
        raise BundleError(f"bundle {bundle.root} has no {kind} files to verify; build them with `rpiae export --target {target}`")
    reference: Backend = TorchBackend(RPiAE.from_checkpoint(bundle.weights_path()), device=device)
    results = []
    jobs = [(p, b) for p in precisions for b in batches]
    for precision, batch in tqdm(jobs, desc=f"verify {backend}", unit="run", disable=not progress):
        x = _batch_of(images, batch)
        ref = reference_outputs(reference, x)
        with open_backend(bundle, backend, precision, device) as cand:
            row = compare(cand, x, ref, precision)
            providers = cand.describe().get("providers")  # what actually ran (ONNX Runtime)
        row.update(backend=backend, device=device, **({"providers": providers} if providers else {}))
        results.append(row)
    return {"bundle": str(bundle.root), "results": results, "ok": all(r["ok"] for r in results)}


def _batch_of(images: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // len(images))
    return np.concatenate([images] * reps)[:batch]
