"""The OpenVINO backend (`--backend openvino`): parity with eager PyTorch on real photos for
fp32 and int8, what really runs read back from OpenVINO's runtime model, bf16 refused with the
reason where the CPU has no bf16 (and its parity checked where it has), the throughput hint, the
command line, the benchmark, and a Triton python model served for real."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install -e '.[openvino]'")

from rpiae.cli.main import main as cli  # noqa: E402
from rpiae.engines import load_backend  # noqa: E402
from rpiae.engines import openvino_backend as OV  # noqa: E402
from rpiae.engines.base import PrecisionUnsupported  # noqa: E402
from rpiae.export.precision import INT8_KEEP_PARTS  # noqa: E402
from rpiae.precisions import TOLERANCES  # noqa: E402
from rpiae.verify import verify_bundle  # noqa: E402


def _native_bf16() -> bool:
    import openvino as ov

    return "BF16" in OV.cpu_capabilities(ov.Core())


@pytest.fixture
def no_bf16(monkeypatch):
    """A CPU without bf16, whatever this one has (OpenVINO's capabilities as an AMD EPYC lists them)."""
    monkeypatch.setattr(OV, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])


def test_fp32_and_int8_pass_parity_against_pytorch(bundle_all, photos):
    report = verify_bundle(bundle_all, backend="openvino", images=photos[:4], batches=[1, 3],
                           precisions=["fp32", "int8"])
    rows = report["results"]
    assert [(r["precision"], r["metrics"]["batch"]) for r in rows] == [("fp32", 1), ("fp32", 3), ("int8", 1), ("int8", 3)]
    for r in rows:
        assert set(r["checks"]) == set(TOLERANCES[r["precision"]]) and r["ok"], r
    assert report["ok"]


def test_what_runs_is_read_back_from_the_compiled_model(bundle_all, photos):
    """fp32 computes in f32 on every CPU (OpenVINO's own default is bf16 where the CPU has it);
    the int8 graph's matmuls run in int8."""
    with load_backend(bundle_all.root, "openvino", "fp32", threads=1) as b:
        info = b.describe()
        assert info["inference_precision"] == "f32" and info["threads"] == 1 and info["hint"] == "latency"
        for graph, layers in info["runtime_precisions"].items():
            assert layers and all(set(counts) == {"f32"} for counts in layers.values()), (graph, layers)
    with load_backend(bundle_all.root, "openvino", "int8") as b:
        layers = b.describe()["runtime_precisions"]
        for graph in ("encode", "decode"):
            assert layers[graph]["FullyConnected"].get("i8", 0) > 0, layers[graph]


def test_bf16_is_refused_with_the_reason_on_a_cpu_without_it(bundle_all, photos, no_bf16):
    with pytest.raises(PrecisionUnsupported, match=r"has no native bf16 \(OpenVINO's CPU capabilities: FP32, INT8"):
        load_backend(bundle_all.root, "openvino", "bf16")
    # verify reports it as skipped when not asked for, and fails when asked for
    report = verify_bundle(bundle_all, backend="openvino", images=photos[:2], batches=[2])
    by = {r["precision"]: r for r in report["results"]}
    assert list(by) == ["fp32", "bf16", "int8"]
    assert by["bf16"]["status"] == "skipped" and "no native bf16" in by["bf16"]["reason"] and by["bf16"]["ok"] is None
    assert by["fp32"]["ok"] and by["int8"]["ok"] and report["ok"]
    with pytest.raises(PrecisionUnsupported):
        verify_bundle(bundle_all, backend="openvino", images=photos[:2], batches=[2], precisions=["bf16"])


def test_a_hint_the_compiled_model_ignored_is_refused():
    """Where OpenVINO compiles a bf16 request in f32 (a CPU without bf16 ignores the hint), the
    backend says so instead of calling f32 bf16."""
    ran_f32 = {"encode": {"FullyConnected": {"f32": 30}, "Convolution": {"f32": 1}}}
    assert "compiled the encode graph's compute layers in f32, not bf16" in OV.unmet(ran_f32, "bf16")
    ran_bf16 = {"encode": {"FullyConnected": {"bf16": 30}, "Convolution": {"f32": 1}}}
    assert OV.unmet(ran_bf16, "bf16") is None and OV.unmet(ran_f32, "f32") is None


def test_bf16_on_this_cpu_passes_parity_or_is_refused(bundle_all, photos):
    """On a CPU with bf16 (AMX, AVX512-BF16) the bf16 hint really computes in bf16 and meets the
    bf16 bound; elsewhere it is refused. Each machine checks the branch it can run."""
    if _native_bf16():
        report = verify_bundle(bundle_all, backend="openvino", images=photos[:3], batches=[3], precisions=["bf16"])
        assert report["ok"], report["results"]
        with load_backend(bundle_all.root, "openvino", "bf16") as b:
            layers = b.describe()["runtime_precisions"]["encode"]
            assert any("bf16" in counts for counts in layers.values()), layers
    else:
        with pytest.raises(PrecisionUnsupported, match="no native bf16"):
            load_backend(bundle_all.root, "openvino", "bf16")


def test_int8_with_bf16_around_it_on_this_cpu_or_refused(bundle_all, photos, monkeypatch):
    """`int8_rest="bf16"`: the int8 graph's matmuls stay int8, its other layers run with the bf16
    hint (on a CPU with bf16; refused elsewhere), close to the all-f32 int8 answer; it is for
    int8 graphs only."""
    with pytest.raises(PrecisionUnsupported, match="int8_rest=bf16 is for int8 graphs, not fp32"):
        load_backend(bundle_all.root, "openvino", "fp32", int8_rest="bf16")
    with pytest.raises(ValueError, match="unknown int8_rest 'fp16'"):
        load_backend(bundle_all.root, "openvino", "int8", int8_rest="fp16")
    if _native_bf16():
        with load_backend(bundle_all.root, "openvino", "int8") as f32, \
                load_backend(bundle_all.root, "openvino", "int8", int8_rest="bf16") as mixed:
            info = mixed.describe()
            assert info["inference_precision"] == "bf16" and info["int8_rest"] == "bf16"
            assert f32.describe()["inference_precision"] == "f32" and f32.describe()["int8_rest"] == "f32"
            for graph, layers in info["runtime_precisions"].items():  # the quantised compute layers: int8 as before
                # the matmuls the export kept unquantised (io-projections) take the bf16 hint; no others
                io = re.compile(INT8_KEEP_PARTS["io-projections"])
                kept = [n for n in bundle_all.files[f"{graph}.int8.onnx"].facts.precision_report["matmuls_not_int8"]
                        if io.match(n) and "/MatMul" in n]
                fc = layers["FullyConnected"]
                assert fc.get("i8", 0) > 0 and fc.get("bf16", 0) <= len(kept), (layers, kept)
                every = mixed.runtime_precisions(graph, layers=None)  # the element-wise work around them: bf16
                assert any(every[kind].get("bf16", 0) > 0 for kind in ("Eltwise", "Subgraph", "MVN") if kind in every), every
            z32, zmix = f32.encode(photos[:3]), mixed.encode(photos[:3])
            assert not np.array_equal(z32, zmix)  # really another computation
            rel = np.linalg.norm(zmix - z32) / np.linalg.norm(z32)
            assert rel < 0.05, rel
    monkeypatch.setattr(OV, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    with pytest.raises(PrecisionUnsupported, match=r"has no native bf16 .*bf16 around int8 needs AMX or AVX512-BF16"):
        load_backend(bundle_all.root, "openvino", "int8", int8_rest="bf16")


def test_throughput_hint_gives_the_latency_answer(bundle_all, photos):
    with load_backend(bundle_all.root, "openvino", "fp32") as lat, \
            load_backend(bundle_all.root, "openvino", "fp32", hint="throughput", threads=2) as thr:
        info = thr.describe()
        assert info["hint"] == "throughput" and info["requests"] >= 1 and lat.describe()["requests"] == 1
        z_lat, z_thr = lat.encode(photos[:5]), thr.encode(photos[:5])
        assert z_thr.shape == (5, *bundle_all.config.latent_shape)
        np.testing.assert_allclose(z_thr, z_lat, rtol=0, atol=1e-5 * float(np.abs(z_lat).max()))
        np.testing.assert_allclose(thr.decode(z_lat[:3]), lat.decode(z_lat[:3]), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="unknown hint 'fast'"):
        load_backend(bundle_all.root, "openvino", "fp32", hint="fast")


def test_refusals_name_what_runs(bundle_all):
    with pytest.raises(PrecisionUnsupported, match="openvino backend runs fp32, bf16, int8, not fp16"):
        load_backend(bundle_all.root, "openvino", "fp16")
    with pytest.raises(PrecisionUnsupported, match="ort backend runs fp32, fp16, int8, not bf16"):  # eval skips the pair
        load_backend(bundle_all.root, "ort", "bf16")
    with pytest.raises(Exception, match=r"runs on the CPU \(device cpu\), not cuda"):
        load_backend(bundle_all.root, "openvino", "fp32", device="cuda")


def test_command_line_encode_and_verify(tmp_path, bundle_all, photos, no_bf16):
    from rpiae.imageio import load_images, save_image

    d = tmp_path / "photos"
    d.mkdir()
    for i, img in enumerate(photos[:2]):
        save_image(img, d / f"p{i}.png")
    runner = CliRunner()
    r = runner.invoke(cli, ["encode", "-m", str(bundle_all.root), "-b", "openvino", "-p", "int8", str(d),
                            "-o", str(tmp_path / "z.npy")])
    assert r.exit_code == 0, r.output
    z = np.load(tmp_path / "z.npy")
    with load_backend(bundle_all.root, "openvino", "int8") as b:
        np.testing.assert_allclose(z, b.encode(load_images(sorted(d.iterdir()))), rtol=0, atol=1e-5)
    r = runner.invoke(cli, ["verify", "-m", str(bundle_all.root), "-b", "openvino", "--batch", "2"])
    assert r.exit_code == 0, r.output
    assert "bf16" in r.output and "skipped: openvino backend: this CPU" in r.output and "all checks passed" in r.output
    r = runner.invoke(cli, ["verify", "-m", str(bundle_all.root), "-b", "openvino", "-p", "bf16", "--batch", "2"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no native bf16" in errors[0], r.output


def test_bench_rows(tmp_path, bundle_all):
    """openvino rows beside the reference, each with its own dtype's peak; an fp16 row is skipped
    with what the backend runs."""
    from rpiae.bench import BenchSettings, run_benchmark

    settings = BenchSettings(model=str(bundle_all.root), backends=["openvino"], precisions=["fp32", "int8", "fp16"],
                             batches=[2], graphs=["decode"], threads=1, warmup=1, warmup_time=0.0, min_iters=2,
                             min_time=0.0, max_iters=3, isolate=False, peak_time=0.05, peak_size=256, row_peak_time=0.02,
                             profile=True)
    result = run_benchmark(settings, out=tmp_path / "b.json")
    rows = {(r["backend"], r["precision"]): r for r in result["rows"]}
    for p in ("fp32", "int8"):
        row = rows[("openvino", p)]
        assert row["status"] == "ok", row
        assert row["peak_dtype"] == p and row["threads"]["backend"] == 1 and row["backend_info"]["threads"] == 1
        assert row["weight_source"] == f"decode.{p}.onnx" and "fp32" in row["speedup_vs_torch"]
    profiles = {(p["backend"], p["precision"]): p for p in result["profiles"]}
    for p in ("fp32", "int8"):  # where the time goes, per node type and kernel (the kernel names the ISA)
        prof = profiles[("openvino", p)]
        assert prof["status"] == "ok" and prof["tool"].startswith("OpenVINO performance counters"), prof
        assert prof["ops"] and all(" (" in o["op"] and o["seconds"] > 0 for o in prof["ops"]), prof["ops"]
    assert any("FullyConnected" in o["op"] for o in profiles[("openvino", "int8")]["ops"])
    assert rows[("openvino", "fp16")]["status"] == "skipped"
    assert rows[("openvino", "fp16")]["reason"] == "openvino runs fp32, bf16, int8, not fp16"
    from rpiae.bench.runner import _static_skip

    # the registry's variant: int8 rows only, opened with its option
    spec = {"backend": "openvino-int8-bf16", "precision": "fp32", "graph": "decode", "batch": 2}
    assert _static_skip(spec, True, ["fp32", "int8"]) == "openvino-int8-bf16 runs int8, not fp32"
    assert _static_skip({**spec, "precision": "int8"}, True, ["fp32", "int8"]) is None


def test_served_by_triton_as_a_python_model(tmp_path, bundle_all, photos):
    """`rpiae triton --platform python --backend openvino`: each model carries the graph files its
    precision runs (bf16: the FP32 graph), and a real server answers the ensemble as OpenVINO
    does in-process."""
    from rpiae.engines.triton_server import TritonServer, find_tritonserver, missing_reason
    from rpiae.export import Bundle
    from rpiae.export.triton import write_model_repository

    write_model_repository(bundle_all, tmp_path / "bf16", precision="bf16", platform="python", backend="openvino",
                           python_env=None)
    assert sorted(Bundle.open(tmp_path / "bf16" / "rpiae_encode" / "bundle").files) == ["encode.fp32.onnx"]
    if find_tritonserver() is None:
        pytest.skip(missing_reason())
    grpcclient = pytest.importorskip("tritonclient.grpc", reason='pip install "tritonclient[grpc,http]"')
    repo = tmp_path / "repo"
    write_model_repository(bundle_all, repo, precision="int8", platform="python", backend="openvino", max_batch=4,
                           threads=1)
    assert sorted(Bundle.open(repo / "rpiae_decode" / "bundle").files) == ["decode.int8.onnx"]
    x = np.ascontiguousarray(photos[:3])
    with TritonServer(repo, extra_args=["--exit-timeout-secs=5"]) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inp = grpcclient.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        res = client.infer("rpiae", [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in ("latent", "image")])
        z, y = res.as_numpy("latent"), res.as_numpy("image")
    with load_backend(bundle_all.root, "openvino", "int8", threads=1) as b:
        z_ref = b.encode(x)
        np.testing.assert_allclose(z, z_ref, rtol=0, atol=1e-5 * float(np.abs(z_ref).max()))
        np.testing.assert_allclose(y, b.decode(z_ref), rtol=0, atol=1e-4)
