"""The numeric precisions, declared once: what each one is and what every layer needs to know
about it.

    fp32  32-bit float       the exported graph itself; the reference
    fp16  16-bit float       ONNX graph cast by AutoCast (LayerNorm/Softmax kept fp32); torch autocast
    bf16  bfloat16           torch autocast (CPU and CUDA); OpenVINO's bf16 inference hint
    int8  8-bit integer      ONNX Q/DQ graph calibrated on real images (unquantised layers in fp16 or fp32)

A backend, the export, the parity checks, the benchmark's peaks and the latent shards read
these records; adding a precision is one entry here plus, if it has an ONNX graph, its pass in
`rpiae.export.precision`. TensorRT builds the ONNX graph strongly typed (the precision lives in
the graph); only ONNX Runtime's TensorRT provider still takes enable flags (`trt_flags`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    bits: int
    dtype: torch.dtype | None  # torch dtype of its autocast and of stored tensors; None: integer (Q/DQ graphs only)
    onnx_pass: str | None  # "module:function" writing its ONNX graph from the FP32 one ("" = the export itself; None = no graph)
    quantized: bool = False  # Q/DQ graph: needs calibration images, keeps some layers in a higher precision
    trt_flags: tuple[str, ...] = ()  # ONNX Runtime TensorRT provider `trt_<flag>_enable` options it needs
    # CPU flags (/proc/cpuinfo names) of which one gives it native matmul kernels; () = every x86-64 CPU.
    # Elsewhere it still runs (converted to fp32 per op), at a small fraction of fp32's speed.
    cpu_flags: tuple[str, ...] = ()
    # parity bounds against eager PyTorch FP32 on the same weights (rpiae.verify.parity)
    tolerances: dict[str, float] = field(default_factory=dict, hash=False)

    @property
    def onnx(self) -> bool:
        """`rpiae export` writes an ONNX graph of it."""
        return self.onnx_pass is not None


REGISTRY: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 32, torch.float32, "", tolerances={
        "latent_max_abs_rel": 1e-4, "latent_cosine_min": 0.99999, "decoded_psnr_db": 60.0}),
    Precision("fp16", 16, torch.float16, "rpiae.export.precision:to_fp16", trt_flags=("fp16",),
              cpu_flags=("avx512_fp16", "amx_fp16"),
              tolerances={"decoded_psnr_db": 40.0}),
    Precision("bf16", 16, torch.bfloat16, None, cpu_flags=("avx512_bf16", "amx_bf16"),
              tolerances={"decoded_psnr_db": 30.0}),
    Precision("int8", 8, None, "rpiae.export.precision:to_int8", quantized=True, trt_flags=("int8",),
              tolerances={"recon_psnr_drop_db": 1.0}),
)}

PRECISIONS = tuple(REGISTRY)  # what a backend can be asked to run, in the order they are listed everywhere
ONNX_PRECISIONS = tuple(n for n, p in REGISTRY.items() if p.onnx)  # what `rpiae export` writes as ONNX graphs
TORCH_PRECISIONS = tuple(n for n, p in REGISTRY.items() if p.dtype is not None)  # what PyTorch runs, by autocast
TORCH_DTYPES = {n: REGISTRY[n].dtype for n in TORCH_PRECISIONS}
TOLERANCES = {n: p.tolerances for n, p in REGISTRY.items()}

# a quantised graph's unquantised layers: in fp16 (TensorRT's INT8+FP16 build) unless asked for fp32
INT8_HIGH_PRECISIONS = ("fp16", "fp32")
INT8_HIGH_PRECISION = "fp16"

# bits of a quantised graph's weights: 8 (|q| <= 127), or 7 (|q| <= 63) for x86 CPUs without VNNI
INT8_WEIGHT_BITS = (8, 7)
INT8_WEIGHT_BITS_DEFAULT = 8
# x86 int8 matmul kernels multiply u8 activations by s8 weights. With one of these flags they
# accumulate in 32 bits; without (AVX2, AVX-512 before VNNI) they add each pair of products into a
# 16-bit integer with saturation (VPMADDUBSW), which weights of 7 bits can never overflow.
INT8_WIDE_PAIR_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")

# which precision a server or job picks when none is named, best first, by where it runs
DEFAULT_ORDER = {"cpu": ("fp32", "int8", "fp16", "bf16"), "gpu": ("fp16", "int8", "bf16", "fp32")}


def precision_info(name: str) -> Precision:
    """The record of a precision; ValueError naming the choices for anything else."""
    if name not in REGISTRY:
        raise ValueError(f"unknown precision {name!r}; choose one of: {', '.join(PRECISIONS)}")
    return REGISTRY[name]


def int8_pairs_saturate(flags: set[str] | frozenset[str]) -> bool:
    """Whether the int8 kernels of ONNX Runtime and OpenVINO on a CPU with these feature flags
    can saturate: an x86 CPU with SSE4.1/AVX2 but none of `INT8_WIDE_PAIR_FLAGS`. There a graph
    whose weights use 8 bits computes something other than its own Q/DQ arithmetic."""
    return bool({"sse4_1", "avx2"} & set(flags)) and not any(f in flags for f in INT8_WIDE_PAIR_FLAGS)


def cpu_native(precision: str, flags: set[str] | frozenset[str]) -> bool:
    """Whether a CPU with these feature flags has native matmul kernels for `precision`."""
    need = precision_info(precision).cpu_flags
    return not need or any(f in flags for f in need)


def trt_flags(precision: str, high_precision: str | None = None) -> tuple[str, ...]:
    """ONNX Runtime TensorRT provider flags for a graph of `precision` (a quantised graph also
    needs those of the precision its unquantised layers run in)."""
    p = precision_info(precision)
    if p.quantized:
        return p.trt_flags + precision_info(high_precision or INT8_HIGH_PRECISION).trt_flags
    return p.trt_flags


__all__ = ["DEFAULT_ORDER", "cpu_native", "INT8_HIGH_PRECISION", "INT8_HIGH_PRECISIONS", "ONNX_PRECISIONS", "PRECISIONS", "Precision",
           "REGISTRY", "TOLERANCES", "TORCH_DTYPES", "TORCH_PRECISIONS", "precision_info", "trt_flags"]
