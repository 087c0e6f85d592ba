"""TensorRT backend: runs a bundle's engines (`rpiae export --target trt`) behind the one
backend interface.

Both engines of the asked precision are checked before any work: present in the bundle,
sha256 intact, built with this TensorRT version for this GPU's compute capability (else a
one-line error saying how to rebuild). Arrays may come from the host or the GPU; the
engines run on `device` (cuda or cuda:N; `cpu` means the default GPU, with numpy/CPU
results). Batches are split to the engines' profile maximum. The TensorRT calls themselves
live in `rpiae.engines.tensorrt` (building them in `rpiae.export.tensorrt`).
"""

from __future__ import annotations

import torch

from rpiae.engines import tensorrt as T
from rpiae.engines.base import Backend
from rpiae.export.bundle import Bundle, BundleError
from rpiae.export.manifest import KIND_TRT_ENGINE
from rpiae.export.spec import GRAPHS


class TRTBackend(Backend):
    name = "trt"
    native = "torch"

    def __init__(self, bundle: Bundle, precision: str = "fp16", device: str = "cuda", max_batch: int | None = None,
                 graphs: tuple[str, ...] = GRAPHS) -> None:
        T.import_tensorrt()
        self.device = T.require_cuda(device)
        super().__init__(bundle.config, precision, max_batch, graphs)
        self.bundle = bundle
        env = T.current_environment(self.device)
        names = {}
        for graph in self.graphs:
            name = bundle.find(graph, precision, KIND_TRT_ENGINE)
            if name is None:
                have = ", ".join(bundle.precisions(KIND_TRT_ENGINE)) or "none"
                raise BundleError(
                    f"bundle {bundle.root} has no {precision} TensorRT {graph} engine (has: {have}); build it with "
                    f"`rpiae export --target trt --precision {precision} --out {bundle.root}`"
                )
            T.check_engine_compat(bundle.files[name], env, bundle.root, name)
            names[graph] = name
        self._runners = {g: T.EngineRunner(bundle.verify_file(n).read_bytes(), self.device,
                                           version_compatible=bool(bundle.files[n].get("version_compatible")))
                         for g, n in names.items()}
        limit = min(r.max_batch for r in self._runners.values())
        self.max_batch = min(max_batch, limit) if max_batch else limit

    def runner(self, graph: str) -> T.EngineRunner:
        """The deserialized engine of one graph (polygraphy's comparison runs it directly)."""
        return self._runners[graph]

    def _run(self, graph: str, x: torch.Tensor) -> torch.Tensor:
        return self._runners[graph](x)

    def polygraphy_runner(self, graph: str):
        from polygraphy.backend.trt import TrtRunner

        return TrtRunner(self.runner(graph).engine, name=f"tensorrt-{self.precision}")

    def describe(self) -> dict:
        r = self._runners[self.graphs[0]]
        facts = self.bundle.files[self.bundle.find(self.graphs[0], self.precision, KIND_TRT_ENGINE)].facts
        return {**super().describe(), "device": str(self.device), "profile": f"{r.min_batch}:{r.opt_batch}:{r.max_batch}",
                "tensorrt": facts.tensorrt, "version_compatible": facts.version_compatible}

    def close(self) -> None:
        for r in self._runners.values():
            r.close()
        self._runners = {}
