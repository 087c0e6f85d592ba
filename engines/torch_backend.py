"""PyTorch eager backend: the reference every other backend is checked against.

On CUDA it computes inside its own device's scope (`cuda:1` really runs, allocates and
synchronises on GPU 1) and, at FP32, with TF32 off (`strict_fp32`): PyTorch enables TF32
for cuDNN convolutions by default, which rounds the patch embedding's inputs to 10-bit
mantissas and breaks the FP32 parity bound (1e-4 relative).
"""

from __future__ import annotations

import torch

from rpiae.devices import autocast_weights
from rpiae.engines.base import Backend, BackendUnavailable, device_scope, precision_context, torch_device
from rpiae.export.spec import GRAPHS
from rpiae.model import RPiAE
from rpiae.precisions import TORCH_DTYPES as _DTYPES


class TorchBackend(Backend):
    name = "torch"
    native = "torch"

    def __init__(
        self, model: RPiAE, precision: str = "fp32", device: str = "cpu", max_batch: int | None = None,
        compile: bool = False, graphs: tuple[str, ...] = GRAPHS,
    ) -> None:
        self.check_precision(precision)
        dev = torch_device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable("torch backend: CUDA was asked for but torch.cuda.is_available() is False")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise BackendUnavailable(f"torch backend: {device} does not exist ({torch.cuda.device_count()} GPU(s))")
        super().__init__(model.config, precision, max_batch, graphs)
        self.device = dev
        self.dtype = _DTYPES[precision]
        self.model = model.eval().to(self.device)
        if self.dtype != torch.float32:  # autocast: its matmul weights cast once, not at every call
            self.model = autocast_weights(self.model, self.dtype)
        # compile=True: torch.compile of encode/decode (the benchmark's `torch-compile` row);
        # the first call per batch size compiles, later calls reuse the compiled graph
        self.compiled = compile
        self._fns = {g: getattr(self.model, g) for g in self.graphs}
        if compile:
            self._fns = {g: torch.compile(f, dynamic=False) for g, f in self._fns.items()}

    @torch.inference_mode()
    def _run(self, graph: str, x: torch.Tensor) -> torch.Tensor:
        with device_scope(self.device):
            x = x.to(self.device).float()
            with precision_context(self.device, self.dtype):
                return self._fns[graph](x).float()

    def describe(self) -> dict:
        weights = sorted({str(p.dtype).replace("torch.", "") for p in self.model.parameters()})
        return {**super().describe(), "device": str(self.device), "compiled": self.compiled, "weights": weights}
