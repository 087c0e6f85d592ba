"""Which precision each layer of a TensorRT engine runs in, from the engine inspector's JSON,
and the check that refuses a reduced-precision engine that is not. Pure: needs neither
TensorRT nor a GPU."""

from __future__ import annotations

import json
import re
import os
from typing import Any

# an fp16/int8 engine in which more than this share of the float compute layers runs in fp32
# is refused: the known silent failure of a "reduced precision" engine that is not
# (RPIAE_TRT_MAX_FP32_SHARE overrides it, e.g. 1.0 to keep an engine the check refuses)
MAX_FP32_SHARE = float(os.environ.get("RPIAE_TRT_MAX_FP32_SHARE", "0.5"))


class EnginePrecisionError(RuntimeError):
    """A reduced-precision engine whose layers run mostly in FP32."""


# TensorRT 10 writes each tensor's "Format/Datatype" ("Row major linear FP16 format",
# "Half", "Thirty-two wide channel vectorized row major Int8 format."); TensorRT 11 splits it
# into "Datatype" and "Format". Order matters: UINT8 before INT8, BFLOAT16 before FLOAT.
_DTYPE_TOKENS = (
    ("UINT8", None), ("INT64", None), ("INT32", None), ("INT16", None), ("INT4", "int4"), ("BOOL", None),
    ("INT8", "int8"), ("FP8", "fp8"), ("FLOAT8", "fp8"), ("E4M3", "fp8"), ("FP4", "fp4"), ("FLOAT4", "fp4"),
    ("BFLOAT16", "bf16"), ("BF16", "bf16"), ("HALF", "fp16"), ("FP16", "fp16"), ("FLOAT", "fp32"), ("FP32", "fp32"),
)
# layers that move or reinterpret data rather than compute: not counted
_DATA_MOVEMENT = {
    "reformat", "shuffle", "constant", "noop", "shape", "slice", "concatenation", "identity", "cast",
    "padding", "gather", "squeeze", "unsqueeze", "scatter", "fill", "assertion", "copy",
}
_LOW = {"fp16", "bf16", "int8", "fp8", "int4", "fp4"}


def tensor_dtype(desc: dict[str, Any]) -> str | None:
    """Float precision of one inspector tensor description: fp32/fp16/bf16/int8/fp8/..., or None
    for integer/bool tensors and descriptions without a type."""
    # any key naming the data type ("Format/Datatype", "Datatype", "DataType", "Data Type"): the
    # inspector's schema changed between TensorRT 10 and 11 and its spelling is not an API
    text = " ".join(str(v) for k, v in desc.items()
                    if "datatype" in re.sub(r"[^a-z]", "", str(k).lower())).upper()
    for token, dtype in _DTYPE_TOKENS:
        if token in text:
            return dtype
    return None


def _layers(info: str | dict | list) -> list:
    if isinstance(info, str):
        info = json.loads(info)
    if isinstance(info, dict):
        if "Layers" not in info:
            return [info]  # one layer's information
        info = info["Layers"]
    return [json.loads(x) if isinstance(x, str) and x.lstrip().startswith("{") else x for x in info]


def layer_precision(layer: dict[str, Any]) -> str | None:
    """The lowest float precision among a layer's tensors (an fp16 GEMM with fp32 accumulation
    output counts as fp16; a Q/DQ boundary as int8); None for layers without float tensors."""
    found = {tensor_dtype(t) for key in ("Inputs", "Outputs") for t in (layer.get(key) or []) if isinstance(t, dict)}
    found.discard(None)
    for p in ("int4", "fp4", "int8", "fp8", "fp16", "bf16", "fp32"):
        if p in found:
            return p
    return None


def layer_precision_summary(info: str | dict | list, keep_names: int = 40) -> dict[str, Any]:
    """Per-precision counts of an engine's compute layers from the inspector's JSON
    (`get_engine_information(LayerInformationFormat.JSON)`, or a list of per-layer JSON).

    Returns {"layers", "counted", "by_precision", "fp32_share", "low_precision_share",
    "fp32_layers" (first `keep_names`), "by_layer_type"}.
    """
    layers = _layers(info)
    if layers and all(isinstance(x, str) for x in layers):
        raise EnginePrecisionError(
            "the engine inspector returned layer names only: build with ProfilingVerbosity.DETAILED to see precisions"
        )
    by_precision: dict[str, int] = {}
    by_type: dict[str, dict[str, int]] = {}
    fp32_layers: list[str] = []
    counted = 0
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        ltype = str(layer.get("LayerType", "unknown"))
        name = str(layer.get("Name", ""))
        if ltype.lower() in _DATA_MOVEMENT or name.startswith("Reformatting CopyNode"):
            continue
        p = layer_precision(layer)
        if p is None:
            continue
        counted += 1
        by_precision[p] = by_precision.get(p, 0) + 1
        by_type.setdefault(ltype, {}).setdefault(p, 0)
        by_type[ltype][p] += 1
        if p == "fp32" and len(fp32_layers) < keep_names:
            fp32_layers.append(name)
    fp32 = by_precision.get("fp32", 0)
    return {
        "layers": len(layers),
        "counted": counted,
        "by_precision": dict(sorted(by_precision.items())),
        "fp32_share": round(fp32 / counted, 4) if counted else 0.0,
        "low_precision_share": round(sum(v for k, v in by_precision.items() if k in _LOW) / counted, 4) if counted else 0.0,
        "fp32_layers": fp32_layers,
        "by_layer_type": by_type,
    }


def check_layer_precisions(summary: dict[str, Any], precision: str, what: str = "engine",
                           max_fp32_share: float = MAX_FP32_SHARE) -> None:
    """Fail an fp16/bf16/int8 engine that runs mostly in fp32, or an int8 engine without int8 layers."""
    if precision == "fp32":
        return
    if summary["counted"] == 0:
        raise EnginePrecisionError(f"{what}: the engine inspector showed no typed compute layers; cannot check its precision")
    if precision == "int8" and not summary["by_precision"].get("int8"):
        raise EnginePrecisionError(
            f"{what}: an int8 engine without a single int8 layer ({summary['by_precision']}); the ONNX graph's Q/DQ nodes "
            "were not used (check the graph has explicit QuantizeLinear/DequantizeLinear with zero-point 0)"
        )
    if summary["fp32_share"] > max_fp32_share:
        raise EnginePrecisionError(
            f"{what}: {precision} engine runs {summary['fp32_share']:.0%} of its compute layers in fp32 "
            f"(limit {max_fp32_share:.0%}; {summary['by_precision']}; e.g. {', '.join(summary['fp32_layers'][:5])}); "
            "the graph's reduced-precision types did not survive the build"
        )
