"""TensorRT at run time: an engine deserialized on one GPU (`EngineRunner`), and the check that
an engine was built for this TensorRT version and compute capability (else a one-line error
saying how to rebuild it). Building engines is `rpiae.export.tensorrt`'s, which also holds
the lazy access to TensorRT and the GPU used here."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from rpiae.devices import BackendUnavailable
from rpiae.export.profile import BatchProfile
from rpiae.export.tensorrt import (  # noqa: F401 - the runtime's names for them (TRTBackend, tests)
    TRT_MISSING, current_environment, import_tensorrt, require_cuda, tensorrt_available, trt_logger, trt_major,
)

# TensorRT's version-compatible engines also run on these newer major versions (Support Matrix,
# "Engine Portability"); within a major version, on the same or a later release
VERSION_COMPATIBLE_MAJORS = {8: (8, 10), 10: (10, 11), 11: (11,)}


class EngineMismatch(BackendUnavailable):
    """An engine built for another TensorRT version or GPU compute capability."""


def rebuild_command(bundle_root: str | Path, entry: dict[str, Any]) -> str:
    profile = entry.get("profile") or {}
    known = {"min", "opt", "max"} <= set(profile)
    batch = BatchProfile(profile["min"], profile["opt"], profile["max"]) if known else BatchProfile()
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
        with torch.cuda.device(self.device):  # the context's activation memory is allocated on the current GPU
            context = engine.create_execution_context()
            self._done = torch.cuda.Event()  # recorded after each enqueue, on that enqueue's stream
        if context is None:
            raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")
        self._context = context
        self._lock = threading.Lock()
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
    "EngineMismatch", "EngineRunner", "VERSION_COMPATIBLE_MAJORS", "check_engine_compat", "current_environment",
    "import_tensorrt", "rebuild_command", "require_cuda", "runtime_runs", "tensorrt_available",
]
