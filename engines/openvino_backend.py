"""OpenVINO backend: runs a bundle's ONNX graphs with OpenVINO on the CPU.

Precisions (what runs is read back from the compiled model: `describe()["runtime_precisions"]`):
- fp32: the FP32 graph with the inference precision hint f32. OpenVINO's CPU default is bf16
  on CPUs that have it, so the hint is always set: fp32 means fp32 on every machine.
- bf16: the FP32 graph with the hint bf16 (matmuls and convolutions in bf16, AMX or
  AVX512-BF16). Refused, with the CPU's capabilities, where OpenVINO does not list BF16: there
  it ignores the hint and runs f32. After compiling, the runtime model is read back and a bf16
  backend whose compute layers run no bf16 is refused too.
- int8: the bundle's Q/DQ graph (OpenVINO runs the quantised matmuls and convolution in
  int8); its other layers in f32. On x86 CPUs without VNNI OpenVINO's int8 kernels add pairs of
  u8 x s8 products in 16 bits with saturation, which 8-bit weights overflow, and OpenVINO has no
  exact fallback: such a backend warns, and `describe()["int8_saturates"]` is true. Bundles
  exported with `--int8-weight-bits 7` compute the graph's own arithmetic there.
  `int8_rest="bf16"` runs those other layers (attention, GELU, norms, residuals, the
  quantise/dequantise steps) with the bf16 hint instead, on CPUs with bf16: faster, and less
  exact than the graph (its accuracy is measured like any precision's, `rpiae eval`).

`op_profiling=True` turns OpenVINO's performance counters on (`op_profile`: time per node
type and kernel, the benchmark's `--profile`).

Hints: `latency` (default; one request, every thread on one batch) or `throughput` (OpenVINO
chooses its streams; a batch is split over the compiled model's optimal number of requests
and run as that many asynchronous requests). `threads` sets INFERENCE_NUM_THREADS. The graphs' batch
axis is symbolic, so one compiled model takes every batch size.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rpiae.engines.base import Backend, BackendUnavailable, PrecisionUnsupported, int8_saturates
from rpiae.export.backends import backend_info
from rpiae.export.bundle import Bundle
from rpiae.export.spec import GRAPHS
from rpiae.precisions import precision_info

OPENVINO_MISSING = "OpenVINO is not installed: pip install -e '.[openvino]'"
HINTS = ("latency", "throughput")
INT8_REST = ("f32", "bf16")  # the inference precision of an int8 graph's unquantised layers
_INFERENCE_TYPE = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # OpenVINO inference precision hint per precision
_COMPUTE_LAYERS = ("FullyConnected", "MatMul", "Convolution")  # where the time goes, and the precision shows


def cpu_capabilities(core) -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of this CPU (FP32, INT8, BF16 where it has AMX or
    AVX512-BF16, ...)."""
    return [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def unmet(runtime_precisions: dict[str, dict[str, dict[str, int]]], inference: str) -> str | None:
    """Why a compiled model does not run in `inference` (an OpenVINO type name), or None: a 16-bit
    hint must show in the precision of at least one compute layer of every graph."""
    if inference == "f32":
        return None
    for graph, layers in runtime_precisions.items():
        seen = {p for counts in layers.values() for p in counts}
        if inference not in seen:
            return f"OpenVINO compiled the {graph} graph's compute layers in {', '.join(sorted(seen)) or 'nothing'}, not {inference}"
    return None


def import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(OPENVINO_MISSING) from e
    return openvino


class OpenVINOBackend(Backend):
    name = "openvino"
    native = "numpy"
    option_choices = {"hint": HINTS, "int8_rest": INT8_REST}  # checked when options are parsed (usage errors)

    @classmethod
    def require(cls) -> None:
        import_openvino()

    def __init__(self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", max_batch: int | None = None,
                 threads: int | None = None, hint: str = "latency", graphs: tuple[str, ...] = GRAPHS,
                 op_profiling: bool = False, int8_rest: str = "f32") -> None:
        ov = import_openvino()
        import openvino.properties as props
        import openvino.properties.hint as hints

        self.check_precision(precision)
        info = backend_info(self.name)
        if str(device).split(":")[0] != "cpu":
            raise BackendUnavailable(f"openvino backend runs on the CPU (device cpu), not {device}")
        if hint not in HINTS:
            raise ValueError(f"openvino backend: unknown hint {hint!r}; choose {' or '.join(HINTS)}")
        super().__init__(bundle.config, precision, max_batch, graphs)
        self.core = ov.Core()
        self.cpu = str(self.core.get_property("CPU", "FULL_DEVICE_NAME"))
        self.capabilities = cpu_capabilities(self.core)
        if int8_rest not in INT8_REST:
            raise ValueError(f"openvino backend: unknown int8_rest {int8_rest!r}; choose {' or '.join(INT8_REST)}")
        if int8_rest != "f32" and not precision_info(precision).quantized:
            raise PrecisionUnsupported(f"openvino backend: int8_rest={int8_rest} is for int8 graphs, not {precision}")
        around_int8 = int8_rest != "f32"  # the hint then applies to the layers around the int8 ones
        inference = int8_rest if around_int8 else _INFERENCE_TYPE[precision]
        self.int8_rest = int8_rest
        if inference.upper() not in self.capabilities and inference != "f32":
            what = f"{inference} around int8" if around_int8 else precision
            raise PrecisionUnsupported(
                f"openvino backend: this CPU ({self.cpu}) has no native {inference} (OpenVINO's CPU capabilities: "
                f"{', '.join(self.capabilities)}); {what} needs AMX or AVX512-BF16 - run fp32 or int8")
        self.bundle, self.device, self.hint = bundle, "cpu", hint
        # bf16 runs the FP32 graph with another hint (the registry's `files_of`)
        self._paths: dict[str, Path] = {g: bundle.graph_path(g, info.file_precision(precision)) for g in self.graphs}
        config: dict[Any, Any] = {
            hints.performance_mode: hints.PerformanceMode.THROUGHPUT if hint == "throughput" else hints.PerformanceMode.LATENCY,
            hints.inference_precision: getattr(ov.Type, inference),
        }
        if threads:
            config[props.inference_num_threads] = int(threads)
        if op_profiling:  # per-node times of each request (`op_profile`)
            config[props.enable_profiling] = True
        try:
            self._compiled = {g: self.core.compile_model(self.core.read_model(str(p)), "CPU", config)
                              for g, p in self._paths.items()}
        except RuntimeError as e:
            raise BackendUnavailable(f"openvino backend: could not compile {precision} graphs: {' '.join(str(e).split())[:300]}") from e
        # what the compiled models really run: read once, checked here and reported by describe()
        every = {g: self.runtime_precisions(g, layers=None) for g in self.graphs}
        self._runtime = {g: {k: v for k, v in layers.items() if k in _COMPUTE_LAYERS} for g, layers in every.items()}
        # around int8 the hint shows in the element-wise layers, not in the (int8) compute layers
        problem = unmet(every if around_int8 else self._runtime, inference)
        if problem:
            raise PrecisionUnsupported(f"openvino backend: {problem} on this CPU ({self.cpu}); run fp32 or int8")
        self.int8_saturates = int8_saturates(bundle, precision, self.graphs)
        if self.int8_saturates:
            print(f"warning: openvino backend: this CPU ({self.cpu}) has no VNNI, and OpenVINO's int8 kernels saturate "
                  "with the bundle's 8-bit weights (results depart from the graph); export with --int8-weight-bits 7 "
                  "for this CPU, or run int8 on the ort backend", file=sys.stderr)
        self._requests = {g: c.create_infer_request() for g, c in self._compiled.items()}
        # throughput: the compiled model's optimal number of requests, each on its own stream
        self._pools = {g: [c.create_infer_request() for _ in range(int(c.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))]
                       for g, c in self._compiled.items()} if hint == "throughput" else {}

    def _run(self, graph: str, x: np.ndarray) -> np.ndarray:
        pool = self._pools.get(graph)
        if pool is None or len(x) == 1:
            return self._requests[graph].infer({0: x})[0]  # a copy (share_outputs=False): the next call reuses the tensor
        chunks = np.array_split(x, min(len(pool), len(x)))
        # no completion callbacks: a Python callback runs on OpenVINO's own threads, and a
        # process that had one was seen to crash later (in a fork) under pytest's faulthandler
        for request, chunk in zip(pool, chunks):
            request.start_async({0: np.ascontiguousarray(chunk)})
        for request in pool[: len(chunks)]:
            request.wait()
        return np.concatenate([r.get_output_tensor(0).data.copy() for r in pool[: len(chunks)]])

    def op_times(self, graph: str) -> dict[str, float]:
        """Seconds per (node type, kernel) of the last latency-hint call of `graph` (needs
        `op_profiling=True`): OpenVINO's performance counters, the kernel naming its ISA (e.g.
        `brgemm_avx512_amx`, `jit_avx2`)."""
        out: dict[str, float] = {}
        for info in self._requests[graph].profiling_info:
            if info.status == info.Status.EXECUTED:
                key = f"{info.node_type} ({info.exec_type})"
                out[key] = out.get(key, 0.0) + info.real_time.total_seconds()
        return out

    def op_profile(self, graph: str, x, runs: int = 2, cuda: bool = False) -> tuple[dict[str, float], str]:
        """`op_times` summed over `runs` calls of `graph` on `x`, after one warm call."""
        run = self.graph_call(graph)
        run(x)
        totals: dict[str, float] = {}
        for _ in range(runs):
            run(x)
            for op, t in self.op_times(graph).items():
                totals[op] = totals.get(op, 0.0) + t
        return totals, f"OpenVINO performance counters (time by node type and kernel; {self.cpu})"

    def runtime_precisions(self, graph: str, layers: tuple[str, ...] | None = _COMPUTE_LAYERS) -> dict[str, dict[str, int]]:
        """Layer type -> {precision it executes in: count}, for the compute layers (or the `layers`
        types; None: every type) of the compiled model (OpenVINO's runtime model: what really runs)."""
        counts: dict[str, Counter] = {}
        for op in self._compiled[graph].get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            kind = rt["layerType"].astype(str)
            if layers is None or kind in layers:
                counts.setdefault(kind, Counter())[rt["runtimePrecision"].astype(str)] += 1
        return {k: dict(v) for k, v in counts.items()}

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        first = self._compiled[self.graphs[0]]
        info = {**super().describe(), "device": self.device, "cpu": self.cpu, "openvino": ov.get_version(),
                "hint": self.hint, "inference_precision": first.get_property("INFERENCE_PRECISION_HINT").to_string(),
                "threads": int(first.get_property("INFERENCE_NUM_THREADS")), "streams": int(first.get_property("NUM_STREAMS")),
                "requests": len(self._pools.get(self.graphs[0], [])) or 1,
                "capabilities": self.capabilities,
                "runtime_precisions": self._runtime}
        if precision_info(self.precision).quantized:
            info["int8_saturates"] = self.int8_saturates
            info["int8_rest"] = self.int8_rest
        return info

    def close(self) -> None:
        self._pools.clear()
        self._requests.clear()
        self._compiled.clear()
