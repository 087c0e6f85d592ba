"""GPU checks of the CUDA paths outside TensorRT's own tests (test_tensorrt.py, test_torch_trt.py):
FP32 parity without TF32, cuda:N placement, ONNX Runtime's CUDA and TensorRT providers with
I/O binding, AOTInductor CUDA packages, the benchmark's GPU rows, a deterministic training
resume. Every test skips with the reason where CUDA (or the runtime it needs) is missing."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch

CUDA_SKIP = None if torch.cuda.is_available() else "CUDA not available (torch.cuda.is_available() is False)"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")]


def _ort_providers():
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return ort.get_available_providers()


def test_torch_fp32_on_cuda_matches_the_cpu_at_the_fp32_bound(tiny_model, sample_photos):
    """TF32 left on (PyTorch's default for cuDNN convolutions) fails this on Ampere and later."""
    from rpiae.engines.torch_backend import TorchBackend

    x = sample_photos[:4]
    ref = TorchBackend(copy.deepcopy(tiny_model)).encode(x)
    z = TorchBackend(copy.deepcopy(tiny_model), device="cuda").encode(x)
    assert np.abs(z - ref).max() <= 1e-4 * np.abs(ref).max()
    assert torch.backends.cudnn.allow_tf32 is True  # the user's setting is back afterwards


def test_torch_backend_runs_on_the_gpu_it_was_given(tiny_model, sample_photos):
    from rpiae.engines.torch_backend import TorchBackend

    last = torch.cuda.device_count() - 1
    be = TorchBackend(copy.deepcopy(tiny_model), device=f"cuda:{last}")
    z = be.encode(torch.from_numpy(sample_photos[:2]).to(f"cuda:{last}"))
    assert z.device == torch.device("cuda", last)


@pytest.mark.skipif("CUDAExecutionProvider" not in _ort_providers(), reason="onnxruntime has no CUDAExecutionProvider")
def test_ort_cuda_provider_parity_and_io_binding(bundle_all, sample_photos):
    from rpiae.engines.ort_backend import ORTBackend
    from rpiae.verify import verify_bundle

    report = verify_bundle(bundle_all, backend="ort", images=sample_photos, batches=[1, 3], device="cuda")
    assert report["ok"], report["results"]
    with ORTBackend(bundle_all, device="cuda") as be:
        info = be.describe()
        assert info["providers"][0] == "CUDAExecutionProvider" and info["io_binding"] is True
        x = torch.from_numpy(sample_photos[:3]).cuda()
        z = be.encode(x)
        assert z.is_cuda and z.shape == (3, 64, 16, 16)
        np.testing.assert_allclose(z.cpu().numpy(), be.encode(sample_photos[:3]), atol=1e-5)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):  # another caller stream: ordered by events, same result
            z2 = be.encode(x)
        s.synchronize()
        torch.testing.assert_close(z, z2)


@pytest.mark.skipif("TensorrtExecutionProvider" not in _ort_providers(), reason="onnxruntime has no TensorrtExecutionProvider")
def test_ort_tensorrt_provider_caches_engines_in_the_bundle(tmp_path, bundle_all, sample_photos):
    from rpiae.engines.ort_backend import TRT_CACHE_DIR
    from rpiae.export import Bundle
    from rpiae.verify import verify_bundle

    root = tmp_path / "bundle"
    shutil.copytree(bundle_all.root, root)
    report = verify_bundle(Bundle.open(root), backend="ort", images=sample_photos, batches=[3], device="trt",
                           precisions=["fp32", "fp16"])
    assert report["ok"], report["results"]
    assert any((root / TRT_CACHE_DIR).iterdir()), "no TensorRT engine cache inside the bundle"


def test_aoti_cuda_packages(tmp_path, bundle_all, sample_photos):
    from rpiae.export import Bundle
    from rpiae.verify import verify_bundle
    from rpiae.export.aoti import cuda_toolkit
    from rpiae.verify import package_bundle
    from rpiae.export.profile import BatchProfile

    if cuda_toolkit()[0] is None:
        pytest.skip(f"no CUDA toolkit: {cuda_toolkit()[1]}")
    root = tmp_path / "bundle"
    shutil.copytree(bundle_all.root, root)
    package_bundle(Bundle.open(root), device="cuda", profile=BatchProfile(1, 2, 4), cache_dir=tmp_path / "cache",
                   progress=False)
    report = verify_bundle(Bundle.open(root), backend="aoti", images=sample_photos, batches=[1, 3], device="cuda")
    assert report["ok"], report["results"]


def test_bench_gpu_rows(tmp_path, bundle_all):
    from rpiae.bench.runner import BenchSettings, run_benchmark

    device = f"cuda:{torch.cuda.device_count() - 1}"
    settings = BenchSettings(model=str(bundle_all.root), backends=["torch", "ort", "aoti"], precisions=["fp32", "fp16"],
                             batches=[2], graphs=["encode"], device=device, threads=2, isolate=True, warmup=1,
                             warmup_time=0.0, min_iters=2, min_time=0.0, max_iters=5, peak_time=0.1, peak_size=1024,
                             row_peak_time=0.05)
    result = run_benchmark(settings, out=tmp_path / "gpu.json")
    assert "gpu" in result["machine"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert any(r["backend"] == "torch" for r in ok), [(r["backend"], r.get("reason")) for r in result["rows"]]
    for r in ok:
        assert r["compute"]["p50_ms"] > 0 and r["cuda_total_bytes"] > 0
        assert r["local_peak"]["dtype"] == r["precision"]  # each row against its own dtype's peak
    status = {(r["backend"], r["precision"]): r for r in result["rows"]}
    # torch runs both precisions on CUDA; an AOTInductor package is fp32 only, and says so
    assert status[("torch", "fp32")]["status"] == status[("torch", "fp16")]["status"] == "ok"
    assert status[("aoti", "fp16")]["status"] == "skipped" and "fp32" in status[("aoti", "fp16")]["reason"]
    others = [r for r in result["rows"] if r["status"] != "ok" and (r["backend"], r["precision"]) != ("aoti", "fp16")]
    # anything else that did not run is a runtime this GPU machine lacks, named with how to get it
    assert all(r["status"] == "skipped" and ("install" in r["reason"] or "no " in r["reason"]) for r in others), \
        [(r["backend"], r["precision"], r["status"], r.get("reason")) for r in others]


def test_deterministic_training_resumes_bit_exactly_on_cuda(tmp_path, photos, kernel_flags):
    from rpiae.training.config import load_train_config
    from rpiae.training.trainer import Trainer
    from tests.conftest import make_tiny

    def trainer(seed):
        cfg = load_train_config(2, overrides=dict(batch_size=1, epochs=1, warmup_epochs=0.0, lr=1e-3, min_lr=1e-3,
                                                  num_workers=0, deterministic=True))
        return Trainer(make_tiny(seed), cfg, tmp_path / "s2", device="cuda", steps_per_epoch=100)

    x = torch.from_numpy(photos[:2]).clone()
    a = trainer(0)
    a.train_step([x[:1]])
    state = copy.deepcopy(a.state_dict())
    logs_a = a.train_step([x[1:2]])
    b = trainer(5)
    b.load_state_dict(state)
    assert b.train_step([x[1:2]]) == logs_a
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_doctor_sees_the_gpu():
    from rpiae.cli.doctor import probe

    report = probe()
    assert report["torch"]["gpus"] and next(b for b in report["backends"]
                                            if b["backend"] == "torch" and b["device"] == "cuda")["ok"]
