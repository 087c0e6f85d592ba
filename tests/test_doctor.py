"""`rpiae doctor`: runs here (and in CI), one screen and --json; what it concludes from a
machine with a GPU, onnxruntime-gpu, and the package conflict (stand-in probe results)."""

from __future__ import annotations

import json

import pytest

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
                 "tritonserver", "C++ / CMake", "CUDA toolkit", "CPU", "memory"):
        assert any(line.strip().startswith(name) for line in lines), name


def test_doctor_json():
    r = CliRunner().invoke(cli, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert {"torch", "driver", "onnxruntime", "tensorrt", "polygraphy", "modelopt", "torch_tensorrt", "tritonclient",
            "tools", "cpu", "memory", "backends", "stack"} <= set(report)
    assert report["stack"]["findings"] == []  # a CPU machine has no CUDA stack to mismatch
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


def test_strict_passes_here_and_says_no_gpu_is_present():
    r = CliRunner().invoke(cli, ["doctor", "--strict"])
    assert r.exit_code == 0, r.output
    assert "no GPU present" in r.output.splitlines()[-1]


def test_flags_wrap_on_cpus_with_many_of_them():
    """An AMX server's model name and flags must not make one overlong line (any x86-64 CPU)."""
    from rpiae.bench.machine import _CPU_FLAGS

    report = json.loads(json.dumps(D.probe(), default=str))
    report["cpu"].update(model="Intel(R) Xeon(R) Platinum 8480+ with a long marketing name", flags=list(_CPU_FLAGS) * 3)
    lines = D.render(report).splitlines()
    assert all(len(line) <= 140 for line in lines), max(lines, key=len)
    shown = " ".join(line.strip() for line in lines[next(i for i, l in enumerate(lines) if l.lstrip().startswith("CPU")):])
    assert all(f in shown for f in _CPU_FLAGS)


@pytest.mark.parametrize("saturate", [True, False])
def test_int8_saturation_is_named_with_its_fix(saturate):
    """Whether this CPU's int8 kernels saturate comes from its flags (rpiae.precisions); the
    doctor says so, and what to do, only where they do (set here, not read from this machine)."""
    report = json.loads(json.dumps(D.probe(), default=str))
    assert isinstance(report["cpu"]["int8_pairs_saturate"], bool)
    report["cpu"]["int8_pairs_saturate"] = saturate
    text = D.render(report)
    assert ("--int8-weight-bits 7" in text) is saturate and ("int8 on CPU" in text) is saturate
    assert all(len(line) <= 140 for line in text.splitlines())


def test_strict_fails_on_a_cuda_mismatch_and_a_provider_that_cannot_start(monkeypatch):
    here = json.loads(json.dumps(D.probe(), default=str))
    gpu = _gpu_machine(here, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    gpu["stack"] = {"majors": {"torch": {"major": 13, "from": "torch.version.cuda = 13.0"},
                               "onnxruntime": {"major": 12, "from": "libonnxruntime_providers_cuda.so needs libcudart.so.12"}},
                    "findings": [{"what": "CUDA majors differ: torch CUDA 13, onnxruntime CUDA 12",
                                  "fix": "reinstall one stack: pip install -c constraints/gpu-cu13.txt -e \".[test,gpu-cu13]\""}]}
    gpu["onnxruntime"]["proven"] = [
        {"provider": "CUDAExecutionProvider", "ok": False, "used": ["CPUExecutionProvider"],
         "reason": "ran on CPUExecutionProvider: Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 12.*"},
        {"provider": "TensorrtExecutionProvider", "ok": True, "used": ["TensorrtExecutionProvider"], "reason": None}]
    gpu["backends"] = D.can_run(gpu)
    assert not _row(gpu, "ort", "cuda")["ok"] and "did not start" in _row(gpu, "ort", "cuda")["why"]
    assert _row(gpu, "ort", "trt")["ok"]
    text = D.render(gpu)
    assert "!! CUDA majors differ: torch CUDA 13, onnxruntime CUDA 12" in text and "fix: reinstall one stack" in text
    assert "CUDAExecutionProvider: did NOT start" in text and "TensorrtExecutionProvider: started and ran" in text
    monkeypatch.setattr(D, "probe", lambda: gpu)
    r = CliRunner().invoke(cli, ["doctor", "--strict"])
    assert r.exit_code == 1
    assert "strict: CUDA majors differ" in r.output and "strict: ONNX Runtime's CUDAExecutionProvider cannot start" in r.output
    assert CliRunner().invoke(cli, ["doctor"]).exit_code == 0  # without --strict the report alone


def test_provider_proof_runs_a_session_and_reports_what_ran(monkeypatch):
    """Each GPU provider opens a one-node session with rpiae's options and runs it; a provider
    ONNX Runtime silently dropped is reported with its logged reason, not as working."""
    import os

    import onnxruntime as ort

    from rpiae.engines import ort_backend as O

    real = ort.InferenceSession
    made = []

    class Session:  # onnxruntime-gpu where the CUDA provider fails to load and TensorRT works
        def __init__(self, model, sess_options=None, providers=None):
            made.append((providers, os.environ.get(O.TF32_OVERRIDE_ENV)))
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            self._used = [n for n in names if n != "CUDAExecutionProvider"]
            if names[0] == "CUDAExecutionProvider":
                os.write(2, b"[W:onnxruntime:Default] Failed to create CUDAExecutionProvider. Require cuDNN 9.*\n")
            self._real = real(model, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return self._used

        def run(self, *a):
            return self._real.run(*a)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setenv(O.TF32_OVERRIDE_ENV, "unset")
    monkeypatch.delenv(O.TF32_OVERRIDE_ENV)
    cuda, trt = D.prove_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda["provider"] == "CUDAExecutionProvider" and not cuda["ok"]
    assert "Failed to create CUDAExecutionProvider" in cuda["reason"] and cuda["used"] == ["CPUExecutionProvider"]
    assert trt["ok"] and trt["used"][0] == "TensorrtExecutionProvider"
    (cuda_chain, tf32_then), (trt_chain, tf32_trt) = made
    assert cuda_chain[0] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0}) and tf32_then is None
    assert trt_chain[0][0] == "TensorrtExecutionProvider" and tf32_trt == "0"


def test_check_constraints_refuses_a_file_without_its_cuda_major(tmp_path):
    f = tmp_path / "gpu.txt"
    f.write_text("torch==2.13.0\n")
    r = CliRunner().invoke(cli, ["doctor", "--check-constraints", str(f)])
    assert r.exit_code == 2 and "must name its CUDA major" in r.output
    r = CliRunner().invoke(cli, ["doctor", str(f)])
    assert r.exit_code == 2 and "--check-constraints" in r.output


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
    assert any("both installed" in p for p in D.strict_problems(clash))  # --strict fails on it


def test_openvino_rows_follow_what_its_cpu_plugin_reports():
    pytest.importorskip("openvino", reason="OpenVINO is not installed: pip install -e '.[openvino]'")
    report = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)
    assert report["openvino"]["available"] and "FP32" in report["openvino"]["capabilities"]
    assert _row(report, "openvino", "cpu")["ok"]
    for caps, ok in ((["FP32", "INT8"], False), (["FP32", "INT8", "BF16"], True)):
        report["openvino"]["capabilities"] = caps
        row = _row({"backends": D.can_run(report)}, "openvino -p bf16", "cpu")
        assert row["ok"] is ok and (ok or "this CPU has no bf16 (OpenVINO: FP32, INT8)" in row["why"]), row
    report["openvino"] = {"available": False, "reason": "OpenVINO is not installed: pip install -e '.[openvino]'"}
    rows = D.can_run(report)
    assert not _row({"backends": rows}, "openvino", "cpu")["ok"] and not _row({"backends": rows}, "openvino -p bf16", "cpu")["ok"]


def test_rows_come_from_the_registry_and_every_requirement_is_probed():
    """One row per registered backend and device (and per precision that needs more), each
    decided by the requirements its registry entry declares; a requirement the doctor cannot
    probe, or a backend needing an unknown one, fails here."""
    from rpiae.cli.can_run import requirement_problems
    from rpiae.export.backends import REGISTRY, REQUIREMENTS

    report = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)
    assert set(requirement_problems(report)) == set(REQUIREMENTS)
    for info in REGISTRY.values():
        needs = {n for names in (*info.requires.values(), *info.precision_requires.values()) for n in names}
        assert needs <= set(REQUIREMENTS), (info.name, needs - set(REQUIREMENTS))
    rows = {(r["backend"], r["device"]) for r in D.can_run(report)}
    expected = {(i.name, d) for i in REGISTRY.values() for d in i.devices}
    expected |= {(f"{i.name} -p {p}", d) for i in REGISTRY.values() for d in i.devices for p in i.precision_requires}
    assert expected <= rows and len([r for r in rows if r[1] != "-"]) == len(expected)
    # a requirement that fails makes exactly the rows that declare it fail, with its reason
    report["tools"]["compiler"]["path"] = None
    failed = {(r["backend"], r["device"]): r["why"] for r in D.can_run(report) if not r["ok"]}
    assert failed[("aoti", "cpu")] == failed[("C++ runner", "-")] == "no C++ compiler (g++/clang++) on PATH"
