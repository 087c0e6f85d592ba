"""The one module that talks to TensorRT: build engines from a bundle's ONNX graphs, check
them, and run them.

Everything TensorRT-specific lives here, written against the documented TensorRT 10 API
and only the parts of it that TensorRT 11 kept (tests/test_tensorrt.py checks every
attribute used here against the TensorRT API stubs and against the list of APIs that 11
removed). Engines are built through polygraphy's loaders (`NetworkFromOnnxPath`,
`CreateConfig`, `EngineFromNetwork`, `SaveEngine`), which track TensorRT's API changes.
Precision lives in the ONNX graph (fp16 casts, int8 Q/DQ), so a build is the same for every
precision: parse, strongly typed network (a flag on TensorRT 10, always on 11), TF32 off
(TensorRT enables it by default; FP32 layers must stay IEEE FP32 for the FP32 parity
bound), one optimisation profile over the batch axis, build, then inspect which precision
each layer runs in and refuse an "fp16"/"int8" engine that runs mostly in fp32. A timing
cache that TensorRT refuses (another GPU or TensorRT version) is an error, not silently
ignored. `version_compatible` builds engines that newer TensorRT runtimes also run
(TensorRT's VERSION_COMPATIBLE flag, lean runtime embedded; recorded in the manifest).

    BUNDLE/engines/{encode,decode}.<precision>.plan   + manifest entries (kind "trt-engine")

An engine is tied to the TensorRT version and the GPU's compute capability it was built
with (a version-compatible one to that version or later, within TensorRT's supported
pairs); both are recorded next to it, and loading it elsewhere fails with a message that
says how to rebuild. `import tensorrt` (and polygraphy) happen lazily: without them the
error is one line saying what to install.

The pure functions (`check_engine_compat`, `layer_precision_summary`,
`check_layer_precisions`, `tensor_dtype`) need neither TensorRT nor a GPU.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from rpiae.engines.base import BackendUnavailable

TRT_MISSING = (
    "TensorRT is not installed: pip install tensorrt-cu12 (for a CUDA 12 torch; or pip install -e '.[gpu]'; "
    "from NVIDIA's index, https://pypi.nvidia.com) on a machine with an NVIDIA GPU"
)
CUDA_MISSING = (
    "TensorRT needs an NVIDIA GPU: torch.cuda.is_available() is False "
    "(install a CUDA build of torch 2.13 on a machine with an NVIDIA GPU and driver)"
)
POLYGRAPHY_MISSING = "polygraphy is not installed: pip install -e '.[trt]' (it builds the TensorRT engines)"
ENGINE_KIND = "trt-engine"
# TensorRT's version-compatible engines also run on these newer major versions (Support Matrix,
# "Engine Portability"); within a major version, on the same or a later release
VERSION_COMPATIBLE_MAJORS = {8: (8, 10), 10: (10, 11), 11: (11,)}
# an fp16/int8 engine in which more than this share of the float compute layers runs in fp32
# is refused: the known silent failure of a "reduced precision" engine that is not
# (RPIAE_TRT_MAX_FP32_SHARE overrides it, e.g. 1.0 to keep an engine the check refuses)
MAX_FP32_SHARE = float(os.environ.get("RPIAE_TRT_MAX_FP32_SHARE", "0.5"))


class EngineMismatch(BackendUnavailable):
    """An engine built for another TensorRT version or GPU compute capability."""


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a graph."""


class EnginePrecisionError(RuntimeError):
    """A reduced-precision engine whose layers run mostly in FP32."""


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


# -- engine compatibility (pure) -------------------------------------------------------------
def rebuild_command(bundle_root: str | Path, entry: dict[str, Any]) -> str:
    profile = entry.get("profile") or {}
    batch = f"{profile['min']}:{profile['opt']}:{profile['max']}" if {"min", "opt", "max"} <= set(profile) else "1:8:32"
    vc = " --version-compatible" if entry.get("version_compatible") else ""
    return f"rpiae export --target trt --precision {entry.get('precision', 'fp16')} --batch {batch}{vc} --out {bundle_root}"


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(version).split(".") if p.isdigit())


def runtime_runs(built: str, here: str, version_compatible: bool = False) -> bool:
    """Whether a TensorRT runtime of version `here` runs an engine built with `built`: the same
    version, or for a version-compatible engine the same or a later release within the
    major versions TensorRT supports for it."""
    if built == here:
        return True
    if not version_compatible or not _release(built) or not _release(here):
        return False
    allowed = VERSION_COMPATIBLE_MAJORS.get(_release(built)[0], ())
    return _release(here)[0] in allowed and _release(here) >= _release(built)


def check_engine_compat(entry: dict[str, Any], env: dict[str, str], bundle_root: str | Path = "BUNDLE",
                        name: str = "engine") -> None:
    """Refuse an engine built with another TensorRT version or for another compute capability.

    `entry` is the engine's manifest entry, `env` what `current_environment()` returns.
    TensorRT plans are not portable across TensorRT versions nor GPU architectures; a
    different GPU model of the same compute capability is accepted, and a version-compatible
    engine runs on later TensorRT releases (`runtime_runs`).
    """
    problems = []
    built_trt, here_trt = str(entry.get("tensorrt", "?")), str(env.get("tensorrt", "?"))
    built_cc, here_cc = str(entry.get("compute_capability", "?")), str(env.get("compute_capability", "?"))
    if not runtime_runs(built_trt, here_trt, bool(entry.get("version_compatible"))):
        problems.append(f"TensorRT {built_trt}{' (version-compatible)' if entry.get('version_compatible') else ''} "
                        f"(here: {here_trt})")
    if built_cc != here_cc:
        problems.append(f"compute capability {built_cc} on {entry.get('gpu', '?')} "
                        f"(here: {here_cc} on {env.get('gpu', '?')})")
    if problems:
        raise EngineMismatch(
            f"{Path(bundle_root) / name} was built for {' and '.join(problems)}; TensorRT engines only run where "
            f"they were built. Rebuild it on this machine: {rebuild_command(bundle_root, entry)}"
        )


# -- layer precisions from the engine inspector (pure) ---------------------------------------
# TensorRT 10 writes each tensor's "Format/Datatype" ("Row major linear FP16 format",
# "Half", "Thirty-two wide channel vectorized row major Int8 format."); TensorRT 11 splits it
# into "Datatype" and "Format". Order matters: UINT8 before INT8, BFLOAT16 before FLOAT.
_DTYPE_TOKENS = (
    ("UINT8", None), ("INT64", None), ("INT32", None), ("INT16", None), ("INT4", "int4"), ("BOOL", None),
    ("INT8", "int8"), ("FP8", "fp8"), ("FLOAT8", "fp8"), ("E4M3", "fp8"), ("FP4", "fp4"), ("FLOAT4", "fp4"),
    ("BFLOAT16", "bf16"), ("BF16", "bf16"), ("HALF", "fp16"), ("FP16", "fp16"), ("FLOAT", "fp32"), ("FP32", "fp32"),
)
# layers that move or reinterpret data rather than compute: not counted
_DATA_MOVEMENT = {
    "reformat", "shuffle", "constant", "noop", "shape", "slice", "concatenation", "identity", "cast",
    "padding", "gather", "squeeze", "unsqueeze", "scatter", "fill", "assertion", "copy",
}
_LOW = {"fp16", "bf16", "int8", "fp8", "int4", "fp4"}


def tensor_dtype(desc: dict[str, Any]) -> str | None:
    """Float precision of one inspector tensor description: fp32/fp16/bf16/int8/fp8/..., or None
    for integer/bool tensors and descriptions without a type."""
    text = " ".join(str(desc.get(k, "")) for k in ("Datatype", "DataType", "Format/Datatype")).upper()
    for token, dtype in _DTYPE_TOKENS:
        if token in text:
            return dtype
    return None


def _layers(info: str | dict | list) -> list:
    if isinstance(info, str):
        info = json.loads(info)
    if isinstance(info, dict):
        if "Layers" not in info:
            return [info]  # one layer's information
        info = info["Layers"]
    return [json.loads(x) if isinstance(x, str) and x.lstrip().startswith("{") else x for x in info]


def layer_precision(layer: dict[str, Any]) -> str | None:
    """The lowest float precision among a layer's tensors (an fp16 GEMM with fp32 accumulation
    output counts as fp16; a Q/DQ boundary as int8); None for layers without float tensors."""
    found = {tensor_dtype(t) for key in ("Inputs", "Outputs") for t in (layer.get(key) or []) if isinstance(t, dict)}
    found.discard(None)
    for p in ("int4", "fp4", "int8", "fp8", "fp16", "bf16", "fp32"):
        if p in found:
            return p
    return None


def layer_precision_summary(info: str | dict | list, keep_names: int = 40) -> dict[str, Any]:
    """Per-precision counts of an engine's compute layers from the inspector's JSON
    (`get_engine_information(LayerInformationFormat.JSON)`, or a list of per-layer JSON).

    Returns {"layers", "counted", "by_precision", "fp32_share", "low_precision_share",
    "fp32_layers" (first `keep_names`), "by_layer_type"}.
    """
    layers = _layers(info)
    if layers and all(isinstance(x, str) for x in layers):
        raise EnginePrecisionError(
            "the engine inspector returned layer names only: build with ProfilingVerbosity.DETAILED to see precisions"
        )
    by_precision: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    fp32_layers: list[str] = []
    counted = 0
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        ltype = str(layer.get("LayerType", "unknown"))
        name = str(layer.get("Name", ""))
        if ltype.lower() in _DATA_MOVEMENT or name.startswith("Reformatting CopyNode"):
            continue
        p = layer_precision(layer)
        if p is None:
            continue
        counted += 1
        by_precision[p] = by_precision.get(p, 0) + 1
        by_type.setdefault(ltype, {}).setdefault(p, 0)
        by_type[ltype][p] += 1
        if p == "fp32" and len(fp32_layers) < keep_names:
            fp32_layers.append(name)
    fp32 = by_precision.get("fp32", 0)
    return {
        "layers": len(layers),
        "counted": counted,
        "by_precision": dict(sorted(by_precision.items())),
        "fp32_share": round(fp32 / counted, 4) if counted else 0.0,
        "low_precision_share": round(sum(v for k, v in by_precision.items() if k in _LOW) / counted, 4) if counted else 0.0,
        "fp32_layers": fp32_layers,
        "by_layer_type": by_type,
    }


def check_layer_precisions(summary: dict[str, Any], precision: str, what: str = "engine",
                           max_fp32_share: float = MAX_FP32_SHARE) -> None:
    """Fail an fp16/bf16/int8 engine that runs mostly in fp32, or an int8 engine without int8 layers."""
    if precision == "fp32":
        return
    if summary["counted"] == 0:
        raise EnginePrecisionError(f"{what}: the engine inspector showed no typed compute layers; cannot check its precision")
    if precision == "int8" and not summary["by_precision"].get("int8"):
        raise EnginePrecisionError(
            f"{what}: an int8 engine without a single int8 layer ({summary['by_precision']}); the ONNX graph's Q/DQ nodes "
            "were not used (check the graph has explicit QuantizeLinear/DequantizeLinear with zero-point 0)"
        )
    if summary["fp32_share"] > max_fp32_share:
        raise EnginePrecisionError(
            f"{what}: {precision} engine runs {summary['fp32_share']:.0%} of its compute layers in fp32 "
            f"(limit {max_fp32_share:.0%}; {summary['by_precision']}; e.g. {', '.join(summary['fp32_layers'][:5])}); "
            "the graph's reduced-precision types did not survive the build"
        )


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
            if network.num_inputs != 1:
                raise EngineBuildError(f"{onnx_path}: expected one input, the graph has {network.num_inputs}")
            tensor = network.get_input(0)
            item_shape = tuple(tensor.shape)[1:]
            if any(d < 0 for d in item_shape):
                raise EngineBuildError(f"{onnx_path}: only the batch axis may be dynamic, input shape is {tuple(tensor.shape)}")
            shapes = poly.Profile().add(tensor.name, min=(profile.min, *item_shape), opt=(profile.opt, *item_shape),
                                        max=(profile.max, *item_shape))
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
                cache = config.create_timing_cache(Path(timing_cache).read_bytes())
                if not config.set_timing_cache(cache, False):
                    raise EngineBuildError(
                        f"TensorRT refused the timing cache {timing_cache} (written by another TensorRT version or GPU); "
                        "pass another --timing-cache file or delete this one"
                    )
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
        from rpiae.fileio import atomic_file

        cache = config.get_timing_cache()  # the builder's updated cache
        with atomic_file(timing_cache) as tmp:
            tmp.write_bytes(bytes(memoryview(cache.serialize())))
    inspector = engine.create_engine_inspector()
    summary = layer_precision_summary(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    info = {"tensorrt": trt.__version__, "strongly_typed": True, "tf32": False, "version_compatible": bool(version_compatible),
            "builder_optimization_level": int(opt_level), "workspace_gb": float(workspace_gb), "input": tensor.name,
            "built_with": "polygraphy", "layer_precisions": summary}
    return engine, info


def engine_name(graph: str, precision: str) -> str:
    return f"engines/{graph}.{precision}.plan"


def build_bundle_engines(bundle, precisions: list[str], profile, workspace_gb: float = 8.0,
                         timing_cache: Path | None = None, opt_level: int = 3, progress: bool = True,
                         max_fp32_share: float = MAX_FP32_SHARE, version_compatible: bool = False) -> dict[str, Any]:
    """Build a TensorRT engine for each graph of each precision into `bundle` (in place).

    Each engine is checked (layer precisions) before its plan is written (atomically) and
    recorded in the manifest, so the manifest never lists an engine that failed.
    """
    from tqdm.auto import tqdm

    from rpiae.export.bundle import BundleError
    from rpiae.export.graphs import GRAPHS
    from rpiae.fileio import atomic_file

    import_tensorrt()
    import_polygraphy()
    env = current_environment()
    have = bundle.precisions("onnx")
    missing = [p for p in precisions if p not in have]
    if missing:
        raise BundleError(f"bundle {bundle.root} has no {', '.join(missing)} ONNX graphs (has: {', '.join(have)}); "
                          f"re-export with --precision {','.join(precisions)} --overwrite")
    built: dict[str, Any] = {}
    jobs = [(g, p) for p in precisions for g in GRAPHS]
    for graph, precision in tqdm(jobs, desc="tensorrt", unit="engine", disable=not progress):
        onnx_file = bundle.find(graph, precision, "onnx")
        onnx_path = bundle.graph_path(graph, precision)  # sha256-checked
        label = f"{graph}.{precision}"
        onnx_entry = bundle.files[onnx_file]
        high = (onnx_entry.get("calibration") or {}).get("high_precision", "fp16")
        limit = 1.0 if precision == "int8" and high == "fp32" else max_fp32_share
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
            name, kind=ENGINE_KIND, graph=graph, precision=precision, profile=profile.to_dict(),
            tensorrt=env["tensorrt"], gpu=env["gpu"], compute_capability=env["compute_capability"],
            onnx=onnx_file, onnx_sha256=onnx_entry["sha256"], **{k: v for k, v in info.items() if k != "tensorrt"},
        )
        lp = info["layer_precisions"]
        built[f"trt:{label}"] = {
            "file": name, "graph": graph, "precision": precision, "profile": str(profile), "tensorrt": env["tensorrt"],
            "gpu": env["gpu"], "compute_capability": env["compute_capability"], "bytes": entry["bytes"],
            "version_compatible": bool(version_compatible),
            "layer_precisions": {"by_precision": lp["by_precision"], "fp32_share": lp["fp32_share"]},
        }
        bundle.manifest.setdefault("engines", {}).update({f"trt:{label}": built[f"trt:{label}"]})
        bundle.write_manifest()
    return built


# -- running ---------------------------------------------------------------------------------
class EngineRunner:
    """One deserialized engine on one GPU with one execution context, I/O in torch CUDA tensors,
    batches padded up to the profile's minimum.

    The context (and its activation memory) is shared by every stream that calls it: work on
    a new stream first waits for the context's previous enqueue on another stream (a CUDA
    event), so two streams never use its memory at once, and no context is made per stream.
    `close()` frees the context, the engine and the runtime."""

    def __init__(self, plan: bytes, device, version_compatible: bool = False) -> None:
        import torch

        trt = import_tensorrt()
        self.device = torch.device(device)
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.BF16: torch.bfloat16, trt.DataType.INT8: torch.int8,
                        trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                        trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8}
        with torch.cuda.device(self.device):
            torch.cuda.current_stream(self.device)  # torch owns (and initialises) the CUDA context
            self._runtime = trt.Runtime(trt_logger(trt))  # must outlive the engine
            if version_compatible:
                # a version-compatible plan carries TensorRT's lean runtime (host code); the bundle's
                # sha256 check vouches for it
                self._runtime.engine_host_code_allowed = True
            engine = self._runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise BackendUnavailable("TensorRT could not deserialize the engine (see the TensorRT messages above); "
                                     "rebuild it with `rpiae export --target trt`")
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise BackendUnavailable(f"expected an engine with one input and one output, got {inputs} -> {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_dtype = self._dtypes[engine.get_tensor_dtype(self.input_name)]
        self.output_dtype = self._dtypes[engine.get_tensor_dtype(self.output_name)]
        lo, opt, hi = (tuple(d) for d in engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.opt_batch, self.max_batch = int(lo[0]), int(opt[0]), int(hi[0])
        context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")
        self._context = context
        self._lock = threading.Lock()
        with torch.cuda.device(self.device):
            self._done = torch.cuda.Event()  # recorded after each enqueue, on that enqueue's stream
        self._last_stream: int | None = None
        self._side = None

    def __call__(self, x):
        """Run one batch (a torch tensor, at most `max_batch` items) on the current stream."""
        import torch

        n = int(x.shape[0])
        if n > self.max_batch:
            raise ValueError(f"batch {n} exceeds the engine profile's maximum {self.max_batch}")
        if self._context is None:
            raise BackendUnavailable("this TensorRT engine was closed")
        with torch.cuda.device(self.device):
            x = x.to(self.device, dtype=self.input_dtype, non_blocking=True)
            if n < self.min_batch:  # pad to the profile's minimum, drop the padding afterwards
                x = torch.cat([x, x[-1:].expand(self.min_batch - n, *x.shape[1:])])
            x = x.contiguous()
            current = stream = torch.cuda.current_stream(self.device)
            if current.cuda_stream == 0:  # TensorRT adds syncs on the legacy default stream: use a side stream
                stream = self._side_stream()
                stream.wait_stream(current)
            context = self._context
            with self._lock:
                if self._last_stream is not None and self._last_stream != stream.cuda_stream:
                    stream.wait_event(self._done)  # the context's memory is free once that enqueue is done
                if not context.set_input_shape(self.input_name, tuple(x.shape)):
                    raise ValueError(f"TensorRT rejected input shape {tuple(x.shape)} for {self.input_name}")
                out = torch.empty(tuple(context.get_tensor_shape(self.output_name)), dtype=self.output_dtype,
                                  device=self.device)
                context.set_tensor_address(self.input_name, x.data_ptr())
                context.set_tensor_address(self.output_name, out.data_ptr())
                if not context.execute_async_v3(stream.cuda_stream):
                    raise RuntimeError("TensorRT execution failed (see the TensorRT messages above)")
                self._done.record(stream)
                self._last_stream = stream.cuda_stream
            if stream is not current:
                current.wait_stream(stream)  # later work on the caller's stream sees the output
                x.record_stream(stream)  # and the allocator keeps the buffers until the engine is done
                out.record_stream(stream)
            # on the caller's own stream, x and out belong to it: the caching allocator keeps them
            # until the queued work is done, and later torch ops on the stream are ordered after it
            return out[:n]

    def _side_stream(self):
        import torch

        with self._lock:
            if self._side is None:
                self._side = torch.cuda.Stream(self.device)
            return self._side

    def close(self) -> None:
        """Free the context, then the engine, then the runtime (TensorRT's required order), once
        the last enqueue has finished."""
        if self._context is not None and self._last_stream is not None:
            self._done.synchronize()
        self._context = None
        self.engine = None
        self._runtime = None


__all__ = [
    "ENGINE_KIND", "EngineBuildError", "EngineMismatch", "EnginePrecisionError", "EngineRunner", "MAX_FP32_SHARE",
    "build_bundle_engines", "build_engine", "check_engine_compat", "check_layer_precisions", "current_environment",
    "engine_name", "import_tensorrt", "layer_precision", "layer_precision_summary", "rebuild_command", "require_cuda",
    "tensor_dtype", "tensorrt_available", "trt_major",
]
