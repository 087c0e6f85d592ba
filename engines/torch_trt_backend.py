"""Torch-TensorRT backend (`torch-trt`): the PyTorch encode/decode graphs compiled by
Torch-TensorRT's dynamo frontend, for users who stay in Python.

It compiles the same graph modules the ONNX and AOTInductor exports use
(`rpiae.export.graphs`) from a checkpoint or a bundle's weights, with a dynamic batch axis
over the batch profile (default 1:8:32), when the backend is opened. Precision comes from
`precision`: fp32 (TF32 off), fp16 or bf16 through Torch-TensorRT's rule-based autocast
(`use_explicit_typing` + `enable_autocast`, Torch-TensorRT >= 2.10) or, in older releases,
`enabled_precisions`. int8 needs a ModelOpt-quantised PyTorch graph and is refused: the
bundle's int8 engines run with `--backend trt`. `import torch_tensorrt` happens here only;
without it the backend is unavailable with one line saying what to install.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rpiae.engines.base import Backend, BackendUnavailable, PrecisionUnsupported, device_scope, strict_fp32
from rpiae.export.graphs import graph_module
from rpiae.export.profile import BatchProfile
from rpiae.export.spec import GRAPHS, graph_spec
from rpiae.precisions import TORCH_DTYPES as DTYPES

TORCH_TRT_MISSING = ("Torch-TensorRT is not installed: it comes with the CUDA 13 GPU stack, "
                     "pip install -c constraints/gpu-cu13.txt -e '.[gpu-cu13]' (torch-tensorrt 2.13 is a CUDA 13 build)")


def import_torch_tensorrt():
    try:
        import torch_tensorrt
    except ImportError:
        raise BackendUnavailable(TORCH_TRT_MISSING) from None
    except Exception as e:  # a wheel built for another torch or CUDA fails with OSError/RuntimeError
        raise BackendUnavailable(f"Torch-TensorRT is installed but failed to load ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())[:200]}); install the torch-tensorrt release of this torch") from None
    return torch_tensorrt


def compile_settings(torch_tensorrt, dtype: torch.dtype) -> dict[str, Any]:
    """Keyword settings for `torch_tensorrt.compile` at `dtype`, for the installed release."""
    try:
        from torch_tensorrt.dynamo._settings import CompilationSettings

        fields = {f.name for f in dataclasses.fields(CompilationSettings)}
    except (ImportError, TypeError):
        fields = {"enabled_precisions", "disable_tf32"}
    settings: dict[str, Any] = {}
    if "disable_tf32" in fields:
        settings["disable_tf32"] = True  # FP32 layers (all of them at fp32) compute in IEEE FP32
    if dtype == torch.float32:
        return settings
    if "enable_autocast" in fields:  # strongly typed TensorRT: the graph is cast, enabled_precisions is ignored
        settings.update(use_explicit_typing=True, enable_autocast=True, autocast_low_precision_type=dtype)
    else:
        settings["enabled_precisions"] = {torch.float32, dtype}
    return settings


class TorchTRTBackend(Backend):
    name = "torch-trt"
    native = "torch"

    @classmethod
    def require(cls) -> None:
        import_torch_tensorrt()

    def __init__(self, model, precision: str = "fp16", device: str = "cuda", max_batch: int | None = None,
                 profile=None, graphs: tuple[str, ...] = GRAPHS) -> None:
        from rpiae.engines.tensorrt import require_cuda

        if precision not in DTYPES:
            raise PrecisionUnsupported(
                f"torch-trt backend compiles {', '.join(DTYPES)}, not {precision}: int8 needs a ModelOpt-quantised "
                "PyTorch graph; run the bundle's int8 engines with --backend trt"
            )
        torch_tensorrt = import_torch_tensorrt()
        self.device = require_cuda(device)
        self.profile = profile or BatchProfile()
        top = self.profile.max
        super().__init__(model.config, precision, min(max_batch, top) if max_batch else top, graphs)
        self.dtype = DTYPES[precision]
        self.settings = compile_settings(torch_tensorrt, self.dtype)
        self._modules = {g: self._compile(torch_tensorrt, model, g) for g in self.graphs}

    def _compile(self, torch_tensorrt, model, graph: str):
        item = graph_spec(self.config, graph).input_shape
        p = self.profile
        spec = torch_tensorrt.Input(min_shape=(p.min, *item), opt_shape=(p.opt, *item), max_shape=(p.max, *item),
                                    dtype=torch.float32)
        with device_scope(self.device), strict_fp32(), torch.no_grad():
            module = graph_module(model.float().eval().to(self.device), graph)
            try:
                return torch_tensorrt.compile(module, ir="dynamo", inputs=[spec], **self.settings)
            except Exception as e:  # noqa: BLE001 - conversion errors come from deep inside Torch-TensorRT
                msg = " ".join(str(e).split())[:300] or type(e).__name__
                raise BackendUnavailable(f"torch-trt backend: Torch-TensorRT could not compile the {graph} graph: {msg}") from None

    @torch.inference_mode()
    def _run(self, graph: str, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        with device_scope(self.device), strict_fp32():  # graph parts left to PyTorch compute in FP32 too
            x = x.to(self.device, dtype=torch.float32).contiguous()
            if n < self.profile.min:  # pad to the profile's minimum, drop the padding afterwards
                x = torch.cat([x, x[-1:].expand(self.profile.min - n, *x.shape[1:])])
            return self._modules[graph](x)[:n].float()

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "profile": str(self.profile),
                "settings": {k: (sorted(map(str, v)) if isinstance(v, set) else str(v)) for k, v in self.settings.items()}}

    def close(self) -> None:
        self._modules = {}
