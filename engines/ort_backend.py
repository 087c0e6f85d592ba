"""ONNX Runtime backend: runs a bundle's precision-typed ONNX graphs.

CPU by default; `device="cuda"` uses the CUDA execution provider and `device="trt"` ONNX
Runtime's TensorRT provider when the installed onnxruntime has them. One session per
graph, created on first use and reused.
"""

from __future__ import annotations

import numpy as np

from rpiae.engines.base import Backend, BackendUnavailable
from rpiae.export.bundle import Bundle

_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class ORTBackend(Backend):
    name = "ort"
    native = "numpy"

    def __init__(
        self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
        max_batch: int | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__(bundle.config, precision, max_batch)
        kind = device.split(":")[0]
        if kind not in _PROVIDERS:
            raise BackendUnavailable(f"ort backend: unknown device {device!r} (cpu, cuda, trt)")
        wanted = _PROVIDERS[kind][0]
        if wanted not in ort.get_available_providers():
            raise BackendUnavailable(
                f"ort backend: this onnxruntime has no {wanted} (has: {', '.join(ort.get_available_providers())}); "
                "install onnxruntime-gpu for CUDA/TensorRT"
            )
        self.bundle = bundle
        self.device = device
        self.providers = _PROVIDERS[kind]
        self.threads = threads
        self._sessions: dict[str, object] = {}
        # resolve (and hash-check) both graphs now: a missing precision fails before any work
        self._paths = {g: bundle.graph_path(g, precision) for g in ("encode", "decode")}

    def session(self, graph: str):
        if graph not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if self.threads:
                opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            self._sessions[graph] = ort.InferenceSession(str(self._paths[graph]), sess_options=opts, providers=self.providers)
        return self._sessions[graph]

    def _run(self, graph: str, x: np.ndarray) -> np.ndarray:
        sess = self.session(graph)
        return sess.run(None, {sess.get_inputs()[0].name: x})[0]

    def describe(self) -> dict:
        return {**super().describe(), "device": self.device, "providers": self.providers}

    def close(self) -> None:
        self._sessions.clear()
