"""`rpiae verify --compare polygraphy`: polygraphy's Comparator runs the bundle's graphs
against the FP32 ONNX graph (run for real with ONNX Runtime on the CPU; TensorRT engines
where TensorRT and a GPU exist)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from rpiae.cli.main import main as cli
from rpiae.verify import polygraphy as PC


def test_graphs_pass_polygraphys_comparison(bundle_all, sample_photos):
    report = PC.compare_bundle(bundle_all, backend="ort", images=sample_photos, batch=3)
    assert [r["precision"] for r in report["results"]] == ["fp32", "fp16", "int8"]
    assert report["ok"], json.dumps(report["results"], indent=1)
    fp32 = report["results"][0]["checks"]
    assert set(fp32) == {"encode_max_abs_rel", "decode_max_abs_rel"}
    assert all(c["value"] <= 1e-4 for c in fp32.values())
    int8 = report["results"][2]["checks"]
    assert set(int8) == {"encode_mean_abs_rel", "decode_mean_abs_rel"} and all(0 < c["value"] <= 2e-2 for c in int8.values())


def test_the_comparison_can_fail(bundle_all, sample_photos, monkeypatch):
    monkeypatch.setitem(PC.BOUNDS, "int8", ("mean", 1e-6))  # no int8 graph is that close to fp32
    report = PC.compare_bundle(bundle_all, backend="ort", images=sample_photos, precisions=["int8"], batch=2)
    assert not report["ok"] and not any(c["ok"] for c in report["results"][0]["checks"].values())


def test_cli_verify_compare_polygraphy(bundle_all, monkeypatch):
    runner = CliRunner()
    r = runner.invoke(cli, ["verify", "-m", str(bundle_all.root), "--compare", "polygraphy", "-p", "fp16", "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert "ort/polygraphy" in r.output and "decode_mean_abs_rel" in r.output and "all checks passed" in r.output
    r = runner.invoke(cli, ["verify", "-m", str(bundle_all.root), "--compare", "polygraphy", "-b", "aoti"])
    assert r.exit_code == 2 and "runs --backend ort or trt" in r.output
    r = runner.invoke(cli, ["verify", "-m", str(bundle_all.root), "--compare", "polygraphy", "-b", "trt", "-p", "fp16"])
    assert r.exit_code == 1 and "Traceback" not in r.output  # no engines / no TensorRT: one line
    monkeypatch.setitem(PC.BOUNDS, "fp16", ("mean", 1e-9))
    r = runner.invoke(cli, ["verify", "-m", str(bundle_all.root), "--compare", "polygraphy", "-p", "fp16", "--batch", "2"])
    assert r.exit_code == 3 and "parity check failed" in r.output
