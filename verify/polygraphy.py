"""`rpiae verify --compare polygraphy`: polygraphy's Comparator checks a bundle's graphs.

For each precision and graph, polygraphy runs the graph on the backend under test (`ort`:
the ONNX graph of that precision on the session our ORT backend makes for `device`, so
provider choice and fallback refusal are the same; `trt`: the bundle's TensorRT engine,
checked for this TensorRT and GPU first) and the FP32 ONNX graph on ONNX Runtime's CPU
provider, on the same real images (the decode graph on the reference's own latents), and
compares the outputs with `CompareFunc.simple`: polygraphy's error statistic against a
bound relative to the reference's largest magnitude.

Bounds (statistic of |candidate - reference| / max|reference|): fp32 max <= 1e-4 (the FP32
parity bound); fp16/bf16 mean <= 1e-3; int8 mean <= 2e-2. On the shipped tiny model (CPU)
the measured means are about 8e-5 (fp16) and 2.5e-3 (int8). This complements `rpiae
verify`'s PyTorch parity (whose int8 criterion is reconstruction PSNR), it does not replace it.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any

import numpy as np

from rpiae.engines.base import BackendUnavailable
from rpiae.export.backends import BUNDLE_DEFAULT, REGISTRY, backend_info
from rpiae.export.bundle import Bundle
from rpiae.export.spec import GRAPHS
from rpiae.verify.parity import repeat_to

BOUNDS = {"fp32": ("max", 1e-4), "fp16": ("mean", 1e-3), "bf16": ("mean", 1e-3), "int8": ("mean", 2e-2)}
REFERENCE = "onnxrt-cpu-fp32"


@functools.cache
def polygraphy_backends() -> tuple[str, ...]:
    """The backends polygraphy can drive: those whose class gives a runner of its own."""
    from rpiae.engines import Backend, backend_class

    return tuple(n for n in REGISTRY if backend_class(n).polygraphy_runner is not Backend.polygraphy_runner)


def _polygraphy():
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner
        from polygraphy.comparator import Comparator, CompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BackendUnavailable("polygraphy is not installed: pip install -e '.[quant]' (or '.[trt]')") from None
    return OnnxrtRunner, Comparator, CompareFunc, G_LOGGER


@contextlib.contextmanager
def _quiet(log):
    """polygraphy prints each runner's inputs and outputs: keep its errors only."""
    with contextlib.redirect_stdout(io.StringIO()), log.verbosity(log.ERROR):
        yield


def _candidate(bundle: Bundle, backend: str, precision: str, device: str):
    """(opened rpiae backend, graph -> polygraphy runner) for the backend under test: its own
    sessions or engines, as `Backend.polygraphy_runner` hands them to polygraphy."""
    from rpiae.engines import open_backend

    if backend not in polygraphy_backends():
        raise BackendUnavailable(f"--compare polygraphy runs the {' and '.join(polygraphy_backends())} backends, "
                                 f"not {backend!r}")
    # polygraphy feeds host arrays: the backend's own I/O binding stays off where it has one
    options = {"io_binding": False} if "io_binding" in backend_info(backend).options else {}
    be = open_backend(bundle, backend, precision, device, **options)
    return be, {g: be.polygraphy_runner(g) for g in GRAPHS}


def compare_bundle(bundle: Bundle | str, backend: str = BUNDLE_DEFAULT, images: np.ndarray | None = None,
                   precisions: list[str] | None = None, device: str = "cpu", batch: int = 4) -> dict[str, Any]:
    """polygraphy's comparison of every precision (default: all the backend has) against the
    FP32 ONNX graph. Returns {"bundle", "results" (one row per precision), "ok"}."""
    from rpiae.engines.ort_backend import ORTBackend

    OnnxrtRunner, Comparator, CompareFunc, log = _polygraphy()
    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    if images is None:
        from rpiae.samples import sample_photos

        images = sample_photos()[1]
    x = np.ascontiguousarray(repeat_to(images, batch), dtype=np.float32)
    kind = backend_info(backend).runs
    precisions = precisions or bundle.precisions(kind)
    cpu = ORTBackend(bundle, precision="fp32", device="cpu", io_binding=False)
    reference = {g: cpu.session(g) for g in GRAPHS}
    feeds = {"encode": x}
    feeds["decode"] = reference["encode"].run(None, {reference["encode"].get_inputs()[0].name: x})[0]
    results = []
    for precision in precisions:
        stat, bound = BOUNDS[precision]
        be, runners = _candidate(bundle, backend, precision, device)
        checks: dict[str, dict[str, Any]] = {}
        try:
            for graph in GRAPHS:
                ref_sess = reference[graph]
                feed = [{ref_sess.get_inputs()[0].name: feeds[graph]}]
                ref_runner = OnnxrtRunner(ref_sess, name=REFERENCE)
                with _quiet(log):
                    run = Comparator.run([runners[graph], ref_runner], data_loader=feed)
                out_name = ref_sess.get_outputs()[0].name
                scale = float(np.abs(np.asarray(run[REFERENCE][0][out_name])).max()) or 1.0
                with _quiet(log):
                    accuracy = Comparator.compare_accuracy(
                        run, compare_func=CompareFunc.simple(atol=bound * scale, rtol=0.0, check_error_stat=stat))
                # polygraphy >= 0.50 returns one result per comparison function, older ones the result itself
                per_pair = accuracy if hasattr(accuracy, "keys") else accuracy[0]
                compared = per_pair[(runners[graph].name, REFERENCE)][0][out_name]
                value = float(compared.max_absdiff if stat == "max" else compared.mean_absdiff) / scale
                checks[f"{graph}_{stat}_abs_rel"] = {"value": value, "bound": bound, "ok": bool(compared)}
        finally:
            be.close()
        results.append({"precision": precision, "backend": f"{backend}/polygraphy", "device": device,
                        "metrics": {"batch": int(batch)}, "checks": checks,
                        "ok": all(c["ok"] for c in checks.values())})
    return {"bundle": str(bundle.root), "comparator": "polygraphy", "reference": REFERENCE, "results": results,
            "ok": all(r["ok"] for r in results)}
