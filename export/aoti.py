"""AOTInductor packages: the encode/decode graphs compiled ahead of time into `.pt2` files.

    compile_packages(bundle, device="cpu", profile=BatchProfile(1, 8, 32))

exports `EncodeGraph` / `DecodeGraph` (rpiae.export.graphs, the same matmul-form resize as
the ONNX graphs) with `torch.export` and a dynamic batch axis bounded by the profile,
compiles each with AOTInductor and writes

    BUNDLE/engines/aoti/{encode,decode}.fp32.<target>.pt2     target: cpu-x86-64-v3 | cuda-sm90 ...

with a manifest entry per file (kind "aoti-package": device, CPU level and flags or GPU
capability, torch version, batch range: `rpiae.export.manifest.PackageFacts`). The same
facts are embedded in each package's metadata (`rpiae_*` keys), so the C++ runner can
check them too. A package loads from Python (`rpiae.engines.aoti_backend`, which also
checks that this machine can run it) and from C++ through libtorch (`engines/cpp`).

Decisions:
- CPU packages are compiled for a fixed, documented level, never `-march=native`:
  `x86-64-v3` (AVX2, FMA, F16C, BMI1/2, MOVBE, LZCNT: Intel Haswell / AMD Zen and later),
  with Inductor's AVX2 vector kernels. A CPU without those flags is refused at load time.
  (Matmuls and attention go through libtorch's own kernels, which pick the best ISA at run
  time; only the generated pointwise/reduction kernels are fixed to the level.)
- Input checks stay on at run time: AOTInductor's generated shape/dtype/stride checks are
  switched on by `AOTI_RUNTIME_CHECK_INPUTS=1` (set by the Python backend and the C++
  runner before the first run). Inductor's own lower bound of 2 on a dynamic axis is
  dropped (`check_lowerbound=False`) so that batch 1 runs; the profile's minimum is checked
  by the Python backend and the C++ runner instead, the maximum by the package itself.
- Compiler caches and temporary files go under one directory the user controls
  (`rpiae.cache`).
- FP32 only: the packages run the FP32 weights (reduced precision lives in the ONNX/TensorRT
  path). CUDA packages are compiled with TF32 off (Inductor bakes the matmul precision into
  its kernels), so they keep the FP32 parity bound.
- CUDA packages need the CUDA toolkit (headers and nvcc), found the way torch finds it:
  `CUDA_HOME`/`CUDA_PATH`, `nvcc` on PATH, `/usr/local/cuda`. `check_target` refuses a CUDA
  target without one before anything is exported, and `--device auto` picks CUDA only when
  a GPU and the toolkit are both there.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from rpiae.cache import compiler_workdir
from rpiae.devices import BackendUnavailable, precision_context
from rpiae.fileio import remove_stale_temps
from rpiae.export.bundle import Bundle
from rpiae.export.graphs import example_input, graph_module
from rpiae.export.spec import GRAPHS, graph_spec
from rpiae.export.profile import BatchProfile
from rpiae.host import cpu_flags

KIND = "aoti-package"
ENGINE_DIR = "engines/aoti"
PRECISION = "fp32"

# Fixed CPU levels a package can be compiled for. `flags` are the /proc/cpuinfo names the
# level needs (x86-64-v3 as defined by the x86-64 psABI; LZCNT is reported as "abm").
CPU_LEVELS: dict[str, dict[str, Any]] = {
    "x86-64-v3": {
        "march": "x86-64-v3",
        "simdlen": 256,  # Inductor's AVX2 vector kernels (-mavx2 -mfma -mf16c)
        "isa": "avx2",
        "flags": ("sse4_2", "ssse3", "popcnt", "cx16", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm",
                  "xsave"),
        "machines": ("x86_64", "AMD64"),
    },
}
DEFAULT_CPU_LEVEL = "x86-64-v3"
DEFAULT_CUDA_HOME = "/usr/local/cuda"  # torch's last guess on Linux (torch.utils.cpp_extension)


# -- machine facts ---------------------------------------------------------------------------
def torch_version() -> str:
    return torch.__version__.split("+")[0]


def torch_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def cuda_target(index: int | None = None) -> dict[str, Any]:
    i = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(i)
    return {"capability": f"{major}.{minor}", "sm": f"sm{major}{minor}", "gpu": torch.cuda.get_device_name(i),
            "cuda": torch.version.cuda}


def cuda_toolkit() -> tuple[Path | None, str]:
    """(CUDA toolkit root, how it was found) the way torch's C++ extension builder looks for
    it, or (None, why not). A root without include/cuda_runtime.h does not count."""
    import shutil

    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        root, how = Path(env), f"CUDA_HOME/CUDA_PATH={env}"
    elif shutil.which("nvcc"):
        root, how = Path(shutil.which("nvcc")).resolve().parents[1], f"nvcc at {shutil.which('nvcc')}"
    elif Path(DEFAULT_CUDA_HOME).exists():
        root, how = Path(DEFAULT_CUDA_HOME), DEFAULT_CUDA_HOME
    else:
        return None, f"CUDA_HOME is not set, nvcc is not on PATH and {DEFAULT_CUDA_HOME} does not exist"
    if not (root / "include" / "cuda_runtime.h").is_file():
        return None, f"{how}, but {root / 'include' / 'cuda_runtime.h'} does not exist"
    return root, how


def auto_device() -> tuple[str, str | None]:
    """`--device auto`: (cuda, None) when a GPU and the CUDA toolkit are both here, else (cpu,
    the reason CUDA was not chosen, or None on a machine without a GPU)."""
    if not torch.cuda.is_available():
        return "cpu", None
    root, why = cuda_toolkit()
    if root is None:
        return "cpu", f"a GPU is visible but compiling CUDA packages needs the CUDA toolkit ({why}): compiling for the CPU"
    return "cuda", None


def target_device(device: str) -> tuple[str, int]:
    """(cpu|cuda, index) of a package's device string: `cpu` -> 0, `cuda` -> -1 (current), `cuda:N` -> N."""
    kind, _, idx = str(device).partition(":")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"aoti target device must be cpu or cuda, not {device!r}")
    return kind, int(idx) if idx else (-1 if kind == "cuda" else 0)


# -- compiling -------------------------------------------------------------------------------
def inductor_options(device: str, cpu_level: str, metadata: dict[str, str]) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "aot_inductor.check_lowerbound": False,  # allow batch 1; the minimum is checked by our runners
        "aot_inductor.metadata": metadata,
    }
    if device == "cpu":
        level = CPU_LEVELS[cpu_level]
        opts.update({"cpp.march": level["march"], "cpp.simdlen": level["simdlen"]})
    return opts


def export_program(module: torch.nn.Module, example: torch.Tensor, profile: BatchProfile) -> torch.export.ExportedProgram:
    """`torch.export` with the batch axis dynamic in [profile.min, profile.max] (static when fixed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        if profile.min == profile.max:
            return torch.export.export(module, (example[: profile.min],), strict=False)
        batch = torch.export.Dim("batch", min=profile.min, max=profile.max)
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)


def compile_graph(
    model, graph: str, out: str | Path, device: str = "cpu", profile: BatchProfile = BatchProfile(),
    cpu_level: str = DEFAULT_CPU_LEVEL, metadata: dict[str, str] | None = None, cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Export and compile one graph of `model` into the `.pt2` file `out`. Returns timings."""
    kind, index = target_device(device)
    dev = torch.device(kind, max(index, 0)) if kind == "cuda" else torch.device("cpu")
    module = graph_module(model.float().eval().to(dev), graph)
    example = example_input(model, graph, batch=max(profile.min, min(2, profile.max))).to(dev)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial.pt2")
    with compiler_workdir(cache_dir), torch.no_grad(), warnings.catch_warnings(), precision_context(dev, torch.float32):
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        t0 = time.perf_counter()
        ep = export_program(module, example, profile)
        t1 = time.perf_counter()
        try:
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(partial), inductor_configs=inductor_options(kind, cpu_level, metadata or {})
            )
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        t2 = time.perf_counter()
    return {"export_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2)}


def _target(kind: str, index: int, cpu_level: str) -> dict[str, Any]:
    if kind == "cpu":
        level = CPU_LEVELS.get(cpu_level)
        if level is None:
            raise ValueError(f"unknown CPU level {cpu_level!r}; choose one of: {', '.join(CPU_LEVELS)}")
        if platform.machine() not in level["machines"]:
            raise BackendUnavailable(
                f"AOTInductor CPU packages are compiled for {', '.join(CPU_LEVELS)}; this machine is {platform.machine()}"
            )
        missing = [f for f in level["flags"] if f not in cpu_flags()]
        if cpu_flags() and missing:
            raise BackendUnavailable(f"this CPU lacks {', '.join(missing)} needed by {cpu_level}; packages could not be checked here")
        return {"device": "cpu", "cpu_level": cpu_level, "isa": level["isa"], "march": level["march"],
                "cpu_flags": list(level["flags"]), "tag": f"cpu-{cpu_level}"}
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "--device cuda needs a CUDA GPU and a CUDA build of torch (torch.cuda.is_available() is False here); "
            "use --device cpu"
        )
    root, why = cuda_toolkit()
    if root is None:
        raise BackendUnavailable(
            f"--device cuda compiles with the CUDA toolkit (nvcc and headers), which is not here: {why}; install it "
            "(or set CUDA_HOME to it), or use --device cpu"
        )
    t = cuda_target(None if index < 0 else index)
    return {"device": "cuda", **t, "tag": f"cuda-{t['sm']}"}


def check_target(device: str = "cpu", cpu_level: str = DEFAULT_CPU_LEVEL) -> dict[str, Any]:
    """Fail fast (BackendUnavailable/ValueError, one line) when packages for `device` cannot be
    compiled and checked here; call before a long ONNX export. Returns the target facts."""
    kind, index = target_device(device)
    return _target(kind, index, cpu_level)


def package_name(graph: str, tag: str) -> str:
    return f"{ENGINE_DIR}/{graph}.{PRECISION}.{tag}.pt2"


def package_metadata(bundle: Bundle, graph: str, target: dict[str, Any], profile: BatchProfile) -> dict[str, str]:
    """The `rpiae_*` facts embedded in a package, which the C++ runner checks."""
    return {
        "rpiae_graph": graph, "rpiae_model": bundle.config.name, "rpiae_device": target["device"],
        "rpiae_batch_min": str(profile.min), "rpiae_batch_max": str(profile.max),
        "rpiae_input_shape": ",".join(map(str, graph_spec(bundle.config, graph).input_shape)),
        "rpiae_torch": torch_version(),
        "rpiae_cpu_level": target.get("cpu_level", ""), "rpiae_cpu_flags": " ".join(target.get("cpu_flags", [])),
        "rpiae_capability": target.get("capability", ""),
    }


def bundle_packages(bundle: Bundle, kind: str, precision: str = PRECISION) -> dict[str, tuple[str, Any]]:
    """graph -> (file name, manifest entry) of the bundle's package of each graph for a device
    type (`cpu` or `cuda`; the first listed, where several are)."""
    found: dict[str, tuple[str, Any]] = {}
    for name, e in bundle.files.items():
        if e.kind == KIND and e.facts.device == kind and e.precision == precision:
            found.setdefault(e.graph, (name, e))
    return found


def _drop_packages(bundle: Bundle, graph: str, kind: str, keep: str) -> list[str]:
    """Forget the bundle's earlier packages of `graph` for this device type; returns the files to
    delete once the manifest no longer lists them (all but `keep`, which is replaced)."""
    stale = []
    for old, e in list(bundle.files.items()):
        if e.kind == KIND and e.graph == graph and e.facts.device == kind and e.precision == PRECISION:
            bundle.remove_file(old)
            if old != keep:
                stale.append(old)
    return stale


def compile_packages(
    bundle: Bundle | str | Path,
    device: str = "cpu",
    profile: BatchProfile = BatchProfile(),
    cpu_level: str = DEFAULT_CPU_LEVEL,
    cache_dir: str | Path | None = None,
    graphs: tuple[str, ...] = GRAPHS,
    progress: bool = True,
) -> Bundle:
    """Compile the bundle's graphs into AOTInductor packages and record them in its manifest,
    replacing earlier packages for the same device type. (`rpiae.verify.package_bundle` also
    measures their parity.)"""
    from tqdm.auto import tqdm

    from rpiae.model import RPiAE

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    kind, index = target_device(device)
    target = _target(kind, index, cpu_level)
    tag = target.pop("tag")
    model = RPiAE.from_checkpoint(bundle.weights_path())
    base = {"precision": PRECISION, **target, "torch": torch_version(), "batch": profile.to_dict()}
    # every package is compiled into a hidden staging folder first, and moved into the bundle only
    # when all are built, together with the manifest that lists them: an interrupted compile
    # leaves the bundle as it was (and at most a `.aoti.*.partial` folder, cleared by the next run)
    remove_stale_temps(bundle.root, name=_STAGING)
    staging = Path(tempfile.mkdtemp(prefix=f".{_STAGING}.", suffix=".partial", dir=bundle.root))
    try:
        built = {}
        bar = tqdm(graphs, desc=f"aoti {tag}", unit="graph", disable=not progress)
        for graph in bar:
            bar.set_postfix_str(graph)
            name = package_name(graph, tag)
            built[graph] = (name, compile_graph(
                model, graph, staging / name, device=device, profile=profile, cpu_level=cpu_level,
                metadata=package_metadata(bundle, graph, target, profile), cache_dir=cache_dir))
        _install_packages(bundle, staging, built, kind, base)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bundle


_STAGING = "aoti"  # .aoti.XXXXXXXX.partial: compile_packages' staging folder inside the bundle


def _install_packages(bundle: Bundle, staging: Path, built: dict[str, tuple[str, dict]], kind: str,
                      base: dict[str, Any]) -> None:
    """Move the staged packages into the bundle, drop the ones they replace, and write the
    manifest; if that is interrupted, new files the manifest on disk does not list are removed."""
    placed, stale, made = [], [], []
    try:
        for graph, (name, timings) in built.items():
            stale += _drop_packages(bundle, graph, kind, keep=name)
            folder = (bundle.root / name).parent
            made += [d for d in (folder, *folder.parents) if d.is_relative_to(bundle.root) and not d.exists()][::-1]
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, bundle.root / name)
            placed.append(name)
            bundle.add_file(name, kind=KIND, graph=graph, **base, **timings)
        bundle.write_manifest()
    except BaseException:
        try:
            listed = set(Bundle.open(bundle.root).files)
        except Exception:  # noqa: BLE001 - no readable manifest: nothing of ours is listed
            listed = set()
        for name in placed:
            if name not in listed:
                (bundle.root / name).unlink(missing_ok=True)
        for d in reversed(made):  # the folders made for them (engines/aoti), when left empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    for old in stale:  # the replaced packages, now that the manifest lists the new ones
        (bundle.root / old).unlink(missing_ok=True)


def prepare_target(device: str) -> tuple[str, str | None]:
    """`--target aoti`'s early check: `--device auto` resolved (`auto_device`) and the target
    checked (`check_target`)."""
    note = None
    if device == "auto":
        device, note = auto_device()
    check_target(device)
    return device, note


def build_target(bundle: Bundle, precisions: list[str], profile: BatchProfile, device: str = "cpu",
                 progress: bool = True, cache_dir: str | Path | None = None):
    """`--target aoti`: FP32 packages of both graphs for `device` (whatever `precisions` asks)."""
    from rpiae.export.targets import Built

    compile_packages(bundle, device=device, profile=profile, cache_dir=cache_dir, progress=progress)
    return Built([PRECISION], device)


__all__ = [
    "CPU_LEVELS", "DEFAULT_CPU_LEVEL", "KIND", "PRECISION", "auto_device", "build_target", "bundle_packages", "check_target", "compile_graph",
    "compile_packages", "cuda_target", "cuda_toolkit", "target_device", "torch_minor", "torch_version",
]
