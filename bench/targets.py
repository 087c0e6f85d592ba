"""The speed and memory targets the benchmark reports as holding or missed, per device (they
are defined for the paper-size rpiae-b). Only the benchmark judges them; tests never time
anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rpiae.bench.peak import on_cuda
from rpiae.precisions import precision_info

MiB = 1024.0**2
# the fastest-backend target counts rows whose reconstructions on real photos lose at most this
# much PSNR against PyTorch FP32; the INT8 target, the INT8 parity bound
FASTEST_PSNR_DROP_DB = 0.1
INT8_PSNR_DROP_DB = precision_info("int8").tolerances["recon_psnr_drop_db"]


def real_photo_accuracy(eval_report: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The `real_photos` section a result gets from an `rpiae eval` report (its JSON): the PSNR
    change against PyTorch FP32 of each runtime/precision it measured, which the targets that
    bound accuracy read. The runtimes are matched by name: eval and the benchmark name rows
    alike (backends and their named variants)."""
    from rpiae.fileio import sha256_file

    if not isinstance(eval_report, dict):
        from rpiae.bench.results import _kind

        raise ValueError(f"{path}: not an rpiae eval report (the file holds {_kind(eval_report)}, not an object)")
    rows = eval_report.get("rows")
    if eval_report.get("reference") is None or not isinstance(rows, list):
        raise ValueError(f"{path}: not an rpiae eval report (no reference and rows)")
    bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict) or "backend" not in r or "precision" not in r
                or not isinstance(r.get("delta") or {}, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: not an rpiae eval report (rows[{bad}] is not an object with backend, precision "
                         "and delta)")
    if not isinstance(eval_report.get("model") or {}, dict) or not isinstance((eval_report.get("model") or {}).get(
            "config") or {}, dict):
        raise ValueError(f"{path}: not an rpiae eval report (its model is not an object)")
    model = eval_report.get("model") or {}
    return {"file": Path(path).name, "sha256": sha256_file(path), "images": rows[0].get("n") if rows else 0,
            "model": (model.get("config") or {}).get("name") or model.get("path"), "model_sha256": model.get("sha256"),
            "psnr_delta_db": {f"{r['backend']}/{r['precision']}": r["delta"]["psnr"] for r in rows
                              if isinstance((r.get("delta") or {}).get("psnr"), float)}}


def load_real_photo_accuracy(eval_json: str | Path) -> dict[str, Any]:
    """`real_photo_accuracy` of the `rpiae eval` report file `eval_json`; ValueError (one line)."""
    from rpiae.fileio import read_json

    return real_photo_accuracy(read_json(eval_json, "an rpiae eval report"), eval_json)


def with_real_photo_accuracy(result: dict[str, Any], accuracy: dict[str, Any]) -> dict[str, Any]:
    """`result` with the `real_photos` section `accuracy` and its targets evaluated again."""
    result["real_photos"] = accuracy
    result["targets"] = evaluate_targets(result)
    return result


def _find(result: dict[str, Any], graph: str, backend: str, precision: str, batch: int) -> dict[str, Any] | None:
    for r in result.get("rows", []):
        if (r.get("graph"), r.get("backend"), r.get("precision"), r.get("batch")) == (graph, backend, precision, batch):
            return r
    return None


def _best(result: dict[str, Any], graph: str, batch: int, keep) -> dict[str, Any] | None:
    """The fastest measured row of `graph` at `batch` over every backend that `keep(row)`
    accepts, by its speed-up over PyTorch eager FP32; None when no such row ran."""
    rows = [r for r in result.get("rows", []) if r.get("status") == "ok" and (r.get("graph"), r.get("batch")) == (graph, batch)
            and keep(r) and r.get("speedup_vs_torch", {}).get("fp32")]
    return max(rows, key=lambda r: r["speedup_vs_torch"]["fp32"], default=None)


def _accuracy_filter(result: dict[str, Any], drop_db: float, unmeasured) -> tuple[Any, str]:
    """(keep(row), note): rows whose real-photo PSNR drop (the result's `real_photos`) is within
    `drop_db`; without that section, `unmeasured(row)` decides, and the note says so."""
    acc = result.get("real_photos")
    if acc:
        deltas = acc["psnr_delta_db"]

        def keep(r):
            d = deltas.get(f"{r['backend']}/{r['precision']}")
            return d is not None and d >= -drop_db

        within = sorted(k for k, d in deltas.items() if d >= -drop_db)
        return keep, (f"rows within {drop_db:g} dB of fp32 on {acc['images']} real photos ({acc['file']}, model "
                      f"{acc['model']}): {', '.join(within) or 'none'}")
    return unmeasured, ""


def _check(name: str, row: dict[str, Any] | None, value_fn, bound: float, unit: str, *, at_most: bool = False,
           note: str = "") -> dict[str, Any]:
    entry: dict[str, Any] = {"target": name, "bound": bound, "unit": unit, "at_most": at_most, "note": note}
    if row is None:
        return {**entry, "status": "not measured", "holds": None, "value": None}
    if row.get("status") != "ok":
        return {**entry, "status": f"not measured ({row.get('status')}: {row.get('reason')})", "holds": None,
                "value": None}
    value = value_fn(row)
    if value is None:
        return {**entry, "status": "not measured", "holds": None, "value": None}
    holds = value <= bound if at_most else value >= bound
    if holds:
        status = "holds"
    else:
        short = (value / bound - 1) if at_most else (1 - value / bound)
        status = f"misses by {short * 100:.0f} %"
    key = (row["graph"], row["backend"], row["precision"], row["batch"])
    return {**entry, "status": status, "holds": bool(holds), "value": value, "row": list(key)}


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The speed and memory targets for this run's device; each with value, bound and holds/misses."""
    device = result.get("settings", {}).get("device", "cpu")
    name = result.get("model", {}).get("name")
    scope = "" if name == "rpiae-b" else f" [model {name}: the targets are defined for rpiae-b]"
    out: list[dict[str, Any]] = []

    def speedup(p: str):
        return lambda r: r.get("speedup_vs_torch", {}).get(p)

    if not on_cuda(device):
        for graph in ("encode", "decode"):
            row = _find(result, graph, "ort", "fp32", 1)
            out.append(_check(f"ORT FP32 {graph} batch 1 >= 1.2x PyTorch eager FP32{scope}", row, speedup("fp32"), 1.2, "x"))
            out.append(_check(f"ORT FP32 {graph} batch 1 >= 80 % of the measured FP32 matmul peak{scope}", row,
                              lambda r: r.get("fraction_of_peak"), 0.8, "fraction"))
        for graph in ("encode", "decode"):
            row = _find(result, graph, "ort", "int8", 8)
            out.append(_check(f"ORT INT8 {graph} batch 8 >= 1.8x PyTorch eager FP32{scope}", row, speedup("fp32"), 1.8, "x"))
        flags = set(result.get("machine", {}).get("cpu", {}).get("flags", []))
        amx = "" if {"amx_bf16", "amx_int8"} <= flags else " (set for CPUs with AMX; this one has none)"
        accurate, accurate_note = _accuracy_filter(
            result, FASTEST_PSNR_DROP_DB, lambda r: not precision_info(r["precision"]).quantized)
        accurate_note = accurate_note or (
            f"no real-photo accuracy with this result: unquantised precisions only (quantised rows count with a "
            f"measured drop within {FASTEST_PSNR_DROP_DB:g} dB: rpiae bench --report FILE --accuracy EVAL.json)")
        int8_ok, int8_note = _accuracy_filter(result, INT8_PSNR_DROP_DB, lambda r: True)

        def is_int8(keep):
            return lambda r: r.get("precision") == "int8" and keep(r)

        for graph in ("encode", "decode"):
            out.append(_check(f"fastest CPU backend {graph} batch 8 >= 4x PyTorch eager FP32, PSNR within "
                              f"{FASTEST_PSNR_DROP_DB:g} dB of fp32{amx}{scope}",
                              _best(result, graph, 8, accurate), speedup("fp32"), 4.0, "x", note=accurate_note))
            out.append(_check(f"fastest INT8 {graph} batch 8 >= 5x PyTorch eager FP32, PSNR within "
                              f"{INT8_PSNR_DROP_DB:g} dB of fp32{amx}{scope}",
                              _best(result, graph, 8, is_int8(int8_ok)), speedup("fp32"), 5.0, "x",
                              note=int8_note or "no real-photo accuracy with this result: every INT8 row"))
        for r in result.get("rows", []):
            if r.get("backend") == "ort" and r.get("status") == "ok" and r.get("rss_delta_over_weights") is not None:
                abs_x = r.get("rss_over_weights")
                out.append(_check(
                    f"ORT {r['precision'].upper()} {r['graph']} batch {r['batch']}: peak RSS <= 1.5x graph weight bytes{scope}",
                    r, lambda r: r.get("rss_delta_over_weights"), 1.5, "x", at_most=True,
                    note=f"judged on RSS above the process baseline (interpreter + torch + onnxruntime, "
                         f"{r.get('rss_baseline_bytes', 0) / MiB:.0f} MiB); absolute peak RSS is "
                         f"{abs_x:.2f}x the weights" if abs_x else ""))
    else:
        for graph in ("decode",):
            fp16 = _find(result, graph, "trt", "fp16", 32)
            out.append(_check(f"TensorRT FP16 {graph} batch 32 >= 60 % of the measured BF16 matmul peak{scope}", fp16,
                              lambda r: r.get("fraction_of_peak"), 0.6, "fraction"))
            out.append(_check(f"TensorRT FP16 {graph} batch 32 >= 2x PyTorch eager BF16{scope}", fp16, speedup("bf16"), 2.0, "x"))
        for graph in ("encode", "decode"):
            fp16 = _find(result, graph, "trt", "fp16", 32)
            int8 = _find(result, graph, "trt", "int8", 32)
            ok = fp16 is not None and fp16.get("status") == "ok"

            def vs_fp16(r, fp16=fp16, ok=ok):
                return fp16["timing"]["p50_ms"] / r["timing"]["p50_ms"] if ok else None

            out.append(_check(f"TensorRT INT8 {graph} batch 32 >= 1.3x TensorRT FP16{scope}", int8, vs_fp16, 1.3, "x"))
    return out
