"""`build_bundle`: checkpoint -> bundle of checked ONNX graphs in each precision.

(`rpiae.verify.export_bundle` is `build_bundle` with the graphs' parity against PyTorch
measured and recorded in the manifest before the bundle is committed.)"""

from __future__ import annotations

import gc
import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from rpiae.checkpoints import checkpoint_sha256, read_latent_stats
from rpiae.export.bundle import Bundle
from rpiae.export.checks import assert_graph_ok
from rpiae.export.manifest import KIND_ONNX, KIND_ONNX_DATA, KIND_WEIGHTS, WEIGHTS, onnx_name
from rpiae.export.onnx_export import OPSET, export_graph_from_checkpoint
from rpiae.export.precision import (
    INT8_CALIBRATION_DEFAULT, INT8_CALIBRATIONS, INT8_KEEP_DEFAULT, check_int8_memory, int8_keep_nodes, precision_report,
)
from rpiae.export.spec import GRAPH_MODULES, GRAPHS, ONNX_PRECISIONS, parse_precisions
from rpiae.fileio import atomic_dir, sha256_file
from rpiae.hub import resolve_model
from rpiae.imageio import find_images, load_images
from rpiae.isolation import run_in_child
from rpiae.model import RPiAE
from rpiae.precisions import INT8_HIGH_PRECISION, INT8_WEIGHT_BITS_DEFAULT, precision_info

# called on the complete bundle, still in its temporary directory, with the calibration images
# (or None): what it writes into the manifest is committed with the bundle
Check = Callable[[Bundle, "np.ndarray | None"], None]


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


def load_source(checkpoint: str | Path | RPiAE | None, latent_stats: str | Path | None = None) -> tuple[RPiAE, dict]:
    """(FP32 model, manifest `source`) of a checkpoint path, Hub model, None (the shipped
    checkpoint) or an in-memory model (no source hash), with `latent_stats` baked in."""
    if isinstance(checkpoint, RPiAE):
        model, source = checkpoint, {"path": getattr(checkpoint, "source", None), "sha256": None}
    else:
        path = resolve_model(checkpoint)
        model = RPiAE.from_checkpoint(path)
        source = {"path": str(path), "sha256": checkpoint_sha256(path)}
    model = model.float().eval()
    if latent_stats is not None:
        model.set_latent_stats(*read_latent_stats(latent_stats))
    return model, source


def build_bundle(
    checkpoint: str | Path | RPiAE | None,
    out: str | Path,
    precisions: str | list[str] = ("fp32",),
    calib: str | Path | np.ndarray | None = None,
    calib_count: int = 64,
    int8_high_precision: str = INT8_HIGH_PRECISION,
    int8_weight_bits: int = INT8_WEIGHT_BITS_DEFAULT,
    int8_calibration: str = INT8_CALIBRATION_DEFAULT,
    int8_keep: tuple[str, ...] | list[str] = INT8_KEEP_DEFAULT,
    overwrite: bool = False,
    progress: bool = True,
    latent_stats: str | Path | None = None,
    check: Check | None = None,
) -> Bundle:
    """Export the encode/decode graphs of a checkpoint in each precision into a bundle.

    FP32 is always included (the variants are derived from it, each by its precision's ONNX pass,
    `rpiae.precisions`). A quantised precision (INT8) needs `calib`; its unquantised layers
    run in `int8_high_precision`, and its weights use `int8_weight_bits` (7 for x86 CPUs without
    VNNI, `rpiae.precisions.int8_pairs_saturate`); its activations are calibrated with
    `int8_calibration` (max or entropy), and the model parts `int8_keep` stay unquantised
    (`rpiae.export.precision.INT8_KEEP_PARTS`).
    `latent_stats` (from `rpiae extract`, or the RPiAE authors' `.pt`) bakes latent
    normalisation into both graphs and the bundle's weights. The ONNX export and the INT8
    pass each run in a child process (`rpiae.isolation`), from the bundle's own weights: their
    memory peaks do not add up. `check` runs on the complete bundle before it is committed.
    """
    precisions = parse_precisions(precisions)
    if "fp32" not in precisions:
        precisions.insert(0, "fp32")
    if int8_calibration not in INT8_CALIBRATIONS:
        raise ValueError(f"int8 calibration must be one of {', '.join(INT8_CALIBRATIONS)}, not {int8_calibration!r}")
    int8_keep_nodes(int8_keep)  # an unknown part is refused before anything is exported
    model, source = load_source(checkpoint, latent_stats)
    calib_x = calibration_images(calib, calib_count) if any(precision_info(p).quantized for p in precisions) else None
    if calib_x is not None:  # refuse now, not after minutes of FP32 export
        for graph in GRAPHS:
            check_int8_memory(_fp32_graph_bytes(model, graph), onnx_name(graph, "fp32"))
    calibration = {"images": 0 if calib_x is None else len(calib_x), "method": int8_calibration,
                   "high_precision": int8_high_precision, "weight_bits": int8_weight_bits, "keep": list(int8_keep),
                   "source": "array" if isinstance(calib, np.ndarray) else str(calib)}
    jobs = [(g, p) for p in precisions for g in GRAPHS]
    bar = tqdm(total=len(jobs) + 1, desc="export", unit="step", disable=not progress)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        bundle = Bundle.new(tmp, model.config, source, OPSET)
        if latent_stats is not None:
            bundle.manifest.latent_stats = {"file": Path(latent_stats).name, "sha256": sha256_file(latent_stats),
                                            "eps": model.config.latent_norm_eps}
        bar.set_postfix_str("weights")
        model.save(tmp / WEIGHTS)
        bundle.add_file(WEIGHTS, kind=KIND_WEIGHTS, dtype="float32")
        latents_calib = _encode_all(model, calib_x) if calib_x is not None else None
        del model  # from here on every graph comes from the bundle's own weights, in a child process
        gc.collect()
        bar.update()
        for graph, precision in jobs:
            bar.set_postfix_str(f"{graph} {precision}")
            data = calib_x if graph == "encode" else latents_calib
            _add_graph(bundle, graph, precision, data, calibration)
            bar.update()
        bar.close()
        if check is not None:
            check(bundle, calib_x)
        bundle.write_manifest()
    return Bundle.open(out)  # reopened at its final location


def _add_graph(bundle: Bundle, graph: str, precision: str, calibration_data: np.ndarray | None,
               calibration: dict[str, Any]) -> None:
    """Write one graph of one precision into the bundle (from its FP32 graph or weights), check
    it and record it."""
    tmp = bundle.root
    name = onnx_name(graph, precision)
    fp32 = tmp / onnx_name(graph, "fp32")
    info = precision_info(precision)
    if info.onnx_pass == "":  # the exporter peaks at several times the graph and keeps some: a child process
        run_in_child(export_graph_from_checkpoint, str(tmp / WEIGHTS), graph, str(tmp / name), what=f"the {graph} ONNX export")
    elif info.onnx_pass is None:
        raise ValueError(f"{precision} has no ONNX graph; choose from: {', '.join(ONNX_PRECISIONS)}")
    else:  # "module:function" (src, dst[, calibration data, high_precision=, weight_bits=, method=, keep=])
        module, _, fn = info.onnx_pass.partition(":")
        make = getattr(importlib.import_module(module), fn)
        if info.quantized:
            make(fp32, tmp / name, calibration_data, high_precision=calibration["high_precision"],
                 weight_bits=calibration["weight_bits"], method=calibration["method"], keep=calibration["keep"])
        else:
            make(fp32, tmp / name)
    assert_graph_ok(tmp / name, precision)
    extra = [name + ".data"] if (tmp / (name + ".data")).exists() else []
    for dep in extra:
        bundle.add_file(dep, kind=KIND_ONNX_DATA, graph=graph, precision=precision)
    facts: dict[str, Any] = {"opset": OPSET, "external_data": extra, "precision_report": precision_report(tmp / name)}
    if info.quantized:
        facts["calibration"] = calibration
    bundle.add_file(name, kind=KIND_ONNX, graph=graph, precision=precision, **facts)
    bundle.manifest.precisions = [p for p in ONNX_PRECISIONS if bundle.find("encode", p) and bundle.find("decode", p)]


def _fp32_graph_bytes(model: RPiAE, graph: str) -> int:
    """Size of a graph's FP32 ONNX file from the parameters of the parts it runs, within a few
    percent (E's 37x37 pos-embed is a 16x16 constant in the graph: rpiae-b +1 %, tiny up to +4 %)."""
    return 4 * sum(p.numel() for m in GRAPH_MODULES[graph] for p in getattr(model, m).parameters())


def _encode_all(model: RPiAE, images: np.ndarray, batch: int = 8) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model.encode(torch.from_numpy(images[i : i + batch])).numpy()
                               for i in range(0, len(images), batch)])
