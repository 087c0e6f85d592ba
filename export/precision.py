"""Precision variants of an FP32 graph, each a plain ONNX file (TensorRT 11 takes precision
from the graph: strongly typed networks, no builder flags).

- FP16: NVIDIA ModelOpt AutoCast. FP32 I/O; LayerNormalization and Softmax stay FP32 (ViT
  LayerNorm overflows in FP16), and so do the pos-embed Adds, the last projection of each
  graph (`to_moments`, `decoder_pred`) and the graph-level resize / de-normalisation.
- INT8: ModelOpt's ONNX quantizer, explicit Q/DQ: symmetric (zero-point 0), per-channel
  weights, activations calibrated on real images. Residual Adds and the attention
  MatMuls are not quantised (per-tensor Q/DQ there rounds small tokens to zero and the
  [0, 1] softmax range is too coarse for 257 tokens); LayerNorm/Softmax never are.
  Everything not quantised runs in `high_precision` (fp16 for TensorRT by default).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from rpiae.export.onnx_export import read_metadata, save_onnx, set_metadata
from rpiae.config import RPiAEConfig

PRECISIONS = ("fp32", "fp16", "int8")

FP32_OP_TYPES = ["LayerNormalization", "Softmax"]
# node-name regexes (names are `<module path>/<OpType>_<i>`, see onnx_export.name_nodes)
FP32_NODES = [
    r"^/",  # graph level: 256->224 resize matmuls, latent split, de-normalisation
    r"^.*\.embeddings/Add_",  # encoder pos-embed
    r"^model\.decoder/Add_",  # pixel-decoder pos-embed
    r"^.*\.to_moments/",  # last projection of encode
    r"^.*\.decoder_pred/",  # last projection of decode
]
INT8_EXCLUDED_OP_TYPES = ["Add"]


class QuantizationUnavailable(RuntimeError):
    pass


def _modelopt():
    try:
        import modelopt.onnx.autocast as autocast
        import modelopt.onnx.quantization as quantization
    except ImportError as e:
        raise QuantizationUnavailable(
            f"FP16/INT8 variants need NVIDIA ModelOpt ({e}); install with: pip install -e '.[quant]'"
        ) from None
    return autocast, quantization


@contextlib.contextmanager
def _quiet():
    """ModelOpt logs every pass at INFO to stdout/stderr; keep the CLI's output readable."""
    logging.disable(logging.WARNING)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        logging.disable(logging.NOTSET)


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    """FP16 variant of an FP32 graph written by `export_graph`."""
    autocast, _ = _modelopt()
    meta = read_metadata(src)
    with _quiet():
        model = autocast.convert_to_mixed_precision(
            onnx_path=str(src),
            low_precision_type="fp16",
            op_types_to_exclude=FP32_OP_TYPES,
            nodes_to_exclude=FP32_NODES,
            keep_io_types=True,
        )
    _finish(model, meta, "fp16", dst)
    return Path(dst)


def activation_bytes_per_sample(path: str | Path) -> int:
    """Bytes of every intermediate tensor of one sample: what max-calibration keeps per input
    (ONNX Runtime's calibrator records all intermediate outputs of every calibration batch)."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    total = 0
    for v in model.graph.value_info:
        dims = v.type.tensor_type.shape.dim
        n = 1
        for d in dims:
            n *= d.dim_value if d.HasField("dim_value") else 1  # the symbolic batch axis -> 1
        total += 4 * n
    return total


# Measured: the rpiae-b decode graph peaked near 22 GB calibrating 4 latents, about 3x the
# 1.6 GB/sample its intermediate tensors add up to (the calibrator copies them).
CALIBRATION_OVERHEAD = 3.2


def calibration_limit(path: str | Path, requested: int, memory_fraction: float = 0.6) -> int:
    """How many calibration samples fit in `memory_fraction` of the available RAM (>= 1)."""
    import psutil

    per_sample = max(1, activation_bytes_per_sample(path)) * CALIBRATION_OVERHEAD
    fit = int(psutil.virtual_memory().available * memory_fraction // per_sample)
    return max(1, min(requested, fit))


def to_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, high_precision: str = "fp16") -> Path:
    """INT8 Q/DQ variant of an FP32 graph, calibrated on `calibration` (N, ...) inputs.

    Callers cap N with `calibration_limit` so calibration fits in memory."""
    _, quantization = _modelopt()
    meta = read_metadata(src)
    input_name = meta["rpiae.input"]
    with tempfile.TemporaryDirectory(prefix="rpiae-int8-") as tmp, _quiet():
        out = Path(tmp) / "int8.onnx"
        quantization.quantize(
            onnx_path=str(src),
            quantize_mode="int8",
            calibration_data={input_name: np.ascontiguousarray(calibration, dtype=np.float32)},
            calibration_method="max",
            calibration_eps=["cpu"],
            op_types_to_exclude=INT8_EXCLUDED_OP_TYPES,
            op_types_to_exclude_fp16=FP32_OP_TYPES,
            nodes_to_exclude=None,
            disable_mha_qdq=True,
            high_precision_dtype=high_precision,
            use_zero_point=False,
            output_path=str(out),
            log_level="ERROR",
        )
        model = onnx.load(str(out))
    _finish(model, meta, "int8", dst, {"rpiae.int8_high_precision": high_precision})
    return Path(dst)


def _finish(model: onnx.ModelProto, meta: dict[str, str], precision: str, dst: str | Path, extra: dict | None = None) -> None:
    config = RPiAEConfig.from_json(meta["rpiae.config"])
    del model.metadata_props[:]
    set_metadata(model, config, meta["rpiae.graph"], precision, extra)
    save_onnx(model, dst)


def precision_report(path: str | Path) -> dict:
    """Which compute nodes run in which precision, from the graph itself.

    For Q/DQ graphs a node counts as INT8 when its inputs come from DequantizeLinear;
    otherwise by the element type of its first input.
    """
    model = onnx.load(str(path), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    compute = ("MatMul", "Conv", "Gemm", "LayerNormalization", "Softmax", "Add", "Mul", "Erf", "Div")
    per_op: dict[str, Counter] = {}
    kept_high: list[str] = []
    for n in model.graph.node:
        if n.op_type not in compute:
            continue
        if n.op_type in ("MatMul", "Conv", "Gemm") and any(i in dq_outputs for i in n.input):
            prec = "int8"
        else:
            t = types.get(n.input[0], 0)
            prec = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}.get(t, "other")
        per_op.setdefault(n.op_type, Counter())[prec] += 1
        if n.op_type in ("MatMul", "Conv", "Gemm") and prec != "int8":
            kept_high.append(n.name)
    ops = Counter(n.op_type for n in model.graph.node)
    return {
        "per_op_type": {k: dict(v) for k, v in sorted(per_op.items())},
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
        "matmuls_not_int8": kept_high if ops.get("QuantizeLinear") else [],
    }
