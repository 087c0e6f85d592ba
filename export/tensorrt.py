"""TensorRT engines built from a bundle's ONNX graphs (`rpiae export --target trt`), and the
lazy access to TensorRT, polygraphy and the GPU that building and running share.

Written against the documented TensorRT 10 API and only the parts of it that TensorRT 11
kept (tests/test_tensorrt.py checks every attribute used here and in
`rpiae.engines.tensorrt`, the runtime, against the TensorRT API stubs and against the list of
APIs that 11 removed). Engines are built through polygraphy's loaders
(`NetworkFromOnnxPath`, `CreateConfig`, `EngineFromNetwork`, `SaveEngine`), which track
TensorRT's API changes. Precision lives in the ONNX graph (fp16 casts, int8 Q/DQ), so a build
is the same for every precision: parse, strongly typed network (a flag on TensorRT 10, always
on 11), TF32 off (TensorRT enables it by default; FP32 layers must stay IEEE FP32 for the
FP32 parity bound), one optimisation profile over the batch axis, build, then inspect which
precision each layer runs in (`rpiae.export.trt_precision`) and refuse an "fp16"/"int8"
engine that runs mostly in fp32. A timing cache that TensorRT refuses (another GPU or
TensorRT version) is an error, not silently ignored. `version_compatible` builds engines that
newer TensorRT runtimes also run (TensorRT's VERSION_COMPATIBLE flag, lean runtime embedded;
recorded in the manifest).

    BUNDLE/engines/{encode,decode}.<precision>.plan   + manifest entries (kind "trt-engine")

Each entry records the TensorRT version and the GPU's compute capability the engine was built
with; the runtime refuses it elsewhere. `import tensorrt` (and polygraphy) happen lazily:
without them the error is one line saying what to install.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

from rpiae.devices import BackendUnavailable
from rpiae.export.bundle import BundleError
from rpiae.export.manifest import KIND_ONNX, KIND_TRT_ENGINE, engine_name
from rpiae.export.spec import GRAPHS
from rpiae.export.trt_precision import (
    MAX_FP32_SHARE, EnginePrecisionError, check_layer_precisions, layer_precision_summary,
)
from rpiae.precisions import INT8_HIGH_PRECISION, precision_info

TRT_MISSING = (
    "TensorRT is not installed: install one GPU stack, pip install -c constraints/gpu-cu13.txt -e '.[gpu-cu13]' "
    "(CUDA 13 torch) or -c constraints/gpu-cu12.txt -e '.[gpu-cu12]' (CUDA 12 torch), on a machine with an NVIDIA GPU"
)
CUDA_MISSING = (
    "TensorRT needs an NVIDIA GPU: torch.cuda.is_available() is False "
    "(install a CUDA build of torch 2.13 on a machine with an NVIDIA GPU and driver)"
)
POLYGRAPHY_MISSING = "polygraphy is not installed: pip install -e '.[trt]' (it builds the TensorRT engines)"
class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph."""


# -- TensorRT and CUDA, lazily ------------------------------------------------------------------
def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailable with one line saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(TRT_MISSING) from None
    except Exception as e:  # a broken install (missing libnvinfer, CUDA mismatch) raises OSError & co
        raise BackendUnavailable(f"TensorRT is installed but failed to load ({type(e).__name__}: {e}); "
                                 "reinstall tensorrt matching this machine's CUDA") from None
    # `tensorrt-stubs` (type stubs only) or the PyPI placeholder leave an importable but empty
    # `tensorrt` namespace: treat it as missing
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        raise BackendUnavailable(TRT_MISSING + " (found only an empty `tensorrt` package, e.g. tensorrt-stubs)")
    return trt


_LOGGERS: dict[int, Any] = {}


def trt_logger(trt):
    """One TensorRT logger per process (TensorRT warns when builders and runtimes get different
    ones): polygraphy's, which its loaders use for builds, when polygraphy is installed."""
    if id(trt) not in _LOGGERS:
        try:
            from polygraphy.backend.trt import get_trt_logger

            logger = get_trt_logger()
        except ImportError:
            logger = trt.Logger(trt.Logger.WARNING)
        _LOGGERS[id(trt)] = logger
    return _LOGGERS[id(trt)]


def import_polygraphy():
    """(polygraphy.backend.trt, its logger, its exception type), or BackendUnavailable."""
    try:
        from polygraphy.backend import trt as poly
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise BackendUnavailable(POLYGRAPHY_MISSING) from None
    return poly, G_LOGGER, PolygraphyException


def tensorrt_available() -> bool:
    try:
        import_tensorrt()
    except BackendUnavailable:
        return False
    return True


def trt_major(version: str) -> int:
    return int(str(version).split(".")[0])


def require_cuda(device: str | None = "cuda"):
    """The torch CUDA device an engine runs on. `cpu`/None means the default GPU (arrays
    still come back on the caller's device)."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable(CUDA_MISSING)
    text = str(device or "cuda")
    if text == "cpu" or text == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    if not text.startswith("cuda"):
        raise BackendUnavailable(f"trt backend: unknown device {device!r} (cuda, cuda:N)")
    dev = torch.device(text)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailable(f"trt backend: {device} does not exist ({torch.cuda.device_count()} GPU(s))")
    return dev


def current_environment(device=None) -> dict[str, str]:
    """What an engine must match here: TensorRT version, GPU name, compute capability."""
    import torch

    trt = import_tensorrt()
    dev = require_cuda(str(device) if device is not None else "cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(dev), "compute_capability": f"{major}.{minor}"}


# -- building --------------------------------------------------------------------------------
def _progress_monitor(trt, desc: str):
    """A TensorRT IProgressMonitor drawing one tqdm bar per build phase."""
    from tqdm.auto import tqdm

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._bars[phase_name] = tqdm(total=num_steps, desc=f"{desc}: {phase_name}", unit="step", leave=False)

        def step_complete(self, phase_name, step):
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Monitor()


def _batch_profile(poly, network, profile, onnx_path) -> tuple[Any, Any]:
    """(the network's one input, the optimisation profile that spans `profile` on its batch axis)."""
    if network.num_inputs != 1:
        raise EngineBuildError(f"{onnx_path}: expected one input, the graph has {network.num_inputs}")
    tensor = network.get_input(0)
    item_shape = tuple(tensor.shape)[1:]
    if any(d < 0 for d in item_shape):
        raise EngineBuildError(f"{onnx_path}: only the batch axis may be dynamic, input shape is {tuple(tensor.shape)}")
    shapes = poly.Profile().add(tensor.name, min=(profile.min, *item_shape), opt=(profile.opt, *item_shape),
                                max=(profile.max, *item_shape))
    return tensor, shapes


def _load_timing_cache(config, path: Path) -> None:
    cache = config.create_timing_cache(path.read_bytes())
    if not config.set_timing_cache(cache, False):
        raise EngineBuildError(
            f"TensorRT refused the timing cache {path} (written by another TensorRT version or GPU); "
            "pass another --timing-cache file or delete this one"
        )


def _save_timing_cache(config, path: Path) -> None:
    """The builder's updated cache, written atomically."""
    from rpiae.fileio import atomic_file

    cache = config.get_timing_cache()
    with atomic_file(path) as tmp:
        tmp.write_bytes(bytes(memoryview(cache.serialize())))


def build_engine(onnx_path: str | Path, profile, workspace_gb: float = 8.0, timing_cache: Path | None = None,
                 opt_level: int = 3, progress: bool = True, desc: str = "engine", version_compatible: bool = False,
                 out: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Parse + build one precision-typed ONNX graph with polygraphy's loaders; save the plan to
    `out` when given. Returns (engine, layer summary + build info)."""
    trt = import_tensorrt()
    require_cuda()
    poly, log, PolygraphyError = import_polygraphy()
    said = io.StringIO()  # polygraphy prints its (and TensorRT's) messages to stdout
    try:
        with contextlib.redirect_stdout(said), log.verbosity(log.WARNING):
            # strongly typed: a network flag on TensorRT 10, always on (the flag gone) on 11
            builder, network, parser = poly.NetworkFromOnnxPath(str(onnx_path),
                                                                strongly_typed=trt_major(trt.__version__) < 11)()
            tensor, shapes = _batch_profile(poly, network, profile, onnx_path)
            config = poly.CreateConfig(
                tf32=False,  # TensorRT turns TF32 on by default; polygraphy clears it when asked for False
                profiles=[shapes],
                memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))},
                builder_optimization_level=int(opt_level),
                profiling_verbosity=trt.ProfilingVerbosity.DETAILED,  # the inspector then shows layer precisions
                progress_monitor=_progress_monitor(trt, desc) if progress else None,
                version_compatible=True if version_compatible else None,
            )(builder, network)
            if timing_cache is not None and Path(timing_cache).is_file():
                _load_timing_cache(config, Path(timing_cache))
            engine = poly.EngineFromNetwork((builder, network, parser), config=config)()
            if out is not None:
                poly.SaveEngine(engine, str(out))()
    except PolygraphyError as e:
        errors = [line[4:] for line in said.getvalue().splitlines() if line.startswith("[E] ")]
        raise EngineBuildError(f"TensorRT could not parse or build {onnx_path}: "
                               f"{'; '.join(errors) or ' '.join(str(e).split())}") from None
    finally:
        warnings = [line for line in said.getvalue().splitlines() if line.startswith(("[W] ", "[E] "))]
        if warnings:
            print("\n".join(warnings), file=sys.stderr)
    if timing_cache is not None:
        _save_timing_cache(config, Path(timing_cache))
    inspector = engine.create_engine_inspector()
    summary = layer_precision_summary(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    info = {"tensorrt": trt.__version__, "strongly_typed": True, "tf32": False, "version_compatible": bool(version_compatible),
            "builder_optimization_level": int(opt_level), "workspace_gb": float(workspace_gb), "input": tensor.name,
            "built_with": "polygraphy", "layer_precisions": summary}
    return engine, info


def build_bundle_engines(bundle, precisions: list[str], profile, workspace_gb: float = 8.0,
                         timing_cache: Path | None = None, opt_level: int = 3, progress: bool = True,
                         max_fp32_share: float = MAX_FP32_SHARE, version_compatible: bool = False) -> dict[str, Any]:
    """Build a TensorRT engine for each graph of each precision into `bundle` (in place).

    Each engine is checked (layer precisions) before its plan is written (atomically) and
    recorded in the manifest, so the manifest never lists an engine that failed.
    """
    from tqdm.auto import tqdm

    from rpiae.fileio import atomic_file

    import_tensorrt()
    import_polygraphy()
    env = current_environment()
    have = bundle.precisions(KIND_ONNX)
    missing = [p for p in precisions if p not in have]
    if missing:
        raise BundleError(f"bundle {bundle.root} has no {', '.join(missing)} ONNX graphs (has: {', '.join(have)}); "
                          f"re-export with --precision {','.join(precisions)} --overwrite")
    built: dict[str, Any] = {}
    jobs = [(g, p) for p in precisions for g in GRAPHS]
    for graph, precision in tqdm(jobs, desc="tensorrt", unit="engine", disable=not progress):
        onnx_file = bundle.find(graph, precision, KIND_ONNX)
        onnx_path = bundle.graph_path(graph, precision)  # sha256-checked
        label = f"{graph}.{precision}"
        onnx_entry = bundle.files[onnx_file]
        high = (onnx_entry.facts.calibration or {}).get("high_precision", INT8_HIGH_PRECISION)
        limit = 1.0 if precision_info(precision).quantized and high == "fp32" else max_fp32_share
        name = engine_name(graph, precision)
        # the plan is saved to a temporary file and renamed only after its layer precisions pass
        try:
            with atomic_file(bundle.root / name) as tmp:
                _, info = build_engine(onnx_path, profile, workspace_gb=workspace_gb, timing_cache=timing_cache,
                                       opt_level=opt_level, progress=progress, desc=label,
                                       version_compatible=version_compatible, out=tmp)
                check_layer_precisions(info["layer_precisions"], precision, f"TensorRT {label}", limit)
        except BaseException:
            with contextlib.suppress(OSError):  # a refused first engine leaves no empty engines/ behind
                (bundle.root / name).parent.rmdir()
            raise
        bundle.remove_file(name)
        entry = bundle.add_file(
            name, kind=KIND_TRT_ENGINE, graph=graph, precision=precision, profile=profile.to_dict(),
            tensorrt=env["tensorrt"], gpu=env["gpu"], compute_capability=env["compute_capability"],
            onnx=onnx_file, onnx_sha256=onnx_entry.sha256, **{k: v for k, v in info.items() if k != "tensorrt"},
        )
        built[name] = entry
        bundle.write_manifest()
    return built


def prepare_target(device: str) -> tuple[str, None]:
    """`--target trt`'s early check: TensorRT, polygraphy and a CUDA GPU here (`auto` -> cuda)."""
    device = "cuda" if device == "auto" else device
    if not device.startswith("cuda"):
        raise ValueError(f"TensorRT engines are built and checked on a GPU: --device cuda or cuda:N, not {device}")
    import_tensorrt()
    import_polygraphy()
    require_cuda(device)
    return device, None


def build_target(bundle, precisions: list[str], profile, device: str = "cuda", progress: bool = True,
                 **options: Any):
    """`--target trt`: engines of the asked precisions (FP32 only when it is the only one asked)."""
    from rpiae.export.targets import Built

    wanted = [p for p in precisions if p != "fp32"] or ["fp32"]
    build_bundle_engines(bundle, wanted, profile, progress=progress, **options)
    return Built(wanted, device)


__all__ = [
    "CUDA_MISSING", "MAX_FP32_SHARE", "POLYGRAPHY_MISSING", "TRT_MISSING", "EngineBuildError", "EnginePrecisionError",
    "build_bundle_engines", "build_engine", "build_target", "current_environment", "import_polygraphy", "import_tensorrt",
    "prepare_target", "require_cuda", "tensorrt_available", "trt_logger", "trt_major",
]
