"""Device strings and how PyTorch computes on them, shared by export, the runtimes and the
benchmark: `cpu`, `cuda`, `cuda:N`, and `trt`/`trt:N` (ONNX Runtime's TensorRT provider, which
runs on CUDA device N; a PyTorch reference for it runs on that GPU).

`BackendUnavailable` is the one error for "this machine cannot do that": a runtime that is not
installed, a device that is not there, an artefact built for another machine. Its message
says what to do.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


class BackendUnavailable(RuntimeError):
    """A backend whose runtime is not installed or cannot run here (message says what to do)."""


class PrecisionUnsupported(BackendUnavailable):
    """A precision a backend never runs (by design, not for want of a file or a runtime)."""


def cuda_index(device: str | torch.device | None) -> int | None:
    """The CUDA device index a device string names: N for `cuda:N`/`trt:N`, -1 for `cuda`/`trt`
    (torch's current device), None for the CPU."""
    text = str(device or "cpu")
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda", "trt"):
        raise BackendUnavailable(f"unknown device {text!r} (cpu, cuda, cuda:N, trt, trt:N)")
    if kind == "cpu":
        return None
    if index and not index.isdigit():
        raise BackendUnavailable(f"unknown device {text!r} (cpu, cuda, cuda:N, trt, trt:N)")
    return int(index) if index else -1


def torch_device(device: str | torch.device | None) -> torch.device:
    """The torch device a device string runs PyTorch on (`trt[:N]` -> `cuda[:N]`)."""
    index = cuda_index(device)
    if index is None:
        return torch.device("cpu")
    return torch.device("cuda", index) if index >= 0 else torch.device("cuda")


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """FP32 math for CUDA kernels inside the block: no TF32 in cuDNN convolutions (on by
    default in PyTorch) nor in cuBLAS matmuls; the previous settings come back afterwards.

    Set through the legacy switches, which every torch 2.x reads; restored through them when
    they could be read, else (a process that set the newer per-op `fp32_precision` switches,
    which make the legacy getters raise) through the per-op switches."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    per_op = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision)
    try:
        legacy = (cudnn.allow_tf32, matmul.allow_tf32, torch.get_float32_matmul_precision())
    except RuntimeError:
        legacy = None
    cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")  # = matmul.allow_tf32 False, and keeps the getters consistent
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[2])
            matmul.allow_tf32 = legacy[1]
            cudnn.allow_tf32 = legacy[0]
        else:
            cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision = per_op


def precision_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """How a PyTorch graph computes at `dtype` on `device`: FP32 without TF32 on CUDA, autocast
    for fp16/bf16, nothing special for FP32 on the CPU."""
    if dtype == torch.float32:
        return strict_fp32() if device.type == "cuda" else contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def autocast_weights(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` for inference under `precision_context(..., dtype)` whose matmul and
    convolution weights (`nn.Linear`, `nn.Conv*`, packed `in_proj_*`) are stored in `dtype`; the
    other parameters and buffers (norms, embeddings) are copied as they are. Autocast casts those
    weights to `dtype` at every call (its cast cache serves only tensors that require grad), which
    took 11-16 % of PyTorch's CPU bf16 time; cast once here, the outputs are bit-identical. The
    fp32 weights are never copied, so the copy holds `dtype`'s share only."""
    memo: dict[int, nn.Parameter] = {}
    for m in model.modules():
        names = ("weight", "bias") if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) else (
            "in_proj_weight", "in_proj_bias")
        for name in names:
            p = getattr(m, name, None)
            if isinstance(p, nn.Parameter) and p.is_floating_point():
                memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    return copy.deepcopy(model, memo)


def device_scope(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` torch's current CUDA device inside the block (streams, allocations and
    synchronisation then default to it); nothing for the CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
