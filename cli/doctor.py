"""`rpiae doctor`: one screen saying what this machine can run, and why not.

It looks, without running any model: torch and its CUDA, the GPUs (compute capability,
free memory), the NVIDIA driver, ONNX Runtime and its providers (and the onnxruntime /
onnxruntime-gpu conflict), TensorRT, polygraphy, ModelOpt, Torch-TensorRT, tritonclient, a
C++ compiler, CMake and the CUDA toolkit (AOTInductor, the C++ runner), the CPU level and
free memory; then lists each backend/device pair as yes/no with the reason.

It proves rather than lists where a list can lie: on a GPU, each GPU provider ONNX Runtime
offers opens a one-node session and runs it, and the provider that actually ran (or ONNX
Runtime's reason) is reported; the CUDA major of torch, ONNX Runtime (the libcudart its CUDA
provider links), TensorRT and cuDNN (their packages) are compared, and a mismatch is named
with the command that fixes it. `--strict` exits 1 on a mismatch or a provider that cannot
start. `--check-constraints` checks the repository's GPU constraints files against the
pinned packages' published metadata (needs the package index; skipped, exit 0, without it).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import textwrap
from typing import Any

import sys
from pathlib import Path

import click

from rpiae.cli.common import friendly_errors
from rpiae.cli.can_run import can_run
from rpiae.host import dist_version

GIB = 1 << 30


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

    info: dict[str, Any] = {"nvidia_smi": _nvidia_smi() or None, "cuda_python": dist_version("cuda-python")}
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

    info: dict[str, Any] = {"packages": {d: v for d in ("onnxruntime", "onnxruntime-gpu") if (v := dist_version(d))}}
    info["conflict"] = _both_ort_packages()
    try:
        import onnxruntime as ort

        info["version"] = ort.__version__
        info["providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        info["error"] = _reason(e)
    return info


def _tiny_model() -> bytes:
    """A one-node float32 ONNX model (y = x + x), opset 17: what every provider can take."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "doctor", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return model.SerializeToString()


def prove_providers(providers: list[str]) -> list[dict[str, Any]]:
    """Open a one-node session on each GPU provider in `providers` (with the options rpiae's
    ONNX Runtime backend uses) and run it once: {"provider", "ok", "used", "reason"}."""
    import numpy as np
    import onnxruntime as ort

    from rpiae.devices import BackendUnavailable
    from rpiae.engines.ort_backend import captured_output, cuda_provider_options, fallback_reason, tf32_off_for_tensorrt
    from rpiae.export.tensorrt import import_tensorrt

    model = _tiny_model()
    out = []
    for provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        if provider not in providers:
            continue
        cuda = ("CUDAExecutionProvider", cuda_provider_options(0))
        chain = [cuda] if provider == "CUDAExecutionProvider" else [(provider, {"device_id": 0}), cuda]
        if provider == "TensorrtExecutionProvider":
            tf32_off_for_tensorrt()
            with contextlib.suppress(BackendUnavailable):
                import_tensorrt()  # loads libnvinfer from the tensorrt wheel, as the backend does
        opts = ort.SessionOptions()
        opts.log_severity_level = 2
        row: dict[str, Any] = {"provider": provider, "ok": False, "used": [], "reason": None}
        with captured_output() as log:
            try:
                sess = ort.InferenceSession(model, sess_options=opts, providers=[*chain, "CPUExecutionProvider"])
                row["used"] = list(sess.get_providers())
                y = sess.run(None, {"x": np.ones((1, 8), np.float32)})[0]
                row["ok"] = provider in row["used"] and bool(np.all(y == 2))
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own error types
                row["reason"] = _reason(e)[:300]
        if not row["ok"] and row["reason"] is None:
            row["reason"] = (f"ran on {', '.join(row['used'])}: " if row["used"] else "") + fallback_reason(
                log[0] if log else "", provider)
        out.append(row)
    return out


def probe_stack(report: dict[str, Any]) -> dict[str, Any]:
    """The CUDA major of each GPU package here and what does not match (rpiae.cuda_stack)."""
    from rpiae.cuda_stack import environment_majors, stack_findings

    majors = environment_majors(report["torch"].get("cuda_build"))
    if not report["torch"].get("cuda_build"):
        majors.pop("torch", None)  # a CPU build of torch: no CUDA to match
    findings = stack_findings(majors, report["driver"].get("driver_cuda"))
    return {"majors": majors, "findings": [{"what": f.what, "fix": f.fix} for f in findings]}


def probe_import(what: str, importer) -> dict[str, Any]:
    try:
        module = importer()
    except Exception as e:  # noqa: BLE001 - each importer raises a one-line BackendUnavailable
        return {"available": False, "reason": _reason(e)}
    return {"available": True, "version": getattr(module, "__version__", None) or dist_version(what)}


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
    from rpiae.engines.torch_trt_backend import import_torch_tensorrt
    from rpiae.export.tensorrt import import_polygraphy, import_tensorrt
    from rpiae.host import cpu_flags
    from rpiae.precisions import int8_pairs_saturate

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
        "modelopt": {"version": dist_version("nvidia-modelopt")},
        "torch_tensorrt": probe_import("torch-tensorrt", import_torch_tensorrt),
        "tritonclient": {"version": dist_version("tritonclient")},
        "tritonserver": probe_tritonserver(),
        "openvino": probe_openvino(),
        "tools": probe_tools(),
        "cpu": {**cpu_summary(), "cores": psutil.cpu_count(), "int8_pairs_saturate": int8_pairs_saturate(cpu_flags())},
        "memory": {"available_bytes": int(vm.available), "total_bytes": int(vm.total)},
    }
    report["stack"] = probe_stack(report)
    gpu_providers = [p for p in report["onnxruntime"].get("providers", []) if p != "CPUExecutionProvider"]
    if report["torch"]["gpus"] and gpu_providers:
        report["onnxruntime"]["proven"] = prove_providers(gpu_providers)
    report["backends"] = can_run(report)
    return report


def strict_problems(r: dict[str, Any]) -> list[str]:
    """What `--strict` fails on: a CUDA stack mismatch, or a GPU provider that cannot start."""
    out = [f"{f['what']} (fix: {f['fix']})" for f in r["stack"]["findings"]]
    if r["onnxruntime"].get("conflict"):
        out.append("onnxruntime and onnxruntime-gpu are both installed (fix: pip uninstall -y onnxruntime "
                   "onnxruntime-gpu, then the GPU stack's install command again)")
    out += [f"ONNX Runtime's {p['provider']} cannot start: {p['reason']}"
            for p in r["onnxruntime"].get("proven", []) if not p["ok"]]
    return out


def probe_openvino() -> dict[str, Any]:
    """OpenVINO's version and what its CPU plugin says this CPU computes natively (BF16 on AMX /
    AVX512-BF16 CPUs: what `--backend openvino --precision bf16` needs)."""
    from rpiae.engines.openvino_backend import cpu_capabilities, import_openvino

    try:
        ov = import_openvino()
        return {"available": True, "version": ov.get_version(), "capabilities": cpu_capabilities(ov.Core())}
    except Exception as e:  # noqa: BLE001 - BackendUnavailable, or a CPU plugin that cannot start
        return {"available": False, "reason": _reason(e)}


def probe_tritonserver() -> dict[str, Any]:
    """The tritonserver `rpiae serve` would run (not started here)."""
    from rpiae.engines.triton_server import find_tritonserver, missing_reason

    install = find_tritonserver()
    if install is None:
        return {"path": None, "found": None, "reason": missing_reason()}
    if install.problem():
        return {"path": None, "found": None, "reason": install.problem()}
    return {"path": str(install.binary), "found": install.describe(), "reason": None}


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
    for p in ort.get("proven", []):
        add("", f"{p['provider']}: " + ("started and ran a session" if p["ok"] else f"did NOT start: {_short(p['reason'], 100)}"))
    for key, name in (("tensorrt", "TensorRT"), ("polygraphy", "polygraphy"), ("torch_tensorrt", "Torch-TensorRT")):
        p = r[key]
        add(name, p["version"] if p["available"] else f"no: {_short(p['reason'])}")
    add("ModelOpt", r["modelopt"]["version"] or "not installed")
    add("tritonclient", r["tritonclient"]["version"] or "not installed")
    add("tritonserver", r["tritonserver"]["found"] or f"no: {_short(r['tritonserver']['reason'])}")
    ov = r.get("openvino") or {}
    add("OpenVINO", f"{ov['version']} (CPU: {', '.join(ov['capabilities'])})" if ov.get("available")
        else f"no: {_short(ov.get('reason', 'not probed'))}")
    c, m, k = tools["compiler"], tools["cmake"], tools["cuda_toolkit"]
    add("C++ / CMake", f"{c['path'] or 'no compiler'} {c['version'] or ''} / cmake {m['version'] or 'not found'}".replace("  ", " "))
    add("CUDA toolkit", k["root"] or f"none: {_short(k['how'])}")
    stack = r.get("stack") or {"majors": {}, "findings": []}
    def major(key, v):
        m = v["major"] if v["major"] is not None else "?"
        return f"ONNX Runtime's TensorRT provider needs TensorRT {m}" if key == "ort_trt_provider" else f"{key} CUDA {m}"

    add("CUDA majors", ", ".join(major(k, v) for k, v in stack["majors"].items()) or "no GPU packages installed")
    for f in stack["findings"]:
        add("", f"!! {f['what']}")
        add("", f"   fix: {f['fix']}")
    lvl = tools["cpu_level"]
    add("CPU", f"{r['cpu'].get('model')}, {r['cpu'].get('cores')} cores, {lvl['level']}: "
        + ("yes" if lvl["ok"] else f"no ({', '.join(lvl['missing'])})"))
    if r["cpu"].get("flags"):  # as many lines as this CPU's flags need (AMX machines have many)
        for chunk in textwrap.wrap(" ".join(r["cpu"]["flags"]), width=100):
            add("", chunk)
    if r["cpu"].get("int8_pairs_saturate"):
        add("int8 on CPU", "no VNNI: int8 kernels saturate with 8-bit weights (ort runs them u8 x u8: exact, slower;")
        add("", "openvino as they are); export with --int8-weight-bits 7 for this CPU")
    add("memory", f"{r['memory']['available_bytes'] / GIB:.1f} of {r['memory']['total_bytes'] / GIB:.1f} GiB free")
    lines.append("can run:")
    for b in r["backends"]:
        label = f"{b['backend']}" + (f" --device {b['device']}" if b["device"] != "-" else "")
        lines.append(f"  {'yes' if b['ok'] else 'no ':3}  {label:30} {'' if b['ok'] else _short(b['why'])}".rstrip())
    if not t["gpus"]:
        lines.append("no GPU present: the GPU checks (providers, CUDA stack) have nothing to prove on this machine")
    return "\n".join(lines)


def check_constraints(paths: tuple[str, ...]) -> tuple[str, int]:
    """(report text, exit code) of checking constraints files against the published metadata:
    1 if a file mixes CUDA majors or leaves a CUDA-bearing requirement unpinned, 0 if all pass or
    the package index cannot be reached (said in the text)."""
    from rpiae.cuda_stack import STACKS, Unreachable, check_stack, constraints_dir, read_constraints, render_stack

    if paths:
        files = []
        for p in paths:
            m = re.search(r"cu(\d\d)", p)
            if not m:
                raise click.BadParameter(f"{p}: the file name must name its CUDA major (gpu-cu12.txt, gpu-cu13.txt)")
            files.append((p, int(m.group(1))))
    else:
        files = [(str(constraints_dir() / Path(s["file"]).name), major) for major, s in sorted(STACKS.items())]
    texts, failed = [], False
    for path, major in files:
        if not Path(path).is_file():
            raise click.ClickException(f"{path}: no such constraints file")
        try:  # a malformed file: one line naming it (packaging's own message names only the line)
            read_constraints(path)
        except ValueError as e:  # InvalidRequirement, UnicodeDecodeError, not a `name==version` pin
            text = " ".join(str(e).split()) or type(e).__name__
            if isinstance(e, UnicodeDecodeError):
                text = "not UTF-8 text (a binary file?)"
            raise click.ClickException(text if text.startswith(f"{path}:") else
                                       f"{path}: not a constraints file: {text}") from None
        try:
            report = check_stack(path, major)
        except Unreachable as e:
            return f"skipped: {e} (the check reads the pinned packages' published metadata)", 0
        texts.append(render_stack(report))
        failed |= not report.ok
    return "\n".join(texts), int(failed)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--strict", is_flag=True,
              help="Exit 1 when the GPU packages mix CUDA majors (torch, ONNX Runtime, TensorRT, cuDNN), the driver is "
                   "too old for them, or a GPU provider of ONNX Runtime cannot start. A machine without a GPU passes.")
@click.option("--check-constraints", "constraints", is_flag=True,
              help="Instead of looking at this machine: check the GPU constraints files (given as arguments, else the "
                   "repository's constraints/gpu-cu12.txt and gpu-cu13.txt) against each pinned package's published "
                   "metadata, and exit 1 if one mixes CUDA majors or leaves a CUDA package unpinned. Needs the package "
                   "index; without it the check is skipped (exit 0) and says so.")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@friendly_errors
def doctor(as_json, strict, constraints, files):
    """What this machine can run (torch, ONNX Runtime, TensorRT, AOTInductor, Torch-TensorRT,
    Triton, the C++ runner) and, for what it cannot, why. Runs no model; on a GPU it opens a
    one-node ONNX Runtime session per GPU provider to prove the provider starts.

    Exit codes: 0 fine (or nothing to check), 1 a problem found by --strict or
    --check-constraints, 2 usage error."""
    if files and not constraints:
        raise click.UsageError("FILES are constraints files for --check-constraints")
    if constraints:
        text, code = check_constraints(tuple(files))
        click.echo(text)
        sys.exit(code)
    report = probe()
    click.echo(json.dumps(report, indent=2, default=str) if as_json else render(report))
    if strict:
        problems = strict_problems(report)
        for p in problems:
            click.echo(f"strict: {p}", err=True)
        if problems:
            sys.exit(1)
