"""`rpiae doctor`: runs here (and in CI), one screen and --json; what it concludes from a
machine with a GPU, onnxruntime-gpu, and the package conflict (stand-in probe results)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from rpiae.cli import doctor as D
from rpiae.cli.main import main as cli


def _row(report, backend, device):
    return next(b for b in report["backends"] if b["backend"] == backend and b["device"] == device)


def test_doctor_runs_here_on_one_screen():
    r = CliRunner().invoke(cli, ["doctor"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("rpiae doctor") and "can run:" in lines and len(lines) <= 40
    assert all(len(line) <= 140 for line in lines), max(lines, key=len)
    assert any(line.split()[:3] == ["yes", "torch", "--device"] and line.endswith("cpu") for line in lines)
    for name in ("torch", "onnxruntime", "TensorRT", "polygraphy", "ModelOpt", "Torch-TensorRT", "tritonclient",
                 "C++ / CMake", "CUDA toolkit", "CPU", "memory"):
        assert any(line.strip().startswith(name) for line in lines), name


def test_doctor_json():
    r = CliRunner().invoke(cli, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert {"torch", "driver", "onnxruntime", "tensorrt", "polygraphy", "modelopt", "torch_tensorrt", "tritonclient",
            "tools", "cpu", "memory", "backends"} <= set(report)
    assert _row(report, "torch", "cpu")["ok"] and _row(report, "ort", "cpu")["ok"]
    assert "CPUExecutionProvider" in report["onnxruntime"]["providers"]
    for b in report["backends"]:
        assert b["ok"] == (b["why"] is None), b


def _gpu_machine(report, providers, conflict=False, toolkit=True):
    report = json.loads(json.dumps(report))
    report["torch"].update(cuda_build="12.8", cuda_available=True, gpus=[{
        "index": 0, "name": "NVIDIA H100", "compute_capability": "9.0", "memory_free_bytes": 70 << 30,
        "memory_total_bytes": 80 << 30}])
    report["onnxruntime"].update(providers=providers, conflict=conflict)
    report["tools"]["cuda_toolkit"] = {"root": "/usr/local/cuda" if toolkit else None, "how": "nvcc at /usr/bin/nvcc"}
    report["tensorrt"] = {"available": True, "version": "10.13.0.35"}
    report["polygraphy"] = {"available": True, "version": "0.53.6"}
    report["backends"] = D.can_run(report)
    return report


def test_conclusions_on_a_gpu_machine():
    here = D.probe()
    gpu = _gpu_machine(here, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    for backend, device in (("torch", "cuda"), ("ort", "cuda"), ("ort", "trt"), ("trt", "cuda"), ("aoti", "cuda")):
        assert _row(gpu, backend, device)["ok"], _row(gpu, backend, device)
    text = D.render(gpu)
    assert "GPU 0           NVIDIA H100, compute capability 9.0, 70.0 of 80.0 GiB free" in text
    # onnxruntime and onnxruntime-gpu both installed: the CPU package's files hide the CUDA provider
    clash = _gpu_machine(here, ["CPUExecutionProvider"], conflict=True, toolkit=False)
    assert "both onnxruntime and onnxruntime-gpu are installed" in _row(clash, "ort", "cuda")["why"]
    assert "!! onnxruntime and onnxruntime-gpu are both installed" in D.render(clash)
    assert "no CUDA toolkit" in _row(clash, "aoti", "cuda")["why"]
