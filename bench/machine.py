"""Machine facts recorded with every result: CPU, GPU, driver, library versions, load."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from typing import Any

from rpiae.devices import torch_device
from rpiae.host import cpu_info
from rpiae.host import library_versions as host_library_versions

LIBRARIES = ("rpiae", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt", "tensorrt-cu12", "polygraphy",
             "torch-tensorrt", "nvidia-modelopt", "psutil", "matplotlib")
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8",
              "amx_tile")


def cpu_summary() -> dict[str, Any]:
    """{"model", "flags": the SIMD/matrix flags of _CPU_FLAGS this CPU has}."""
    info = cpu_info()
    return {"model": info["model"], "flags": [f for f in _CPU_FLAGS if f in info["flags"]]}


def library_versions() -> dict[str, str]:
    return host_library_versions(LIBRARIES)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _nvidia_smi() -> dict[str, str]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return {}
    try:
        line = subprocess.run(
            [exe, "--query-gpu=driver_version,name,clocks.max.sm,power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    parts = [p.strip() for p in line.split(",")]
    keys = ("driver", "name", "max_sm_clock", "power_limit")
    return dict(zip(keys, parts))


def machine_facts(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    import psutil
    import torch

    cpu = cpu_summary()
    facts: dict[str, Any] = {
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": {
            **cpu,
            "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        },
        "memory_bytes": psutil.virtual_memory().total,
        "threads": {"benchmark": threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "libraries": library_versions(),
        "load_average": load_average(),
    }
    try:
        import onnxruntime as ort

        facts["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    from rpiae.bench.peak import on_cuda

    if on_cuda(device) and torch.cuda.is_available():
        idx = torch_device(device).index
        idx = torch.cuda.current_device() if idx is None else idx
        props = torch.cuda.get_device_properties(idx)
        facts["gpu"] = {
            "name": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count,
            "cuda_runtime": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            **{k: v for k, v in _nvidia_smi().items() if k != "name"},
        }
    return facts


def machine_slug(facts: dict[str, Any]) -> str:
    """A file-name-safe machine label: the GPU name, else `cpu-<cores>c-<model>`."""
    if "gpu" in facts:
        name = facts["gpu"]["name"]
    else:
        c = facts["cpu"]
        model = re.sub(r"\(R\)|\(TM\)|CPU|Processor|@.*", "", c.get("model") or "cpu")
        name = f"cpu-{c.get('usable_cores')}c-{model}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "machine"
