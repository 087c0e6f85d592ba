"""What this machine can run, from a `rpiae doctor` probe report: each registered backend on
each of its devices (and each precision that needs more), decided by the requirements its
registry entry declares (`rpiae.export.backends.REQUIREMENTS`), then the tools around them."""

from __future__ import annotations

from typing import Any

from rpiae.export.backends import REGISTRY


def requirement_problems(r: dict[str, Any]) -> dict[str, str | None]:
    """Why this machine lacks each requirement a backend can declare (`REQUIREMENTS` of
    `rpiae.export.backends`; None: it has it), from a `probe()` report."""
    gpu = bool(r["torch"]["gpus"])
    no_gpu = ("no CUDA GPU: torch.cuda.is_available() is False"
              + ("" if r["torch"]["cuda_build"] else " (a CPU build of torch; install a CUDA build of torch 2.13)"))
    ort = r["onnxruntime"]
    providers = ort.get("providers", [])
    from rpiae.engines.ort_backend import ORT_MISSING

    ort_missing = ort.get("error") or ORT_MISSING
    conflict = ("both onnxruntime and onnxruntime-gpu are installed (the CUDA providers are hidden): "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    tools = r["tools"]
    ov = r.get("openvino") or {"available": False, "reason": "not probed"}
    proven = {p["provider"]: p for p in ort.get("proven", [])}

    def ort_on(provider):
        if "version" not in ort:
            return ort_missing
        if provider not in providers:
            return conflict if ort["conflict"] else f"this onnxruntime has no {provider} (install a GPU stack: README, GPU)"
        if not gpu:
            return no_gpu
        if provider in proven and not proven[provider]["ok"]:
            return f"{provider} did not start: {proven[provider]['reason']}"
        return None

    return {
        "gpu": None if gpu else no_gpu,
        "ort-cpu": None if "CPUExecutionProvider" in providers else ort_missing,
        "ort-cuda": ort_on("CUDAExecutionProvider"),
        "ort-trt": ort_on("TensorrtExecutionProvider"),
        "tensorrt": r["tensorrt"].get("reason"),
        "polygraphy": r["polygraphy"].get("reason"),
        "torch-tensorrt": r["torch_tensorrt"].get("reason"),
        "openvino": None if ov["available"] else ov["reason"],
        "openvino-bf16": (None if "BF16" in ov.get("capabilities", []) else
                          f"this CPU has no bf16 (OpenVINO: {', '.join(ov.get('capabilities', []))}); "
                          "needs AMX or AVX512-BF16"),
        "compiler": None if tools["compiler"]["path"] else "no C++ compiler (g++/clang++) on PATH",
        "cpu-level": (None if tools["cpu_level"]["ok"]
                      else f"this CPU lacks {', '.join(tools['cpu_level']['missing']) or 'x86-64-v3'}"),
        "cuda-toolkit": None if tools["cuda_toolkit"]["root"] else f"no CUDA toolkit: {tools['cuda_toolkit']['how']}",
    }


def can_run(r: dict[str, Any]) -> list[dict[str, Any]]:
    """(backend, device, yes/no, why) for every way rpiae can run, from a `probe()` report: each
    registered backend on each of its devices (and each precision that needs more), by the
    requirements its registry entry declares, then the tools around them."""
    problems = requirement_problems(r)

    def row(what, device, needs=(), why_not=None):  # a missing requirement first, then the row's own reason
        why_not = next((problems[n] for n in needs if problems[n]), None) or why_not
        return {"backend": what, "device": device, "ok": why_not is None, "why": why_not}

    rows = []
    for info in REGISTRY.values():
        for device in info.devices:
            needs = info.requires.get(device, ())
            rows.append(row(info.name, device, needs))
            rows += [row(f"{info.name} -p {p}", device, needs + more) for p, more in info.precision_requires.items()]
    return rows + [
        row("export fp16/int8", "-", why_not=None if r["modelopt"]["version"]
            else "nvidia-modelopt is not installed (pip install -e '.[quant]')"),
        row("C++ runner", "-", ("compiler",), None if r["tools"]["cmake"]["path"] else "cmake is not on PATH"),
        row("triton repository", "-", why_not=None if r["tritonclient"]["version"]
            else "tritonclient is not installed (pip install -e '.[triton]')"),
        row("rpiae serve", "-", why_not=None if r["tritonserver"]["path"] else r["tritonserver"]["reason"]),
    ]
