"""`rpiae bench` on the tiny preset: it runs, writes valid JSON, the report renders.

No timed assertions: only that the numbers exist, are finite and are consistent.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner

from rpiae.bench.peak import measure_peaks, peak_key
from rpiae.bench.report import evaluate_targets, render_markdown, render_report
from rpiae.bench.targets import real_photo_accuracy
from rpiae.bench.runner import BenchSettings, load_results, run_benchmark, stats, time_loop
from rpiae.cli.main import main
from rpiae.export.tensorrt import tensorrt_available

TRT_RUNS = tensorrt_available() and torch.cuda.is_available()
FAST = dict(warmup=1, warmup_time=0.0, min_iters=2, min_time=0.0, max_iters=3, max_time=5.0, peak_time=0.05,
            peak_size=256, row_peak_time=0.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_ckpt):
    from rpiae.verify import export_bundle

    out = tmp_path_factory.mktemp("bench") / "bundle"
    export_bundle(tiny_ckpt, out, precisions="fp32", progress=False)
    return str(out)


@pytest.fixture(scope="module")
def result_file(tmp_path_factory, bundle):
    out = tmp_path_factory.mktemp("results") / "tiny-cpu.json"
    settings = BenchSettings(model=bundle, backends=["torch", "ort", "trt"], precisions=["fp32", "int8"],
                             batches=[1, 2], isolate=False, threads=2, profile=True, **FAST)
    run_benchmark(settings, out=out)
    return out


def test_time_loop_counts_and_caps():
    calls = []
    times, info = time_loop(lambda: calls.append(1), warmup=3, warmup_time=0.0, min_iters=4, min_time=0.0,
                            max_iters=10, max_time=10.0)
    assert info["warmup_calls"] == 3 and len(times) == 4 and len(calls) == 7
    times, info = time_loop(lambda: None, warmup=0, warmup_time=0.0, min_iters=5, min_time=100.0, max_iters=6,
                            max_time=100.0)
    assert len(times) == 6 and info["capped_by"] == "max_iters"
    s = stats([0.001, 0.002, 0.003, 0.004], batch=4)
    assert s["p50_ms"] == pytest.approx(2.5) and s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert s["throughput_ips"] == pytest.approx(4 / 0.0025)


def test_settings_validate_and_add_reference_rows():
    s = BenchSettings(model="x", backends=["ort"], precisions=["int8"], batches=[1, 8], graphs=["decode"])
    specs = s.row_specs()
    assert [(r["backend"], r["precision"], r["batch"], r["reference"]) for r in specs] == [
        ("torch", "fp32", 1, True), ("torch", "fp32", 8, True), ("ort", "int8", 1, False), ("ort", "int8", 8, False)]
    assert s.threads >= 1
    with pytest.raises(ValueError, match="unknown backend"):
        BenchSettings(model="x", backends=["tensorflow"])
    with pytest.raises(ValueError, match="unknown precision"):
        BenchSettings(model="x", precisions=["fp8"])


def test_peaks_and_peak_key():
    peaks = measure_peaks("cpu", threads=1, min_time=0.01, size=128)
    assert peaks["fp32"]["gflops"] > 0 and peaks["fp32"]["iterations"] >= 1
    assert peak_key("cpu", "fp32", peaks) == "fp32"
    both = {"fp32": {"gflops": 1.0}, "int8": {"gflops": 2.0}}
    assert peak_key("cpu", "int8", both) == "int8" and peak_key("cpu", "fp16", both) == "fp32"
    assert peak_key("cpu", "int8", {**both, "int8": {"skipped": "no ONNX Runtime"}}) == "fp32"  # falls back
    assert peak_key("cuda", "fp16", {"bf16": {"gflops": 1.0}, "fp16": {"gflops": 1.0}}) == "fp16"  # its own dtype
    assert peak_key("cuda", "fp16", {"bf16": {"gflops": 1.0}, "fp32": {"gflops": 1.0}}) == "fp32"  # named fallback
    assert peak_key("cuda", "int8", {"bf16": {"gflops": 1.0}}) is None  # nothing comparable measured


def test_cpu_peaks_each_dtype_with_its_best_kernel():
    """Every CPU dtype has its own peak, each naming its kernel and size; int8 keeps the higher of
    torch._int_mm and ONNX Runtime's MatMulInteger and lists the other."""
    peaks = measure_peaks("cpu", threads=1, min_time=0.01, size=128)
    assert set(peaks) == {"fp32", "bf16", "fp16", "int8"}
    for dtype, peak in peaks.items():
        assert peak["dtype"] == dtype and peak["gflops"] > 0 and "128x128x128" in peak["kernel"], peak
    int8 = peaks["int8"]
    (other,) = int8["others"]
    kernels = {int8["kernel"].split()[0], other["kernel"].split()[0]}
    assert kernels == {"torch._int_mm", "onnxruntime"}, kernels
    assert int8["gflops"] >= other["gflops"]
    assert "torch.matmul bf16" in peaks["bf16"]["kernel"]


def test_results_json(result_file, bundle):
    data = load_results(result_file)
    assert data["format"] == "rpiae-bench" and data["model"]["name"] == "tiny"
    assert set(data["model"]["flops_per_image"]) == {"encode", "decode"}
    assert data["machine"]["cpu"]["usable_cores"] >= 1 and "torch" in data["machine"]["libraries"]
    assert data["settings"]["threads"] == 2
    assert data["peaks"]["used"]["fp32"] > 0
    rows = {(r["graph"], r["backend"], r["precision"], r["batch"]): r for r in data["rows"]}
    assert len(rows) == len(data["rows"]) == 2 * 3 * 2 * 2
    for graph in ("encode", "decode"):
        for batch in (1, 2):
            ref, ort = rows[(graph, "torch", "fp32", batch)], rows[(graph, "ort", "fp32", batch)]
            assert ref["status"] == "ok" and ort["status"] == "ok", (ref.get("reason"), ort.get("reason"))
            # against the reference row of the same graph and batch
            assert ort["speedup_vs_torch"]["fp32"] == pytest.approx(ref["timing"]["p50_ms"] / ort["timing"]["p50_ms"])
            for r in (ref, ort):
                t = r["timing"]
                assert r["output_finite"] and t["iterations"] >= 2
                assert 0 < t["p50_ms"] <= t["p90_ms"] <= t["p99_ms"]
                assert math.isfinite(r["fraction_of_peak"]) and r["fraction_of_peak"] > 0
                assert r["threads"]["torch"] == 2
            assert ort["weight_bytes"] > 0 and ort["backend_info"]["backend"] == "ort"
            # a row holds its own graph only: its peak RSS and weight bytes are that graph's
            assert ref["backend_info"]["graphs"] == ort["backend_info"]["graphs"] == [graph]
            # skipped with the reason, never an error
            assert "int8" in rows[(graph, "ort", "int8", batch)]["reason"]
            assert rows[(graph, "torch", "int8", batch)]["status"] == "skipped"
            trt = rows[(graph, "trt", "fp32", batch)]
            assert trt["status"] == ("ok" if TRT_RUNS else "skipped"), trt.get("reason")
    assert {p["backend"] for p in data["profiles"] if p["status"] == "ok"} == {"torch", "ort"}
    assert data["accuracy"] and data["accuracy"][0]["precision"] == "fp32"
    assert any("ORT FP32 encode batch 1" in t["target"] for t in data["targets"])


def test_report_renders(result_file, tmp_path):
    text = render_report([result_file], out_dir=tmp_path)
    assert (tmp_path / "README.md").read_text().strip() == text.strip()
    png = tmp_path / "tiny-cpu.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| graph | backend | precision | batch | p50 ms" in text and "× torch fp32" in text
    assert "Skipped rows" in text and "### Targets" in text and "### Profiles" in text
    assert "![latency and throughput vs batch](tiny-cpu.png)" in text


def test_targets_report_misses():
    def row(graph, backend, precision, batch, ms, **kw):
        return {"graph": graph, "backend": backend, "precision": precision, "batch": batch, "status": "ok",
                "timing": {"p50_ms": ms}, **kw}

    result = {"settings": {"device": "cuda"}, "model": {"name": "rpiae-b"}, "rows": [
        row("decode", "trt", "fp16", 32, 10.0, fraction_of_peak=0.3, speedup_vs_torch={"bf16": 2.5}),
        row("decode", "trt", "int8", 32, 5.0),
    ]}
    by_name = {t["target"]: t for t in evaluate_targets(result)}
    frac = by_name["TensorRT FP16 decode batch 32 >= 60 % of the measured BF16 matmul peak"]
    assert frac["holds"] is False and frac["status"] == "misses by 50 %"
    assert by_name["TensorRT FP16 decode batch 32 >= 2x PyTorch eager BF16"]["holds"] is True
    assert by_name["TensorRT INT8 decode batch 32 >= 1.3x TensorRT FP16"]["value"] == pytest.approx(2.0)
    assert by_name["TensorRT INT8 encode batch 32 >= 1.3x TensorRT FP16"]["status"] == "not measured"
    assert "Targets" in render_markdown({**result, "targets": evaluate_targets(result)})


def test_cpu_targets_take_the_fastest_row_of_any_backend_within_their_accuracy_bound(tmp_path):
    """The 4x target counts rows within 0.1 dB PSNR of fp32 on real photos, the INT8 5x target int8
    rows within the INT8 bound (1 dB), as measured by `rpiae eval` (`--accuracy`); without those
    measurements, unquantised rows only for the first and every INT8 row for the second."""
    def row(backend, precision, x, status="ok"):
        return {"graph": "encode", "backend": backend, "precision": precision, "batch": 8, "status": status,
                "timing": {"p50_ms": 100.0}, "speedup_vs_torch": {"fp32": x}}

    result = {"settings": {"device": "cpu"}, "model": {"name": "rpiae-b"},
              "machine": {"cpu": {"flags": ["avx2", "avx512_bf16"]}},
              "rows": [row("torch", "fp32", 1.0), row("openvino", "bf16", 4.5), row("ort", "int8", 3.2),
                       row("openvino", "int8", 6.0), row("openvino-int8-bf16", "int8", 7.0),
                       row("torch", "bf16", 9.0, status="skipped")]}
    by_name = {t["target"]: t for t in evaluate_targets(result)}
    amx = " (set for CPUs with AMX; this one has none)"
    fastest = f"fastest CPU backend encode batch 8 >= 4x PyTorch eager FP32, PSNR within 0.1 dB of fp32{amx}"
    fastest_int8 = f"fastest INT8 encode batch 8 >= 5x PyTorch eager FP32, PSNR within 1 dB of fp32{amx}"
    best = by_name[fastest]  # no accuracy measured: int8 rows do not count, a skipped row never does
    assert best["holds"] is True and best["row"] == ["encode", "openvino", "bf16", 8]
    assert "unquantised precisions only" in best["note"]
    assert by_name[fastest_int8]["row"] == ["encode", "openvino-int8-bf16", "int8", 8]
    assert by_name[fastest_int8.replace("encode", "decode")]["status"] == "not measured"

    report = {"reference": {"backend": "torch", "precision": "fp32"}, "model": {"config": {"name": "rpiae-tiny"}},
              "rows": [{"backend": b, "precision": p, "n": 309, "delta": {"psnr": d}} for b, p, d in (
                  ("torch", "fp32", 0.0), ("openvino", "bf16", -0.012), ("ort", "int8", -0.05),
                  ("openvino", "int8", -0.163), ("openvino-int8-bf16", "int8", -1.2))]}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(report))
    result["real_photos"] = real_photo_accuracy(report, path)
    assert result["real_photos"]["psnr_delta_db"]["openvino/int8"] == -0.163 and result["real_photos"]["images"] == 309
    result["rows"][2] = row("ort", "int8", 5.0)  # within 0.1 dB, and faster than bf16
    by_name = {t["target"]: t for t in evaluate_targets(result)}
    assert by_name[fastest]["row"] == ["encode", "ort", "int8", 8] and by_name[fastest]["holds"] is True
    assert "rows within 0.1 dB of fp32 on 309 real photos (eval.json, model rpiae-tiny)" in by_name[fastest]["note"]
    int8 = by_name[fastest_int8]  # the variant loses 1.2 dB: out; OpenVINO int8 (-0.163 dB) is the fastest left
    assert int8["row"] == ["encode", "openvino", "int8", 8] and int8["holds"] is True
    result["real_photos"]["psnr_delta_db"]["ort/int8"] = -0.3
    assert {t["target"]: t for t in evaluate_targets(result)}[fastest]["row"] == ["encode", "openvino", "bf16", 8]
    result["machine"]["cpu"]["flags"] += ["amx_bf16", "amx_int8"]
    assert fastest_int8.replace(amx, "") in {t["target"] for t in evaluate_targets(result)}
    with pytest.raises(ValueError, match="not an rpiae eval report"):
        real_photo_accuracy({"rows": {}}, path)


def test_isolated_rows_measure_rss(bundle, tmp_path):
    """Each row's peak RSS is its own process's: not the parent's peak, which Linux hands a
    spawned child as the start of its `ru_maxrss` (the parent here first touches 1 GiB)."""
    import resource

    big = np.ones(2**27)  # 1 GiB, touched, then freed: the parent's peak only
    del big
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    settings = BenchSettings(model=bundle, backends=["ort"], precisions=["fp32"], batches=[1], graphs=["decode"],
                             isolate=True, threads=1, **{**FAST, "row_peak_time": 0.01})
    data = run_benchmark(settings, out=tmp_path / "r.json")
    rows = data["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [("torch", "ok"), ("ort", "ok")], [r.get("reason") for r in rows]
    for r in rows:
        assert r["rss_peak_bytes"] > r["rss_baseline_bytes"] > 0 and r["rss_delta_bytes"] > 0
        if sys.platform == "linux":  # the tiny model's rows hold well under this process's peak
            assert r["rss_peak_bytes"] < parent_peak - 2**29, (r["rss_peak_bytes"] >> 20, parent_peak >> 20)
        assert r["threads"]["OMP_NUM_THREADS"] == "1" and r["threads"]["torch"] == 1
        assert r["local_peak"]["gflops"] > 0 and r["rss_over_weights"] > 0
        assert r["rss_peak_reset"] is (sys.platform == "linux")  # the local peak's matmuls are not the row's
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["isolate"] is True


@pytest.mark.skipif(sys.platform != "linux", reason="the peak RSS is reset through Linux's /proc/self/clear_refs")
def test_a_row_measures_memory_from_its_own_start():
    """`start_rss_measure` makes the current RSS the baseline: a peak reached before (here 512 MiB
    touched and freed) no longer counts, and what is touched after it does."""
    from rpiae.host import peak_rss, start_rss_measure

    before = np.ones(2**26)  # 512 MiB
    del before
    rss = psutil.Process().memory_info().rss
    assert peak_rss() > rss + 2**28  # the old peak is still this process's high-water mark
    assert start_rss_measure() is True
    base = psutil.Process().memory_info().rss
    assert peak_rss() < base + 2**25, (peak_rss() >> 20, base >> 20)
    after = np.ones(2**25)  # 256 MiB, touched
    assert 2**28 <= peak_rss() - base < 2**28 + 2**26, ((peak_rss() - base) >> 20)
    del after


def test_cli_bench_and_report(bundle, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.json"
    args = ["bench", "--model", bundle, "--backends", "ort,aoti", "--precision", "fp32", "--batch", "1",
            "--graphs", "encode", "--no-isolate", "--warmup", "1", "--warmup-time", "0", "--min-iters", "2",
            "--min-time", "0", "--peak-time", "0.05", "--threads", "1", "--out", str(out)]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "| encode | ort | fp32 | 1 |" in res.output
    data = load_results(out)
    assert {r["backend"] for r in data["rows"]} == {"torch", "aoti", "ort"}
    aoti = next(r for r in data["rows"] if r["backend"] == "aoti")  # the bundle has no packages
    assert aoti["status"] == "skipped" and "no fp32 AOTInductor packages" in aoti["reason"]
    res = runner.invoke(main, ["bench", "--report", str(out), "--report-dir", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "README.md").is_file() and (tmp_path / "rep" / "cli.png").is_file()
    assert "real_photos" not in load_results(out)
    # an eval report added afterwards: stored in the result, targets judged again, rendered
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"reference": {"backend": "torch", "precision": "fp32"}, "model": {"path": "/b"}, "rows": [
        {"backend": "torch", "precision": "fp32", "n": 5, "delta": {"psnr": 0.0}},
        {"backend": "ort", "precision": "fp32", "n": 5, "delta": {"psnr": -0.001}}]}))
    res = runner.invoke(main, ["bench", "--report", str(out), "--accuracy", str(ev), "--report-dir", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    data = load_results(out)
    assert data["real_photos"]["psnr_delta_db"] == {"torch/fp32": 0.0, "ort/fp32": -0.001}
    assert any("rows within 0.1 dB of fp32 on 5 real photos (eval.json, model /b): ort/fp32, torch/fp32" in t["note"]
               for t in data["targets"])
    assert "| ort/fp32 | -0.001 dB |" in (tmp_path / "rep" / "README.md").read_text()


def test_cli_errors(bundle, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "--report"])
    assert res.exit_code == 2 and "needs result files" in res.output
    res = runner.invoke(main, ["bench", "--report", str(tmp_path / "missing.json")])
    assert res.exit_code == 1 and "no such result file" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    res = runner.invoke(main, ["bench", "--report", str(bad)])
    assert res.exit_code == 1 and "not an rpiae bench result" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["bench", "--model", bundle, "--backends", "tensorflow"])
    assert res.exit_code == 2 and "unknown backend" in res.output  # a usage error
    # a file that is no eval report is refused before anything is measured
    res = runner.invoke(main, ["bench", "--model", bundle, "--accuracy", str(bad), "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 1 and "not an rpiae eval report" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r.json").exists() and "measuring" not in res.output


def test_emulated_cpu_precisions_of_pytorch_are_skipped_with_the_reason():
    """PyTorch's CPU autocast to bf16/fp16 on a CPU without those kernels runs ~100x slower than
    fp32 (the run's bf16 peak shows it): such rows are named and skipped, not timed for minutes."""
    from rpiae.bench.runner import _static_skip

    def skip(backend, precision, flags):
        return _static_skip({"backend": backend, "precision": precision}, True, ["fp32", "int8"], flags)

    reason = skip("torch", "bf16", {"avx2", "fma"})
    assert reason.startswith("bf16 has no native kernels on this CPU (it has none of avx512_bf16, amx_bf16)"), reason
    assert skip("torch-compile", "fp16", {"avx2"}).startswith("fp16 has no native kernels")
    assert skip("torch", "bf16", {"avx2", "amx_bf16"}) is None and skip("torch", "fp32", {"avx2"}) is None
    assert skip("torch", "bf16", None) is None  # a GPU run, or flags unknown
    assert skip("ort", "int8", {"avx2"}) is None  # exported graphs carry their own kernels
