"""ONNX Runtime on GPUs, checked on the CPU with a stand-in session that behaves like
onnxruntime-gpu on a machine where a provider fails to load: fallback refused (or allowed)
with ONNX Runtime's reason, device ids from cuda:N / trt:N, the TensorRT provider's cache
and profile, and I/O binding (run for real on the CPU)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from rpiae.cli.main import main as cli
from rpiae.engines import load_backend
from rpiae.engines import ort_backend as O
from rpiae.export import Bundle

_RealSession = ort.InferenceSession
ORT_WARNING = ("2026-05-01 10:00:00.000000 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1004 "
               "CreateExecutionProviderInstance] Failed to create {name}. Require cuDNN 9.* and CUDA 12.*. Please install "
               "all dependencies as mentioned in the GPU requirements page, make sure they're in the PATH, and that your "
               "GPU is supported.\n")


@pytest.fixture
def gpu_ort(monkeypatch):
    """onnxruntime-gpu as seen on a machine where `broken` providers fail to initialise:
    ONNX Runtime logs why on stderr (file descriptor 2) and runs on what is left (here the CPU)."""
    calls = []

    def install(broken=("CUDAExecutionProvider", "TensorrtExecutionProvider")):
        class Session:
            def __init__(self, path, sess_options=None, providers=None):
                calls.append(providers)
                names = [p[0] if isinstance(p, tuple) else p for p in providers]
                for name in names:
                    if name in broken:
                        os.write(2, ORT_WARNING.format(name=name).encode())
                self._used = [n for n in names if n not in broken]
                self._real = _RealSession(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

            def get_providers(self):
                return self._used

            def __getattr__(self, name):
                return getattr(self._real, name)

        monkeypatch.setattr(ort, "InferenceSession", Session)
        monkeypatch.setattr(ort, "get_available_providers",
                            lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
        monkeypatch.delenv(O.ALLOW_FALLBACK_ENV, raising=False)
        return calls

    return install


@pytest.fixture
def bundle_copy(tmp_path, bundle_all):
    root = tmp_path / "bundle"
    shutil.copytree(bundle_all.root, root)
    return Bundle.open(root)


def test_fallback_is_refused_with_onnxruntimes_reason(gpu_ort, bundle_copy):
    calls = gpu_ort()
    with pytest.raises(O.ProviderFallback) as e:
        O.ORTBackend(bundle_copy, device="cuda:1")
    msg = str(e.value)
    assert "\n" not in msg
    assert "CUDAExecutionProvider failed to initialise" in msg and "fell back to CPUExecutionProvider" in msg
    assert "Require cuDNN 9.* and CUDA 12.*" in msg and "--allow-fallback" in msg
    assert calls[0] == [("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0}), ("CPUExecutionProvider", {})]


def test_allowed_fallback_runs_and_reports_the_providers_used(gpu_ort, bundle_copy, sample_photos, capfd, monkeypatch):
    calls = gpu_ort()
    with O.ORTBackend(bundle_copy, device="cuda:1", allow_fallback=True) as be:
        z = be.encode(sample_photos[:2])
        info = be.describe()
    assert z.shape == (2, 64, 16, 16) and np.isfinite(z).all()
    assert info["providers"] == ["CPUExecutionProvider"]
    assert info["providers_requested"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert info["fallback"]["used"] == ["CPUExecutionProvider"] and "cuDNN" in info["fallback"]["reason"]
    assert info["io_binding"] is False and info["device_id"] == 1
    # the retry keeps the options of the providers that work
    assert calls[1] == [("CPUExecutionProvider", {})]
    assert "warning: ort backend: CUDAExecutionProvider failed to initialise" in capfd.readouterr().err
    monkeypatch.setenv(O.ALLOW_FALLBACK_ENV, "1")  # what --allow-fallback sets for encode/decode/verify/bench
    with O.ORTBackend(bundle_copy, device="cuda") as be:
        assert be.describe()["providers"] == ["CPUExecutionProvider"]


def test_tensorrt_provider_options_come_from_the_bundle(gpu_ort, bundle_copy):
    calls = gpu_ort(broken=())
    # engines built for 2:4:16 make that the TensorRT provider's profile too
    root = bundle_copy.root
    (root / "engines").mkdir(exist_ok=True)
    (root / "engines" / "encode.fp16.plan").write_bytes(b"plan")
    bundle_copy.add_file("engines/encode.fp16.plan", kind="trt-engine", graph="encode", precision="fp16",
                         profile={"min": 2, "opt": 4, "max": 16})
    bundle_copy.write_manifest()
    with O.ORTBackend(Bundle.open(root), device="trt:2", precision="int8") as be:
        info = be.describe()
    trt_name, trt = calls[0][0]
    assert trt_name == "TensorrtExecutionProvider" and calls[0][1] == ("CUDAExecutionProvider", {"device_id": 2, "use_tf32": 0})
    assert trt["device_id"] == 2 and trt["trt_int8_enable"] is True
    high = Bundle.open(root).files["encode.int8.onnx"]["calibration"]["high_precision"]
    assert trt["trt_fp16_enable"] is (high == "fp16")
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(root / O.TRT_CACHE_DIR)
    assert (root / O.TRT_CACHE_DIR).is_dir()
    assert trt["trt_profile_min_shapes"] == "images:2x3x256x256,latent:2x64x16x16"
    assert trt["trt_profile_opt_shapes"] == "images:4x3x256x256,latent:4x64x16x16"
    assert trt["trt_profile_max_shapes"] == "images:16x3x256x256,latent:16x64x16x16"
    assert info["providers"] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert info["profile"] == "2:4:16" and "fallback" not in info


def test_fp16_graph_enables_fp16_only(gpu_ort, bundle_copy):
    calls = gpu_ort(broken=())
    O.ORTBackend(bundle_copy, device="trt", precision="fp16").close()
    trt = calls[0][0][1]
    assert trt["trt_fp16_enable"] is True and trt["trt_int8_enable"] is False
    assert trt["trt_profile_max_shapes"].startswith("images:32x3x256x256")  # no engines: the default 1:8:32


def test_tf32_is_off_on_both_gpu_providers(gpu_ort, bundle_copy, monkeypatch):
    """FP32 is IEEE FP32: the CUDA provider gets use_tf32=0 (its default is 1); the TensorRT
    provider has no such option, so NVIDIA_TF32_OVERRIDE=0 is set before its session is made."""
    calls = gpu_ort(broken=())
    monkeypatch.setenv(O.TF32_OVERRIDE_ENV, "unset")  # recorded by monkeypatch, so removed again afterwards
    monkeypatch.delenv(O.TF32_OVERRIDE_ENV)
    with O.ORTBackend(bundle_copy, device="cuda:0") as be:
        assert be.describe()["tf32"] == "off (use_tf32=0)"
    assert calls[-1][0] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})
    assert O.TF32_OVERRIDE_ENV not in os.environ  # the CUDA provider does not need the variable

    seen = []

    class Recorder(ort.InferenceSession):  # the environment as each session sees it when it is made
        def __init__(self, *a, **k):
            seen.append(os.environ.get(O.TF32_OVERRIDE_ENV))
            super().__init__(*a, **k)

    monkeypatch.setattr(ort, "InferenceSession", Recorder)
    with O.ORTBackend(bundle_copy, device="trt") as be:
        info = be.describe()
    assert seen == ["0", "0"] and info["tf32"] == "off (NVIDIA_TF32_OVERRIDE=0)"
    trt_options, cuda_options = calls[-1][0][1], calls[-1][1][1]
    assert "use_tf32" not in trt_options and cuda_options["use_tf32"] == 0  # CUDA runs what TensorRT does not take


def test_fp16_graph_keeps_its_fp32_islands_away_from_tensorrts_fp16(gpu_ort, bundle_copy):
    """The TensorRT provider builds weakly typed networks: with fp16 on it may run fp32 layers in
    fp16. The op types that are fp32 in every node of the fp16 graph go to the CUDA provider."""
    calls = gpu_ort(broken=())
    islands = O.fp32_islands(bundle_copy.graph_path("encode", "fp16"))
    assert islands["by_type"] == ["LayerNormalization", "Softmax"]  # the export keeps these fp32
    assert "MatMul" in islands["mixed"] and "Add" in islands["mixed"]  # fp16 blocks, fp32 last projection/pos-embed
    assert O.fp32_islands(bundle_copy.graph_path("encode", "fp32")) == {"by_type": [], "mixed": []}
    with O.ORTBackend(bundle_copy, device="trt", precision="fp16") as be:
        info = be.describe()
    for (name, trt), _cuda, _cpu in calls[-2:]:
        assert name == "TensorrtExecutionProvider"
        assert trt["trt_op_types_to_exclude"] == "LayerNormalization,Softmax"
        assert trt["trt_layer_norm_fp32_fallback"] is True and trt["trt_fp16_enable"] is True
    assert info["trt_fp32_islands"]["decode"]["by_type"] == ["LayerNormalization", "Softmax"]
    O.ORTBackend(bundle_copy, device="trt", precision="fp32").close()  # fp32: nothing to keep, nothing excluded
    assert all("trt_op_types_to_exclude" not in c[0][1] and not c[0][1]["trt_fp16_enable"] for c in calls[-2:])


def test_cli_encode_refuses_fallback_in_one_line(gpu_ort, bundle_copy, tmp_path, sample_photos):
    from rpiae.imageio import save_image

    gpu_ort()
    img = save_image(sample_photos[0], tmp_path / "a.png")
    args = ["encode", "-m", str(bundle_copy.root), "-b", "ort", "-d", "cuda", str(img), "-o", str(tmp_path / "z.npy")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "fell back to CPUExecutionProvider" in errors[0] and "--allow-fallback" in errors[0]
    assert not (tmp_path / "z.npy").exists()
    r = CliRunner().invoke(cli, args, env={O.ALLOW_FALLBACK_ENV: "1"})
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "z.npy").shape == (1, 64, 16, 16)


def test_io_binding_runs_torch_tensors_without_host_arrays(bundle_copy, sample_photos):
    """The I/O-binding path, run for real on the CPU: torch tensors bound in and out."""
    x = torch.from_numpy(sample_photos[:3])
    with O.ORTBackend(bundle_copy, io_binding=True) as bound, O.ORTBackend(bundle_copy) as plain:
        assert bound.native == "torch" and plain.native == "numpy"
        z = bound.encode(x)
        assert isinstance(z, torch.Tensor) and z.shape == (3, 64, 16, 16)
        np.testing.assert_allclose(z.numpy(), plain.encode(sample_photos[:3]), rtol=0, atol=1e-6)
        y = bound.decode(z.numpy())
        assert isinstance(y, np.ndarray) and y.shape == (3, 3, 256, 256)
        np.testing.assert_allclose(y, plain.decode(z.numpy()), rtol=0, atol=1e-6)


def test_missing_provider_names_the_package_conflict(monkeypatch, bundle_copy):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(O, "_both_ort_packages", lambda: True)
    with pytest.raises(O.BackendUnavailable, match="both onnxruntime and onnxruntime-gpu are installed"):
        load_backend(bundle_copy.root, "ort", device="cuda")
    monkeypatch.setattr(O, "_both_ort_packages", lambda: False)
    with pytest.raises(O.BackendUnavailable, match="install onnxruntime-gpu"):
        load_backend(bundle_copy.root, "ort", device="trt")


def test_fallback_reason_picks_the_telling_lines():
    log = ("*************** EP Error ***************\n"
           "EP Error [ONNXRuntimeError] : 1 : FAIL : TensorRT EP failed to create engine from network. when using "
           "['TensorrtExecutionProvider', 'CUDAExecutionProvider']\n"
           "Falling back to ['CUDAExecutionProvider', 'CPUExecutionProvider'] and retrying.\n"
           "****************************************\n")
    reason = O.fallback_reason(log, "TensorrtExecutionProvider")
    assert reason.startswith("EP Error [ONNXRuntimeError] : 1 : FAIL : TensorRT EP failed to create engine")
    assert O.fallback_reason("", "CUDAExecutionProvider") == "ONNX Runtime logged no reason"
    assert "\n" not in reason and "*" not in reason and "Falling back" not in reason  # one line, no banner


def test_allow_fallback_flag_sets_the_environment_for_the_command_only(monkeypatch):
    from rpiae.cli.common import fallback_allowed

    monkeypatch.delenv(O.ALLOW_FALLBACK_ENV, raising=False)
    with fallback_allowed(True):
        assert O.fallback_allowed() is True
    assert O.ALLOW_FALLBACK_ENV not in os.environ and O.fallback_allowed() is False
    with fallback_allowed(False):
        assert O.fallback_allowed() is False


def test_memory_pattern_is_off_on_cpus_and_onnx_runtimes_default_elsewhere(gpu_ort, bundle_all, bundle_copy):
    """ONNX Runtime's memory pattern (one block for a whole run's intermediate tensors) raised the
    paper-size graphs' batch-8 peak RSS on CPUs without a gain in speed: off on the CPU provider
    unless asked for, left at ONNX Runtime's default (on) on GPUs; the sessions really get it."""

    def opened(bundle, **kw):
        with O.ORTBackend(bundle, graphs=("encode",), **kw) as be:
            return be.describe()["mem_pattern"], be.session("encode").get_session_options().enable_mem_pattern

    assert ort.SessionOptions().enable_mem_pattern  # ONNX Runtime's own default, which the CPU overrides
    assert opened(bundle_all) == (False, False)
    assert opened(bundle_all, mem_pattern=True) == (True, True)
    out = opened(bundle_all, mem_pattern=False)
    assert out == (False, False)
    gpu_ort(broken=())
    assert opened(bundle_copy, device="cuda") == (True, True)
    assert opened(bundle_copy, device="cuda", mem_pattern=False) == (False, False)
