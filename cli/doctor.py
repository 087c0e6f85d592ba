"""`rpiae doctor`: one screen saying what this machine can run, and why not.

It looks, without running any model: torch and its CUDA, the GPUs (compute capability,
free memory), the NVIDIA driver, ONNX Runtime and its providers (and the onnxruntime /
onnxruntime-gpu conflict), TensorRT, polygraphy, ModelOpt, Torch-TensorRT, tritonclient, a
C++ compiler, CMake and the CUDA toolkit (AOTInductor, the C++ runner), the CPU level and
free memory; then lists each backend/device pair as yes/no with the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import metadata
from typing import Any

import click

from rpiae.cli.common import friendly_errors

GIB = 1 << 30


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _tool_version(exe: str) -> str | None:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\d+\.\d+(\.\d+)?", out)
    return m.group(0) if m else None


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def probe_torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "gpus": []}
    info["cuda_available"] = torch.cuda.is_available()
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            info["gpus"].append({"index": i, "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                                 "memory_free_bytes": int(free), "memory_total_bytes": int(total)})
    return info


def probe_driver() -> dict[str, Any]:
    """The NVIDIA driver (nvidia-smi) and the CUDA version it supports (cuda-python)."""
    from rpiae.bench.machine import _nvidia_smi

    info: dict[str, Any] = {"nvidia_smi": _nvidia_smi() or None, "cuda_python": _version("cuda-python")}
    try:
        try:
            from cuda.bindings import driver
        except ImportError:  # cuda-python before 12.6
            from cuda import cuda as driver
        err, version = driver.cuDriverGetVersion()
        if err == driver.CUresult.CUDA_SUCCESS and version:
            info["driver_cuda"] = f"{version // 1000}.{(version % 1000) // 10}"
    except Exception as e:  # noqa: BLE001 - not installed, or no driver library
        info["driver_cuda_reason"] = _reason(e)[:160]
    return info


def probe_onnxruntime() -> dict[str, Any]:
    from rpiae.engines.ort_backend import _both_ort_packages

    info: dict[str, Any] = {"packages": {d: v for d in ("onnxruntime", "onnxruntime-gpu") if (v := _version(d))}}
    info["conflict"] = _both_ort_packages()
    try:
        import onnxruntime as ort

        info["version"] = ort.__version__
        info["providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        info["error"] = _reason(e)
    return info


def probe_import(what: str, importer) -> dict[str, Any]:
    try:
        module = importer()
    except Exception as e:  # noqa: BLE001 - each importer raises a one-line BackendUnavailable
        return {"available": False, "reason": _reason(e)}
    return {"available": True, "version": getattr(module, "__version__", None) or _version(what)}


def probe_tools() -> dict[str, Any]:
    from rpiae.export.aoti import CPU_LEVELS, DEFAULT_CPU_LEVEL, cuda_toolkit
    from rpiae.host import cpu_flags

    compiler = next((shutil.which(c) for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    cmake = shutil.which("cmake")
    root, how = cuda_toolkit()
    flags = cpu_flags()
    level = CPU_LEVELS[DEFAULT_CPU_LEVEL]["flags"]
    return {
        "compiler": {"path": compiler, "version": _tool_version(compiler) if compiler else None},
        "cmake": {"path": cmake, "version": _tool_version(cmake) if cmake else None},
        "cuda_toolkit": {"root": str(root) if root else None, "how": how},
        "cpu_level": {"level": DEFAULT_CPU_LEVEL, "ok": bool(flags) and all(f in flags for f in level),
                      "missing": [f for f in level if flags and f not in flags]},
    }


def probe() -> dict[str, Any]:
    """Everything `rpiae doctor` reports, as one JSON-able dict."""
    import psutil

    from rpiae.bench.machine import cpu_summary
    from rpiae.export.tensorrt import import_polygraphy, import_tensorrt
    from rpiae.engines.torch_trt_backend import import_torch_tensorrt

    def polygraphy():
        import_polygraphy()
        import polygraphy as module

        return module

    vm = psutil.virtual_memory()
    report: dict[str, Any] = {
        "torch": probe_torch(),
        "driver": probe_driver(),
        "onnxruntime": probe_onnxruntime(),
        "tensorrt": probe_import("tensorrt", import_tensorrt),
        "polygraphy": probe_import("polygraphy", polygraphy),
        "modelopt": {"version": _version("nvidia-modelopt")},
        "torch_tensorrt": probe_import("torch-tensorrt", import_torch_tensorrt),
        "tritonclient": {"version": _version("tritonclient")},
        "tools": probe_tools(),
        "cpu": {**cpu_summary(), "cores": psutil.cpu_count()},
        "memory": {"available_bytes": int(vm.available), "total_bytes": int(vm.total)},
    }
    report["backends"] = can_run(report)
    return report


def can_run(r: dict[str, Any]) -> list[dict[str, Any]]:
    """(backend, device, yes/no, why) for every way rpiae can run, from a `probe()` report."""
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
    trt, poly, ttrt = r["tensorrt"], r["polygraphy"], r["torch_tensorrt"]

    def row(backend, device, why_not):
        return {"backend": backend, "device": device, "ok": why_not is None, "why": why_not}

    def ort_on(provider):
        if "version" not in ort:
            return ort_missing
        if provider not in providers:
            return conflict if ort["conflict"] else f"this onnxruntime has no {provider} (pip install -e '.[gpu]')"
        return None if gpu else no_gpu

    compiler = None if tools["compiler"]["path"] else "no C++ compiler (g++/clang++) on PATH"
    cpu_level = None if tools["cpu_level"]["ok"] else f"this CPU lacks {', '.join(tools['cpu_level']['missing']) or 'x86-64-v3'}"
    return [
        row("torch", "cpu", None),
        row("torch", "cuda", None if gpu else no_gpu),
        row("ort", "cpu", None if "CPUExecutionProvider" in providers else ort_missing),
        row("ort", "cuda", ort_on("CUDAExecutionProvider")),
        row("ort", "trt", ort_on("TensorrtExecutionProvider") or (None if trt["available"] else trt["reason"])),
        row("trt", "cuda", trt.get("reason") or poly.get("reason") or (None if gpu else no_gpu)),
        row("torch-trt", "cuda", ttrt.get("reason") or (None if gpu else no_gpu)),
        row("aoti", "cpu", compiler or cpu_level),
        row("aoti", "cuda", (None if gpu else no_gpu) or compiler
            or (None if tools["cuda_toolkit"]["root"] else f"no CUDA toolkit: {tools['cuda_toolkit']['how']}")),
        row("export fp16/int8", "-", None if r["modelopt"]["version"] else "nvidia-modelopt is not installed (pip install -e '.[quant]')"),
        row("C++ runner", "-", compiler or (None if tools["cmake"]["path"] else "cmake is not on PATH")),
        row("triton repository", "-", None if r["tritonclient"]["version"] else "tritonclient is not installed (pip install -e '.[triton]')"),
    ]


def _short(text: str, width: int = 88) -> str:
    """The first clause of a reason, for the one-screen view (--json keeps it whole)."""
    first = re.split(r" \(|; |: pip ", text)[0]
    return first if len(first) <= width else first[: width - 3] + "..."


def render(r: dict[str, Any]) -> str:
    t, ort, tools, drv = r["torch"], r["onnxruntime"], r["tools"], r["driver"]
    lines = ["rpiae doctor: what this machine can run"]

    def add(name, text):
        lines.append(f"  {name:15} {text}")

    add("torch", f"{t['version']}, " + (f"CUDA {t['cuda_build']} build" if t["cuda_build"] else "CPU build (no CUDA)"))
    for g in t["gpus"]:
        add(f"GPU {g['index']}", f"{g['name']}, compute capability {g['compute_capability']}, "
            f"{g['memory_free_bytes'] / GIB:.1f} of {g['memory_total_bytes'] / GIB:.1f} GiB free")
    if not t["gpus"]:
        add("GPU", "none visible to torch")
    smi = drv["nvidia_smi"]
    add("NVIDIA driver", (f"{smi.get('driver')}" if smi else "nvidia-smi not found")
        + (f", supports CUDA {drv['driver_cuda']}" if drv.get("driver_cuda") else "")
        + ("" if drv["cuda_python"] else " (cuda-python not installed)"))
    pkgs = " + ".join(f"{k} {v}" for k, v in ort["packages"].items()) or "not installed"
    add("onnxruntime", pkgs + (f": {', '.join(ort['providers'])}" if ort.get("providers") else ""))
    if ort["conflict"]:
        add("", "!! onnxruntime and onnxruntime-gpu are both installed: one hides the other's providers")
    for key, name in (("tensorrt", "TensorRT"), ("polygraphy", "polygraphy"), ("torch_tensorrt", "Torch-TensorRT")):
        p = r[key]
        add(name, p["version"] if p["available"] else f"no: {_short(p['reason'])}")
    add("ModelOpt", r["modelopt"]["version"] or "not installed")
    add("tritonclient", r["tritonclient"]["version"] or "not installed")
    c, m, k = tools["compiler"], tools["cmake"], tools["cuda_toolkit"]
    add("C++ / CMake", f"{c['path'] or 'no compiler'} {c['version'] or ''} / cmake {m['version'] or 'not found'}".replace("  ", " "))
    add("CUDA toolkit", k["root"] or f"none: {_short(k['how'])}")
    lvl = tools["cpu_level"]
    add("CPU", f"{r['cpu'].get('model')}, {r['cpu'].get('cores')} cores, {lvl['level']}: "
        + ("yes" if lvl["ok"] else f"no ({', '.join(lvl['missing'])})")
        + (f"; {' '.join(r['cpu']['flags'])}" if r["cpu"].get("flags") else ""))
    add("memory", f"{r['memory']['available_bytes'] / GIB:.1f} of {r['memory']['total_bytes'] / GIB:.1f} GiB free")
    lines.append("can run:")
    for b in r["backends"]:
        label = f"{b['backend']}" + (f" --device {b['device']}" if b["device"] != "-" else "")
        lines.append(f"  {'yes' if b['ok'] else 'no ':3}  {label:24} {'' if b['ok'] else _short(b['why'])}".rstrip())
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@friendly_errors
def doctor(as_json):
    """What this machine can run (torch, ONNX Runtime, TensorRT, AOTInductor, Torch-TensorRT,
    Triton, the C++ runner) and, for what it cannot, why. Runs no model."""
    report = probe()
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
