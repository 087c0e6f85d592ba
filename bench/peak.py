"""The machine's limit, measured in the same run as the rows it is compared against.

A large square matmul is the best any dense kernel on this device can do, so "model FLOPs
per image / measured time / matmul peak" says how much of the hardware a backend uses.
Shared machines drift (by ±20 % between runs on this project's machines), so the peak is measured in the run itself —
before and after the rows, and briefly again right before each row.

- CPU fp32: `torch.matmul` on (n, n) float32 with the run's thread count.
- CPU int8: ONNX Runtime `MatMulInteger` (uint8 x int8 -> int32), the kernels ORT's INT8
  graphs use; skipped with the reason where it cannot run.
- CUDA: fp32 (no TF32), bf16, fp16 and int8 (`torch._int_mm`) matmuls on the run's GPU; the
  matrices are released (cache emptied) before returning.

Each is timed by `torch.utils.benchmark.Timer.blocked_autorange` (a fixed, warm kernel).

`dtypes` limits a measurement to the peaks needed (a row re-measures only the one it is
compared against: `peak_dtype`).
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


def cpu_fp32_peak(threads: int, n: int = 2048, min_time: float = 1.0) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    out = torch.empty(n, n)
    res = _measure(lambda: torch.matmul(a, b, out=out), 2.0 * n**3, min_time, threads)
    return {**res, "dtype": "fp32", "kernel": f"torch.matmul {n}x{n}x{n}", "threads": threads}


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

    sess = ort.InferenceSession(_int8_matmul_model(n), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
    a = np.random.default_rng(1).integers(0, 256, (n, n), dtype=np.uint8)
    res = _measure(lambda: sess.run(None, {"a": a}), 2.0 * n**3, min_time, threads)
    return {**res, "dtype": "int8", "kernel": f"onnxruntime MatMulInteger u8xs8 {n}x{n}x{n}", "threads": threads}


CUDA_DTYPES = ("fp32", "bf16", "fp16", "int8")


def cuda_peaks(device: str = "cuda", n: int = 8192, min_time: float = 1.0,
               dtypes: tuple[str, ...] | list[str] | None = None) -> dict[str, dict[str, Any]]:
    import torch

    from rpiae.engines.base import device_scope, strict_fp32, torch_device

    dev = torch_device(device)
    out: dict[str, dict[str, Any]] = {}
    kinds = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}
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
    if dtypes is None or "fp32" in dtypes:
        peaks["fp32"] = cpu_fp32_peak(threads, n=n, min_time=min_time)
    if dtypes is None or "int8" in dtypes:
        try:
            peaks["int8"] = cpu_int8_peak(threads, n=n, min_time=min_time)
        except Exception as e:  # noqa: BLE001
            peaks["int8"] = {"skipped": f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"}
    return peaks


def peak_dtype(device: str, precision: str) -> str:
    """The peak a row of `precision` is compared against (before falling back, see `peak_key`)."""
    if on_cuda(device):
        return {"fp32": "fp32", "fp16": "bf16", "bf16": "bf16", "int8": "int8"}.get(precision, "fp32")
    return "int8" if precision == "int8" else "fp32"


def peak_key(device: str, precision: str, peaks: dict[str, dict[str, Any]]) -> str | None:
    """Which measured peak a row of `precision` is compared against.

    CPU: fp32 rows (and fp16/bf16, which have no faster matmul on these CPUs) against the
    fp32 peak; int8 rows against the int8 peak. CUDA: fp32 against fp32, fp16/bf16 against
    the bf16 tensor-core peak (what the GPU targets are stated against), int8 against the int8 peak.
    """
    want = peak_dtype(device, precision)
    for key in (want, "bf16" if on_cuda(device) else "fp32"):
        if key in peaks and "gflops" in peaks[key]:
            return key
    return None
