"""ONNX Runtime backend: runs a bundle's precision-typed ONNX graphs.

Devices: `cpu`; `cuda[:N]` (CUDA execution provider on GPU N); `trt[:N]` (ONNX Runtime's
TensorRT provider on GPU N, CUDA then CPU for what TensorRT does not take). Each graph it is
opened for (`graphs`, both by default) gets a session when the backend is opened.

- Provider fallback: ONNX Runtime silently runs on another provider when the asked one fails
  to initialise (missing cuDNN, a CUDA mismatch). After each session is made, the providers
  it really uses are compared with the request; a fallback is refused with one line that
  names the provider and the reason ONNX Runtime logged, unless `allow_fallback` (or
  `RPIAE_ALLOW_FALLBACK=1`, which `--allow-fallback` sets). `describe()` reports the
  providers actually used.
- On CUDA, inputs and outputs are bound to torch tensors (I/O binding): a CUDA tensor goes in
  and comes out without a host copy. ONNX Runtime computes on the backend's own CUDA stream
  (`user_compute_stream`), ordered after the caller's stream and before it again, without
  a host synchronisation (`disable_synchronize_execution_providers`); `stream` exposes it.
- The TensorRT provider builds its engines for the bundle's batch profile (its TensorRT
  engines' or AOTInductor packages' min/opt/max, else 1:8:32), with fp16/int8 enabled as the
  graph's precision says, and caches engines and timing data in `BUNDLE/engines/ort-trt/`
  (or, for a read-only bundle, under the rpiae cache directory).
- FP32 means IEEE FP32 on GPUs. The CUDA provider gets `use_tf32=0` (ONNX Runtime turns TF32
  on by default since 1.17). The TensorRT provider has no such option: TensorRT, cuBLAS and
  cuDNN read `NVIDIA_TF32_OVERRIDE=0`, set process-wide before its sessions are made and left
  set (an engine built later in the process must not use TF32 either).
- The TensorRT provider builds weakly typed networks (it has no strongly typed option, as
  TensorRT 10 did, and ONNX Runtime's provider is built against TensorRT 10): with fp16
  enabled, TensorRT may run the graph's fp32 layers in fp16. The fp32 islands an fp16 graph
  keeps by operator type (LayerNormalization, Softmax, ...: every node of that type is fp32 in
  the graph) are therefore given to the CUDA provider (`trt_op_types_to_exclude`), where they
  run as typed; LayerNorm's own pattern is kept fp32 too (`trt_layer_norm_fp32_fallback`). The
  fp32 nodes of a type that also has fp16 nodes (the pos-embed Adds, the last projection)
  cannot be singled out this way; `describe()["trt_fp32_islands"]` lists both. The bundle's own
  TensorRT engines (`--backend trt`) are strongly typed and keep every island.
- INT8 on x86 CPUs without VNNI: ONNX Runtime's u8 x s8 kernels add pairs of products in 16 bits
  with saturation, which 8-bit weights overflow. There the sessions run u8 x u8 (exact, slower;
  `exact_int8=False` keeps the fast kernels; `describe()["int8_u8u8"]` says which). Graphs with
  7-bit weights (`--int8-weight-bits 7`) need neither.
- Memory on CPUs: ONNX Runtime's memory pattern (one block sized for every intermediate tensor
  of a run, planned per input shape) is off on the CPU provider (`mem_pattern=True` turns it on):
  on the paper-size graphs it raised a batch-8 run's peak RSS by 91-230 MiB and did not change
  the speed. Elsewhere ONNX Runtime's default stands. `describe()["mem_pattern"]` says which.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rpiae.cache import default_cache_dir
from rpiae.engines.base import Backend, BackendUnavailable, cuda_index, int8_saturates
from rpiae.export.bundle import Bundle
from rpiae.export.checks import fp32_islands
from rpiae.export.manifest import KIND_AOTI_PACKAGE, KIND_ONNX, KIND_TRT_ENGINE
from rpiae.export.profile import BatchProfile
from rpiae.export.spec import GRAPHS, graph_specs
from rpiae.precisions import precision_info, trt_flags

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}
ALLOW_FALLBACK_ENV = "RPIAE_ALLOW_FALLBACK"
TF32_OVERRIDE_ENV = "NVIDIA_TF32_OVERRIDE"  # read by TensorRT, cuBLAS and cuDNN: 0 = never TF32
TRT_CACHE_DIR = "engines/ort-trt"
ORT_MISSING = ("onnxruntime is not installed: pip install -e '.[quant]' (CPU, the default install) or, on NVIDIA "
               "GPUs, one GPU stack: pip install -c constraints/gpu-cu13.txt -e '.[gpu-cu13]' (README, GPU)")


class ProviderFallback(BackendUnavailable):
    """ONNX Runtime ran a session on other providers than the ones asked for."""


def import_onnxruntime():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable(ORT_MISSING) from None
    return ort


def fallback_allowed(flag: bool | None = None) -> bool:
    if flag is not None:
        return flag
    return os.environ.get(ALLOW_FALLBACK_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Everything written to stdout/stderr inside the block (other threads' too), native (ONNX
    Runtime's C++ logger writes to fd 2) and Python-level (its fallback notice is a print);
    the list gets the text when the block ends."""
    out: list[str] = []
    buf = io.StringIO()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with tempfile.TemporaryFile() as f:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                yield out
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            out.append(f.read().decode(errors="replace") + buf.getvalue())


_LOG_PREFIX = re.compile(r"^\S+ \S+ \[[A-Z]:onnxruntime:[^\]]*\]\s*")


def fallback_reason(log: str, provider: str) -> str:
    """The most telling line(s) of ONNX Runtime's output about why `provider` did not load."""
    lines = [_LOG_PREFIX.sub("", line).strip() for line in log.splitlines()]
    lines = [line for line in lines if line and not line.startswith("****")]  # drop banners
    telling = [line for line in lines if provider in line or "EP Error" in line]
    errors = [line for line in lines if re.search(r"error|fail|cannot|could not|not found", line, re.I)]
    picked = list(dict.fromkeys(telling + errors))[:2]
    return " | ".join(picked) if picked else "ONNX Runtime logged no reason"


def bundle_profile(bundle: Bundle) -> BatchProfile:
    """The batch profile engines of this bundle were built for (TensorRT engines first, then
    AOTInductor packages), else the default 1:8:32."""
    for entry in bundle.files.values():
        p = entry.facts.profile if entry.kind == KIND_TRT_ENGINE else None
        if p and {"min", "opt", "max"} <= set(p):
            return BatchProfile(int(p["min"]), int(p["opt"]), int(p["max"]))
    for entry in bundle.files.values():
        b = entry.facts.batch if entry.kind == KIND_AOTI_PACKAGE else None
        if b and {"min", "max"} <= set(b):
            return BatchProfile(int(b["min"]), min(max(8, int(b["min"])), int(b["max"])), int(b["max"]))
    return BatchProfile()


def session_options(threads: int | None = None, log_level: int = 3, profile_prefix: str | None = None,
                    spinning: bool = True, u8u8: bool = False, mem_pattern: bool | None = None):
    """Every session's options: all graph optimisations, `threads` intra-op threads (None: ONNX
    Runtime's default), warnings muted at `log_level` 3, profiles into `profile_prefix`*.json.
    `spinning=False`: idle threads do not busy-wait (processes sharing cores, such as a server's
    model instances); `u8u8`: see INT8 above; `mem_pattern`: ONNX Runtime's memory pattern on or
    off (None: its default, on)."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if mem_pattern is not None:
        opts.enable_mem_pattern = bool(mem_pattern)
    if threads:
        opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if u8u8:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    opts.log_severity_level = log_level
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def _shape(batch: int, item: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in (batch, *item))


class ORTBackend(Backend):
    name = "ort"
    native = "numpy"

    def __init__(
        self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
        max_batch: int | None = None, allow_fallback: bool | None = None, io_binding: bool | None = None,
        op_profiling: bool = False, profile=None, graphs: tuple[str, ...] = GRAPHS, spinning: bool = True,
        exact_int8: bool | None = None, mem_pattern: bool | None = None,
    ) -> None:
        ort = import_onnxruntime()
        super().__init__(bundle.config, precision, max_batch, graphs)
        self.specs = graph_specs(bundle.config)
        self.kind = str(device).split(":")[0]
        if self.kind not in PROVIDERS:
            raise BackendUnavailable(f"ort backend: unknown device {device!r} (cpu, cuda, cuda:N, trt, trt:N)")
        index = cuda_index(device)
        available = ort.get_available_providers()
        wanted = PROVIDERS[self.kind]
        if wanted not in available:
            raise BackendUnavailable(
                f"ort backend: this onnxruntime has no {wanted} (has: {', '.join(available)}); "
                + ("both onnxruntime and onnxruntime-gpu are installed, which hides the CUDA providers: "
                   "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
                   if _both_ort_packages() else "install onnxruntime-gpu for CUDA/TensorRT (one GPU stack: pip install -c constraints/gpu-cu13.txt -e '.[gpu-cu13]')")
            )
        self.bundle = bundle
        self.device = str(device)
        self.threads = threads
        self.spinning = spinning
        # the memory pattern: off on CPUs unless asked (see "Memory on CPUs" above)
        self.mem_pattern = (self.kind != "cpu") if mem_pattern is None else bool(mem_pattern)
        self.allow_fallback = fallback_allowed(allow_fallback)
        self.device_id = 0
        self._torch_device = torch.device("cpu")
        self.stream = None  # the CUDA stream ONNX Runtime computes on (a torch.cuda.Stream), on GPUs
        if self.kind != "cpu":
            if index is not None and index >= 0:
                self.device_id = index
            elif torch.cuda.is_available():
                self.device_id = torch.cuda.current_device()
            if torch.cuda.is_available():
                self._torch_device = torch.device("cuda", self.device_id)
                self.stream = torch.cuda.Stream(self._torch_device)
        # I/O binding: torch tensors in and out; on by default wherever torch shares the GPU
        self.io_binding = (self._torch_device.type == "cuda") if io_binding is None else bool(io_binding)
        if self.io_binding:
            self.native = "torch"
        self.profile = profile or bundle_profile(bundle)
        self.trt_cache = self._trt_cache_dir() if self.kind == "trt" else None
        # resolve (and hash-check) the graphs now: a missing precision fails before any work
        self._paths = {g: bundle.graph_path(g, precision) for g in self.graphs}
        # exact int8 (default: where this CPU's u8 x s8 kernels would saturate the graphs' 8-bit weights)
        self.int8_u8u8 = int8_saturates(bundle, precision, self.graphs) if exact_int8 is None else (
            bool(exact_int8) and precision_info(precision).quantized)
        self.trt_fp32_islands = {g: fp32_islands(self._paths[g]) for g in self.graphs} if self.kind == "trt" else {}
        self._provider_lists = {g: self._provider_list(g) for g in self.graphs}
        self.providers_requested = self._provider_lists[self.graphs[0]]
        # op_profiling: ONNX Runtime's profiler on every session, its traces in a directory of ours
        self._profile_dir = Path(tempfile.mkdtemp(prefix="rpiae-ort-profile-")) if op_profiling else None
        self._run_options = ort.RunOptions()
        if self.stream is not None and self.io_binding:
            # ordering with torch's streams is by events (below); no host wait at the end of a run
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        self.fallback: dict[str, Any] | None = None
        if self.kind == "trt":
            tf32_off_for_tensorrt()
        try:
            self._sessions = {g: self._create_session(g) for g in self._paths}
        except BaseException:  # a backend that did not open leaves no profile directory behind
            if self._profile_dir is not None:
                shutil.rmtree(self._profile_dir, ignore_errors=True)
            raise
        self.providers = list(self._sessions[self.graphs[0]].get_providers())

    # -- sessions ------------------------------------------------------------------------------
    def _provider_list(self, graph: str) -> list[tuple[str, dict[str, Any]]]:
        cuda = cuda_provider_options(self.device_id, self.stream.cuda_stream if self.stream is not None else None)
        if self.kind == "cpu":
            return [("CPUExecutionProvider", {})]
        if self.kind == "cuda":
            return [("CUDAExecutionProvider", cuda), ("CPUExecutionProvider", {})]
        return [("TensorrtExecutionProvider", self._trt_options(graph, cuda)), ("CUDAExecutionProvider", cuda),
                ("CPUExecutionProvider", {})]

    def _trt_options(self, graph: str, cuda: dict[str, Any]) -> dict[str, Any]:
        shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
        for spec in graph_specs(self.config).values():
            for key in shapes:
                shapes[key].append(f"{spec.input_name}:{_shape(getattr(self.profile, key), spec.input_shape)}")
        name = self.bundle.find(graph, self.precision, KIND_ONNX)
        high = ((self.bundle.files[name].get("calibration") or {}).get("high_precision") if name else None)
        flags = trt_flags(self.precision, high)  # precision lives in the graph; the provider still wants its flags
        keep = self.trt_fp32_islands.get(graph, {}).get("by_type", []) if "fp16" in flags else []
        options = {
            **{k: v for k, v in cuda.items() if k != "use_tf32"},  # the TensorRT provider has no use_tf32
            # precision lives in the graph: fp16 casts, int8 Q/DQ (plus fp16 for its unquantised layers)
            "trt_fp16_enable": "fp16" in flags,
            "trt_int8_enable": "int8" in flags,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(self.trt_cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(self.trt_cache),
            # one profile per input; a session has one graph, so only its own input's entry applies
            "trt_profile_min_shapes": ",".join(shapes["min"]),
            "trt_profile_opt_shapes": ",".join(shapes["opt"]),
            "trt_profile_max_shapes": ",".join(shapes["max"]),
        }
        if "fp16" in flags:
            # weakly typed networks: keep the graph's fp32 islands out of TensorRT's fp16 choice
            options["trt_layer_norm_fp32_fallback"] = True
            if keep:
                options["trt_op_types_to_exclude"] = ",".join(keep)
        return options

    def _trt_cache_dir(self) -> Path:
        inside = self.bundle.root / TRT_CACHE_DIR
        try:
            inside.mkdir(parents=True, exist_ok=True)
            if os.access(inside, os.W_OK):
                return inside
        except OSError:
            pass
        key = self.bundle.files.get(self.bundle.find("encode", "fp32") or "", {}).get("sha256", "bundle")[:16]
        outside = default_cache_dir() / "ort-trt" / key
        outside.mkdir(parents=True, exist_ok=True)
        return outside

    def _open(self, graph: str, providers: list[tuple[str, dict[str, Any]]]):
        """(session, what ONNX Runtime printed while making it)."""
        ort = import_onnxruntime()
        # provider set-up problems are warnings; they are captured and shown only when they matter
        prefix = str(self._profile_dir / f"ort-{graph}") if self._profile_dir else None
        opts = session_options(self.threads, log_level=2 if self.kind != "cpu" else 3, spinning=self.spinning,
                               u8u8=self.int8_u8u8, profile_prefix=prefix, mem_pattern=self.mem_pattern)
        error = None
        with captured_output() as log:
            try:
                sess = ort.InferenceSession(str(self._paths[graph]), sess_options=opts, providers=providers)
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own RuntimeError subclasses
                sess, error = None, e
        if sess is None:
            msg = " ".join(str(error).split())[:400] or type(error).__name__
            raise BackendUnavailable(f"ort backend: ONNX Runtime could not open {self._paths[graph].name} on {self.device}: {msg}")
        return sess, log[0] if log else ""

    def _create_session(self, graph: str):
        if self.kind == "trt":
            from rpiae.export.tensorrt import import_tensorrt

            with contextlib.suppress(BackendUnavailable):  # loads libnvinfer from the tensorrt wheel for the provider
                import_tensorrt()
        requested = self._provider_lists[graph]
        sess, text = self._open(graph, requested)
        used = list(sess.get_providers())
        missing = [name for name, _ in requested if name != "CPUExecutionProvider" and name not in used]
        if missing:
            reason = fallback_reason(text, missing[0])
            msg = (f"ort backend: {missing[0]} failed to initialise for {self._paths[graph].name} and ONNX Runtime "
                   f"fell back to {', '.join(used)}: {reason}")
            if not self.allow_fallback:
                raise ProviderFallback(msg + " (pass --allow-fallback, or set RPIAE_ALLOW_FALLBACK=1, to run anyway)")
            print(f"warning: {msg}", file=sys.stderr)
            self.fallback = {"requested": [n for n, _ in requested], "used": used, "reason": reason}
            # ONNX Runtime's own retry drops the provider options (device_id, stream): make the
            # session again with the providers that work, options included
            sess, _ = self._open(graph, [(n, o) for n, o in requested if n in used])
            if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(used):
                self.io_binding, self.native, self.stream = False, "numpy", None  # a CPU session reads host memory
        else:
            errors = [line for line in text.splitlines() if re.search(r"\[[EF]:onnxruntime", line)]
            if errors:
                sys.stderr.write("\n".join(errors) + "\n")
        return sess

    def session(self, graph: str):
        return self._sessions[graph]

    # -- running -------------------------------------------------------------------------------
    def _run(self, graph: str, x):
        sess = self._sessions[graph]
        if not self.io_binding:
            return sess.run(None, {sess.get_inputs()[0].name: x})[0]
        return self._run_bound(sess, graph, x)

    def _run_bound(self, sess, graph: str, x: torch.Tensor) -> torch.Tensor:
        dev = self._torch_device
        out_shape = self.specs[graph].output_shape
        if dev.type == "cuda":
            current = torch.cuda.current_stream(dev)
            with torch.cuda.device(dev):
                x = x.to(dev, dtype=torch.float32, non_blocking=True).contiguous()
                out = torch.empty((x.shape[0], *out_shape), dtype=torch.float32, device=dev)
            self.stream.wait_stream(current)  # the input is ready before ONNX Runtime reads it
        else:
            x = x.to(dtype=torch.float32).contiguous()
            out = torch.empty((x.shape[0], *out_shape), dtype=torch.float32)
        kind, index = ("cuda", dev.index) if dev.type == "cuda" else ("cpu", 0)
        binding = sess.io_binding()
        binding.bind_input(sess.get_inputs()[0].name, kind, index, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(sess.get_outputs()[0].name, kind, index, np.float32, tuple(out.shape), out.data_ptr())
        sess.run_with_iobinding(binding, self._run_options)
        if dev.type == "cuda":
            current.wait_stream(self.stream)  # later work on the caller's stream sees the output
            x.record_stream(self.stream)  # and the allocator keeps both buffers until ONNX Runtime is done
            out.record_stream(self.stream)
        return out

    def polygraphy_runner(self, graph: str):
        from polygraphy.backend.onnxrt import OnnxrtRunner

        return OnnxrtRunner(self.session(graph), name=f"onnxrt-{self.kind}-{self.precision}")

    def op_profile(self, graph: str, x, runs: int = 2, cuda: bool = False) -> tuple[dict[str, float], str]:
        """Kernel seconds by op type from ONNX Runtime's profiler (needs `op_profiling=True`)
        over `runs` calls of `graph` on `x` (the first calls of a session: no warm call, the
        session's own warm-up is in ONNX Runtime's trace as `session_initialization`)."""
        if self._profile_dir is None:
            raise BackendUnavailable("ort backend: op_profile needs the backend opened with op_profiling=True")
        run = self.graph_call(graph)
        for _ in range(runs):
            run(x)
        events = json.loads(Path(self._sessions[graph].end_profiling()).read_text())
        totals: dict[str, float] = {}
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + ev.get("dur", 0) / 1e6
        return totals, f"onnxruntime profiler (kernel time by op type; {', '.join(self.providers)})"

    def describe(self) -> dict:
        info = {**super().describe(), "device": self.device, "providers": self.providers,
                "providers_requested": [n for n, _ in self.providers_requested], "io_binding": self.io_binding,
                "mem_pattern": self.mem_pattern}
        if self.kind != "cpu":
            info["device_id"] = self.device_id
        if precision_info(self.precision).quantized:
            info["int8_u8u8"] = self.int8_u8u8
        if self.fallback:
            info["fallback"] = self.fallback
        if self.trt_cache is not None:
            info["trt_cache"] = str(self.trt_cache)
            info["profile"] = str(self.profile)
            info["tf32"] = f"off ({TF32_OVERRIDE_ENV}={os.environ.get(TF32_OVERRIDE_ENV)})"
            if self.precision != "fp32":
                info["trt_fp32_islands"] = self.trt_fp32_islands
        elif self.kind == "cuda":
            info["tf32"] = "off (use_tf32=0)"
        return info

    def close(self) -> None:
        self._sessions.clear()
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)


def cuda_provider_options(device_id: int, stream: int | None = None) -> dict[str, Any]:
    """The CUDA provider's options: the GPU, the stream to compute on, and TF32 off (ONNX
    Runtime's default is on since 1.17; FP32 graphs are IEEE FP32 here)."""
    options: dict[str, Any] = {"device_id": device_id, "use_tf32": 0}
    if stream is not None:
        options["user_compute_stream"] = str(stream)
    return options


def tf32_off_for_tensorrt() -> None:
    """TF32 off for TensorRT in this process (the TensorRT provider has no option for it):
    TensorRT, cuBLAS and cuDNN honour NVIDIA_TF32_OVERRIDE=0. Set before a session is made."""
    os.environ[TF32_OVERRIDE_ENV] = "0"


def _both_ort_packages() -> bool:
    """Both `onnxruntime` and `onnxruntime-gpu` installed: they share one `onnxruntime` module
    and whichever was installed last decides which providers it has."""
    from importlib import metadata

    found = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            found.add(dist)
        except metadata.PackageNotFoundError:
            pass
    return len(found) == 2
