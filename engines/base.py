"""The one runtime interface every backend implements (torch, ort, trt, aoti).

A backend runs the two inference graphs on batches of numpy arrays or torch tensors:

    encode: (B, 3, 256, 256) float in [0, 1]  -> (B, 64, 16, 16) float32 latent (posterior mean)
    decode: (B, 64, 16, 16) float             -> (B, 3, 256, 256) float32 image (not clamped)

Outputs come back in the caller's array type (numpy in, numpy out; torch in, torch out on
the input's device). Inputs are validated here, once, for every backend: wrong shape or
dtype, NaN/Inf raise `InputError` with a one-line message. Batches larger than the
backend's limit are split.

The NaN/Inf check reads the input once (a float64 sum on the host, `aminmax` on a torch
tensor). For tensors on a GPU it runs on the device and its one-element result is read
only after the graphs have been queued, so the check never stalls the GPU before a call.
A torch tensor is checked once: calling again with the same, unmodified tensor (the same
object, the same version counter: in-place torch ops bump it) skips the check, so a
benchmark's timed calls on one device tensor run without a host synchronisation. (Writes
that bypass torch, through `.numpy()` or DLPack, are not seen.)

A backend opened for one graph (`graphs=("encode",)`, what a server's encode model does)
loads only that graph's files; calling the other graph raises `BackendUnavailable`.

Device strings are those of `rpiae.devices` (`cpu`, `cuda[:N]`, `trt[:N]`).
"""

from __future__ import annotations

import abc
import math
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch

from rpiae.config import RPiAEConfig
from rpiae.devices import BackendUnavailable, PrecisionUnsupported, cuda_index, device_scope, precision_context, strict_fp32, torch_device
from rpiae.export.spec import GRAPHS

Array = Any  # np.ndarray | torch.Tensor


def check_graphs(graphs) -> tuple[str, ...]:
    """The graphs a backend is opened for, in canonical order; ValueError for anything else."""
    chosen = tuple(g for g in GRAPHS if g in set(graphs))
    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown or not chosen:
        raise ValueError(f"graphs: expected some of {', '.join(GRAPHS)}, got {', '.join(map(str, graphs)) or 'none'}")
    return chosen


def int8_saturates(bundle, precision: str, graphs) -> bool:
    """Whether a bundle's `precision` graphs are Q/DQ graphs with 8-bit weights and this CPU's
    int8 kernels add pairs of products in 16 bits with saturation (an x86 CPU without VNNI,
    `rpiae.precisions.int8_pairs_saturate`): there ONNX Runtime's and OpenVINO's int8 kernels
    compute something other than the graph's own arithmetic."""
    from rpiae.export.manifest import KIND_ONNX
    from rpiae.host import cpu_flags
    from rpiae.precisions import int8_pairs_saturate, precision_info

    if not precision_info(precision).quantized or not int8_pairs_saturate(cpu_flags()):
        return False
    names = [bundle.find(g, precision, KIND_ONNX) for g in graphs]
    return any((bundle.files[n].facts.weight_bits or 8) > 7 for n in names if n)


class InputError(ValueError):
    """Input arrays that a graph cannot take."""


_FLOAT_DTYPES = (np.float32, np.float16, np.float64)


def _finite_numpy(x: np.ndarray) -> bool:
    # one pass without a temporary: NaN/Inf make the sum non-finite; a float64 sum of finite
    # values overflows only for float64 inputs near 1e308, which the exact check settles
    with np.errstate(invalid="ignore", over="ignore"):
        if math.isfinite(float(np.add.reduce(x, axis=None, dtype=np.float64))):
            return True
        return bool(np.isfinite(x).all())


def _finite_flag(x: torch.Tensor) -> torch.Tensor:
    """A one-element bool tensor on x's device: True when x has no NaN/Inf (aminmax is one
    pass and propagates NaN)."""
    lo, hi = torch.aminmax(x.detach())
    return torch.isfinite(lo) & torch.isfinite(hi)


def _check(x: Array, shape: tuple[int, ...], what: str,
           value_range: tuple[float, float] | None = None) -> torch.Tensor | None:
    """Validate `x` (and, with `value_range`, that its values lie in it); raise InputError. For
    a tensor on an accelerator the NaN/Inf test is left pending: the returned device flag goes
    to `_finish` once the work is queued."""
    if isinstance(x, torch.Tensor):
        dtype_ok = x.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        dtype = str(x.dtype).replace("torch.", "")
    elif isinstance(x, np.ndarray):
        dtype_ok = x.dtype.type in _FLOAT_DTYPES
        dtype = str(x.dtype)
    else:
        raise InputError(f"{what}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if not dtype_ok:
        raise InputError(f"{what}: expected a floating-point array, got dtype {dtype}")
    if x.ndim != 4 or tuple(x.shape[1:]) != shape or x.shape[0] < 1:
        raise InputError(f"{what}: expected shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    lo = hi = None
    if isinstance(x, torch.Tensor) and value_range is None:
        flag = _finite_flag(x)
        if x.device.type != "cpu":
            return flag
        finite = bool(flag)
    elif isinstance(x, torch.Tensor):  # the range needs the extremes on the host: one pass for both
        lo, hi = torch.aminmax(x.detach())
        finite = bool(torch.isfinite(lo) & torch.isfinite(hi))
    else:
        finite = _finite_numpy(x)
    if not finite:
        raise InputError(f"{what}: contains NaN or Inf values")
    if value_range is not None:
        lo, hi = (float(v) for v in ((lo, hi) if lo is not None else (x.min(), x.max())))
        if lo < value_range[0] or hi > value_range[1]:
            raise InputError(f"{what}: values must lie in [{value_range[0]:g}, {value_range[1]:g}], got [{lo:.4g}, {hi:.4g}]")
    return None


def _finish(pending: torch.Tensor | None, what: str) -> None:
    if pending is not None and not bool(pending):
        raise InputError(f"{what}: contains NaN or Inf values")


class Backend(abc.ABC):
    """Base class: validation, batching and array-type round trip live here."""

    name: ClassVar[str]
    native: ClassVar[str] = "numpy"  # the array type `_run` takes: "numpy" or "torch"
    opened_from: Any = None  # the Bundle or checkpoint Path `rpiae.engines.load_backend` opened it from
    options: dict[str, Any] = {}  # the keyword options of its registry entry it was opened with (never mutated)

    def __init__(self, config: RPiAEConfig, precision: str = "fp32", max_batch: int | None = None,
                 graphs: tuple[str, ...] = GRAPHS) -> None:
        self.config = config
        self.precision = precision
        self.max_batch = max_batch
        self.graphs = check_graphs(graphs)
        self._checked: dict[str, tuple[weakref.ref, int]] = {}  # graph -> the last torch input that passed

    def _validated(self, graph: str, x: Array, shape: tuple[int, ...], what: str, run) -> Array:
        """Check x (unless it is the unmodified tensor the last call of `graph` checked), run,
        then settle a check left pending on the device."""
        # inference-mode tensors keep no version counter: they are checked on every call
        version = x._version if isinstance(x, torch.Tensor) and not x.is_inference() else None
        seen = self._checked.get(graph)
        if version is not None and seen is not None and seen[0]() is x and seen[1] == version:
            return run(x)
        pending = _check(x, shape, what)
        out = run(x)
        _finish(pending, what)
        if version is not None:
            self._checked[graph] = (weakref.ref(x), version)
        return out

    @classmethod
    def require(cls) -> None:
        """Raise BackendUnavailable (one line, with what to install) when this runtime is missing;
        called before anything is loaded. Runtimes imported in `__init__` need nothing here."""

    @classmethod
    def check_precision(cls, precision: str) -> None:
        """PrecisionUnsupported (one line) for a precision outside this backend's registry entry;
        the first thing `load_backend` and each constructor do, before anything is read."""
        from rpiae.export.backends import backend_info

        runs = backend_info(cls.name).precisions
        if precision not in runs:
            raise PrecisionUnsupported(f"{cls.name} backend runs {', '.join(runs)}, not {precision}")

    # subclasses implement this on a batch of at most `max_batch`, in their native type
    @abc.abstractmethod
    def _run(self, graph: str, x: Array) -> Array: ...

    def check(self, graph: str, x: Array, value_range: tuple[float, float] | None = None) -> None:
        """Validate one input of `graph` (shape, dtype, NaN/Inf, and its values in `value_range`
        when given) without running it; InputError."""
        shape = self.config.image_shape if graph == "encode" else self.config.latent_shape
        _finish(_check(x, shape, "images" if graph == "encode" else "latents", value_range), graph)

    def _opened(self, graph: str) -> None:
        if graph not in self.graphs:
            raise BackendUnavailable(f"{self.name} backend: opened for the {', '.join(self.graphs)} graph only, not {graph}")

    def encode(self, images: Array) -> Array:
        self._opened("encode")
        return self._validated("encode", images, self.config.image_shape, "images",
                               lambda x: self._batched("encode", x))

    def decode(self, latents: Array) -> Array:
        self._opened("decode")
        return self._validated("decode", latents, self.config.latent_shape, "latents",
                               lambda x: self._batched("decode", x))

    def graph_call(self, graph: str) -> Callable[[Array], Array]:
        """`encode` or `decode`, by graph name."""
        return self.encode if graph == "encode" else self.decode

    def _batched(self, graph: str, x: Array) -> Array:
        is_torch = isinstance(x, torch.Tensor)
        xs = self._to_native(x)
        step = self.max_batch or len(xs)
        outs = [self._run(graph, xs[i : i + step]) for i in range(0, len(xs), step)]
        if self.native == "torch":
            out = (outs[0] if len(outs) == 1 else torch.cat(outs)).float()  # one chunk: no copy
            return out.to(x.device) if is_torch else out.cpu().numpy()
        out = (outs[0] if len(outs) == 1 else np.concatenate(outs)).astype(np.float32, copy=False)
        return torch.from_numpy(out).to(x.device) if is_torch else out

    def _to_native(self, x: Array) -> Array:
        if self.native == "torch":
            return x.float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, np.float32))
        if isinstance(x, torch.Tensor):
            return x.detach().float().cpu().numpy()
        return np.ascontiguousarray(x, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "max_batch": self.max_batch, "graphs": list(self.graphs),
                "options": {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in self.options.items()}}

    def op_profile(self, graph: str, x: Array, runs: int = 2, cuda: bool = False) -> tuple[dict[str, float], str]:
        """Seconds per op over `runs` calls of `graph` on `x` (after one warm call), and the tool
        that measured them. Here: torch.profiler (self time of what runs through torch; with
        `cuda`, device time). A runtime with its own profiler overrides it (and takes an
        `op_profiling` option that turns that profiler on when it is opened)."""
        from torch.profiler import ProfilerActivity, profile

        run = self.graph_call(graph)
        run(x)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(runs):
                run(x)
        totals: dict[str, float] = {}
        for ev in prof.key_averages():
            t = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / 1e6
            if t > 0:
                totals[ev.key] = totals.get(ev.key, 0.0) + t
        return totals, "torch.profiler (self time by op)"

    def polygraphy_runner(self, graph: str) -> Any:
        """A polygraphy runner over this backend's own session or engine of `graph`, for
        `rpiae verify --compare polygraphy`; only runtimes polygraphy can drive override it."""
        raise BackendUnavailable(f"{self.name} backend: polygraphy has no runner for it")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources (sessions, engines, CUDA contexts)."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Array", "Backend", "BackendUnavailable", "InputError", "check_graphs", "PrecisionUnsupported", "cuda_index", "device_scope", "precision_context",
           "strict_fp32", "torch_device"]
