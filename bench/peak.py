"""The machine's limit, measured in the same run as the rows it is compared against.

A large square matmul is the best any dense kernel on this device can do, so "model FLOPs
per image / measured time / matmul peak" says how much of the hardware a backend uses.
Shared machines drift (by ±20 % between runs on this project's machines), so the peak is measured in the run itself —
before and after the rows, and briefly again right before each row.

- CPU fp32, bf16, fp16: `torch.matmul` on (n, n) in that dtype with the run's thread count
  (oneDNN: AMX and AVX512-BF16/FP16 where the CPU has them; elsewhere the 16-bit dtypes are
  emulated, ~100x slower than fp32, and timed on a smaller matrix: see `_sized`).
- CPU int8: the higher of `torch._int_mm` (int8 x int8 -> int32, oneDNN: AMX-INT8 / VNNI) and
  ONNX Runtime's `MatMulInteger` (uint8 x int8 -> int32, the kernels ORT's INT8 graphs use); the
  other is kept under `others`, a kernel that cannot run is skipped with the reason.
- CUDA: fp32 (no TF32), bf16, fp16 and int8 (`torch._int_mm`) matmuls on the run's GPU; the
  matrices are released (cache emptied) before returning.

Each is timed by `torch.utils.benchmark.Timer.blocked_autorange` (a fixed, warm kernel).

`dtypes` limits a measurement to the peaks needed (a row re-measures only the one it is
compared against: its own dtype's, `peak_key`).
"""

from __future__ import annotations

from typing import Any


def _measure(fn, flops: float, min_time: float, threads: int | None = None) -> dict[str, float]:
    """GFLOP/s of `fn` (`flops` per call), timed by torch.utils.benchmark's `blocked_autorange`:
    its own warm-up, blocks of calls sized so that the timer's cost (a device synchronisation on a
    GPU) is negligible, for at least `min_time` seconds; the median and the best per-call time."""
    import torch
    from torch.utils.benchmark import Timer

    m = Timer("fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads()).blocked_autorange(
        min_run_time=min_time)
    return {"gflops": flops / m.median / 1e9, "gflops_best": flops / min(m.times) / 1e9, "seconds_median": m.median,
            "iterations": m.number_per_run * len(m.raw_times)}


CPU_DTYPES = ("fp32", "bf16", "fp16", "int8")
PROBE_N = 256  # a first small call says how fast a dtype is; slow (emulated) kernels are then timed small
MAX_CALL_S = 0.25  # the largest matmul timed takes about this long


def _sized(n: int, probe_s: float) -> int:
    """The matmul side to time: `n`, or smaller where one call of it would take over MAX_CALL_S
    (a dtype this CPU emulates runs ~100x slower than fp32; its rate does not depend on size)."""
    probe = min(n, PROBE_N)
    rate = 2.0 * probe**3 / max(probe_s, 1e-9)
    fit = int((MAX_CALL_S * rate / 2.0) ** (1 / 3)) // 64 * 64
    return min(n, max(probe, fit))


def _probe(fn_of_n, n: int) -> float:
    """Seconds of one warm call of the (min(n, PROBE_N))^3 matmul."""
    import time

    fn = fn_of_n(min(n, PROBE_N))
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_torch_peak(dtype: str, threads: int, n: int = 2048, min_time: float = 1.0) -> dict[str, Any]:
    """`torch.matmul` (oneDNN: AMX / AVX512-BF16 / VNNI where the CPU has them) in `dtype`
    (fp32, bf16, fp16: float matmul; int8: `torch._int_mm`, int8 x int8 -> int32)."""
    import torch

    from rpiae.precisions import TORCH_DTYPES

    torch.set_num_threads(threads)

    def make(size: int):
        if dtype == "int8":
            a = torch.randint(-127, 128, (size, size), dtype=torch.int8)
            b = torch.randint(-127, 128, (size, size), dtype=torch.int8)
            return lambda: torch._int_mm(a, b)
        a = torch.randn(size, size, dtype=TORCH_DTYPES[dtype])
        b = torch.randn(size, size, dtype=TORCH_DTYPES[dtype])
        out = torch.empty(size, size, dtype=TORCH_DTYPES[dtype])
        return lambda: torch.matmul(a, b, out=out)

    size = _sized(n, _probe(make, n))
    res = _measure(make(size), 2.0 * size**3, min_time, threads)
    name = "torch._int_mm s8xs8" if dtype == "int8" else f"torch.matmul {dtype}"
    return {**res, "dtype": dtype, "kernel": f"{name} {size}x{size}x{size}", "threads": threads}


def _int8_matmul_model(n: int):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "w")
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
    graph = helper.make_graph(
        [node], "int8_peak", [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])], initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString()


def cpu_int8_peak(threads: int, n: int = 2048, min_time: float = 1.0) -> dict[str, Any]:
    """ONNX Runtime's integer matmul (the kernels its INT8 graphs run on this CPU)."""
    import numpy as np
    import onnxruntime as ort

    from rpiae.engines.ort_backend import session_options

    def make(size: int):
        sess = ort.InferenceSession(_int8_matmul_model(size), sess_options=session_options(threads),
                                    providers=["CPUExecutionProvider"])
        a = np.random.default_rng(1).integers(0, 256, (size, size), dtype=np.uint8)
        return lambda: sess.run(None, {"a": a})

    n = _sized(n, _probe(make, n))
    res = _measure(make(n), 2.0 * n**3, min_time, threads)
    return {**res, "dtype": "int8", "kernel": f"onnxruntime MatMulInteger u8xs8 {n}x{n}x{n}", "threads": threads}


CUDA_DTYPES = ("fp32", "bf16", "fp16", "int8")


def cuda_peaks(device: str = "cuda", n: int = 8192, min_time: float = 1.0,
               dtypes: tuple[str, ...] | list[str] | None = None) -> dict[str, dict[str, Any]]:
    import torch

    from rpiae.engines.base import device_scope, strict_fp32, torch_device

    dev = torch_device(device)
    out: dict[str, dict[str, Any]] = {}
    from rpiae.precisions import TORCH_DTYPES

    kinds = {**TORCH_DTYPES, "int8": torch.int8}
    with device_scope(dev), strict_fp32():
        for key in dtypes or CUDA_DTYPES:
            dtype = kinds[key]
            try:
                if dtype == torch.int8:
                    a = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)
                    b = torch.randint(-127, 128, (n, n), device=dev, dtype=torch.int8)

                    def fn(a=a, b=b):
                        return torch._int_mm(a, b)
                else:
                    a = torch.randn(n, n, device=dev, dtype=dtype)
                    b = torch.randn(n, n, device=dev, dtype=dtype)

                    def fn(a=a, b=b):
                        return a @ b
                out[key] = {**_measure(fn, 2.0 * n**3, min_time), "dtype": key,
                            "kernel": f"torch {key} matmul {n}^3 (torch.utils.benchmark, synchronised)"}
                del a, b
            except Exception as e:  # noqa: BLE001 - a dtype this GPU/torch cannot run is reported, not fatal
                out[key] = {"skipped": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
        a = b = fn = None  # noqa: F841 - drop the last matrices, then give their memory back
        torch.cuda.empty_cache()  # the matrices must not stay cached in the allocator
    return out


def on_cuda(device: str) -> bool:
    """Whether a benchmark device string runs on a GPU (`cuda[:N]`, or `trt[:N]`: ONNX Runtime's
    TensorRT provider on GPU N)."""
    return str(device).split(":")[0] in ("cuda", "trt")


def measure_peaks(device: str, threads: int, min_time: float = 1.0, quick: bool = False,
                  size: int | None = None, dtypes: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """dtype -> peak record; entries that could not run carry `skipped` with the reason.

    `size`: the matmul side (default 8192 on CUDA, 2048 on CPU; `quick` halves it);
    `dtypes`: only these (default: every dtype of the device).
    """
    if on_cuda(device):
        return cuda_peaks(device, n=size or (4096 if quick else 8192), min_time=min_time, dtypes=dtypes)
    n = size or (1024 if quick else 2048)
    peaks: dict[str, dict[str, Any]] = {}
    for key in dtypes or CPU_DTYPES:
        kernels = [lambda: cpu_torch_peak(key, threads, n=n, min_time=min_time)]
        if key == "int8":  # the higher of torch's and ONNX Runtime's integer matmul, the other kept beside it
            kernels.append(lambda: cpu_int8_peak(threads, n=n, min_time=min_time))
        found = []
        for kernel in kernels:
            try:
                found.append(kernel())
            except Exception as e:  # noqa: BLE001 - a kernel this CPU/build cannot run is reported, not fatal
                found.append({"skipped": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"})
        ran = [f for f in found if "gflops" in f]
        if not ran:
            peaks[key] = found[0]
            continue
        best = max(ran, key=lambda f: f["gflops"])
        others = [f for f in found if f is not best]
        peaks[key] = {**best, "others": others} if others else best
    return peaks


def peak_key(device: str, precision: str, peaks: dict[str, dict[str, Any]]) -> str | None:
    """Which measured peak a row of `precision` is compared against: its own dtype's, or the
    fp32 peak where that one could not be measured (the result names the one used)."""
    for key in (precision, "fp32"):
        if key in peaks and "gflops" in peaks[key]:
            return key
    return None
