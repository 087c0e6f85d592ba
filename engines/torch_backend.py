"""PyTorch eager backend: the reference every other backend is checked against."""

from __future__ import annotations

import torch

from rpiae.engines.base import Backend, BackendUnavailable
from rpiae.model import RPiAE

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend(Backend):
    name = "torch"
    native = "torch"

    def __init__(
        self, model: RPiAE, precision: str = "fp32", device: str = "cpu", max_batch: int | None = None,
        compile: bool = False,
    ) -> None:
        if precision not in _DTYPES:
            raise BackendUnavailable(f"torch backend runs {', '.join(_DTYPES)}, not {precision}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend: CUDA was asked for but torch.cuda.is_available() is False")
        super().__init__(model.config, precision, max_batch)
        self.device = torch.device(device)
        self.dtype = _DTYPES[precision]
        self.model = model.eval().to(self.device)
        # compile=True: torch.compile of encode/decode (the benchmark's `torch-compile` row);
        # the first call per batch size compiles, later calls reuse the compiled graph
        self.compiled = compile
        self._fns = {"encode": self.model.encode, "decode": self.model.decode}
        if compile:
            self._fns = {g: torch.compile(f, dynamic=False) for g, f in self._fns.items()}

    @torch.inference_mode()
    def _run(self, graph: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        fn = self._fns[graph]
        if self.dtype == torch.float32:
            return fn(x.float())
        with torch.autocast(self.device.type, dtype=self.dtype):
            return fn(x.float()).float()

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "compiled": self.compiled}
