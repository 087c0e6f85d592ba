"""Graph checks that every exported ONNX file must pass (run at export, and in tests).

Each returns a list of human-readable problems; an empty list means the graph is fit for
TensorRT and ONNX Runtime:
- opset >= 17 (native LayerNormalization);
- only the batch axis is symbolic, on every input and output;
- no antialiased Resize (does not export faithfully); no dynamic-quantisation ops
  (`DynamicQuantizeLinear` and friends: TensorRT rejects them);
- Q/DQ zero-points all 0 (symmetric; TensorRT rejects non-zero) and signed int8: a
  QuantizeLinear needs an explicit int8 zero-point (without one ONNX quantises to uint8,
  which TensorRT's explicit quantisation does not take), and no uint8 tensor is dequantised;
  int8 weights, in the graph or its external data, lie in [-127, 127] (TensorRT's weight range);
- FP16/INT8: graph inputs and outputs stay float32; LayerNormalization and Softmax compute
  in float32;
- the model config travels in the metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from rpiae.precisions import REGISTRY

MIN_OPSET = 17
DYNAMIC_QUANT_OPS = {"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger"}
FP32_ONLY_OPS = ("LayerNormalization", "Softmax")


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _io_problems(model: onnx.ModelProto) -> list[str]:
    """Graph inputs and outputs: float32, a symbolic batch axis and fixed other axes."""
    problems = []
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            problems.append(f"{value.name}: batch axis is not symbolic")
        fixed = [d for d in dims[1:] if not d.HasField("dim_value")]
        if fixed:
            problems.append(f"{value.name}: a non-batch axis is symbolic")
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"{value.name}: graph I/O is not float32")
    return problems


def _array(t: onnx.TensorProto, base_dir: str | None) -> np.ndarray | None:
    """A tensor's values; one kept in external data is read from its file beside the graph
    (that tensor's bytes only), or None when the graph came without its directory."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    return None if base_dir is None else numpy_helper.to_array(t, base_dir)


def _zero_point_problems(node: onnx.NodeProto, zp: onnx.TensorProto | None, base_dir: str | None) -> list[str]:
    """A Q/DQ node's zero-point must be a constant INT8 zero (TensorRT's signed int8)."""
    if zp is None:
        return [f"{node.name}: zero-point is not a constant"]
    arr = _array(zp, base_dir)
    if arr is None:
        return []  # its values are in a file this in-memory graph came without: checked where it is saved
    problems = []
    if zp.data_type != onnx.TensorProto.INT8:
        problems.append(f"{node.name}: zero-point of type {onnx.TensorProto.DataType.Name(zp.data_type)}, "
                        "not INT8 (TensorRT's explicit quantisation is signed int8)")
    if np.any(arr.astype(np.int64) != 0):
        problems.append(f"{node.name}: non-zero zero-point")
    return problems


def _node_problems(model: onnx.ModelProto, base_dir: str | None = None) -> list[str]:
    """Ops TensorRT or the runtimes refuse or compute differently: antialiased Resize, dynamic
    quantisation, Q/DQ that is not signed int8 with a zero zero-point, int8 weights of -128.
    Constants kept in external data are read from `base_dir` (the graph's directory)."""
    problems: list[str] = []
    inits = {t.name: t for t in model.graph.initializer}
    consts = {n.output[0]: _attr(n, "value") for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type == "Resize" and _attr(node, "antialias", 0):
            problems.append(f"{node.name}: antialiased Resize")
        if node.op_type in DYNAMIC_QUANT_OPS:
            problems.append(f"{node.name}: dynamic-quantisation op {node.op_type}")
        has_zp = node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and bool(node.input[2])
        if node.op_type == "QuantizeLinear" and not has_zp:
            problems.append(f"{node.name}: QuantizeLinear without a zero-point quantises to uint8 "
                            "(TensorRT takes signed int8: give it an int8 zero-point of 0)")
        if has_zp:
            zp = inits.get(node.input[2])
            problems += _zero_point_problems(node, zp if zp is not None else consts.get(node.input[2]), base_dir)
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].data_type == onnx.TensorProto.UINT8:
            problems.append(f"{node.name}: dequantises a UINT8 tensor (TensorRT takes signed int8)")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = inits[node.input[0]]
            arr = _array(w, base_dir) if w.data_type == onnx.TensorProto.INT8 else None
            if arr is not None and int(arr.min(initial=0)) < -127:
                problems.append(f"{node.name}: int8 weight -128 (TensorRT takes weights in [-127, 127])")
    return problems


def _precision_problems(model: onnx.ModelProto, precision: str) -> list[str]:
    """fp16/int8 graphs keep FP32_ONLY_OPS in float32; an int8 graph has QuantizeLinear nodes."""
    problems = []
    info = REGISTRY.get(precision)
    if info is not None and info.bits < 32:
        inferred = onnx.shape_inference.infer_shapes(model)
        types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        for node in model.graph.node:
            if node.op_type in FP32_ONLY_OPS and types.get(node.input[0]) != onnx.TensorProto.FLOAT:
                problems.append(f"{node.name}: {node.op_type} does not compute in float32")
    if info is not None and info.quantized and not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        problems.append(f"{precision} graph has no QuantizeLinear nodes")
    return problems


def check_graph(path: str | Path | onnx.ModelProto, precision: str | None = None) -> list[str]:
    in_memory = isinstance(path, onnx.ModelProto)
    model = path if in_memory else onnx.load(str(path), load_external_data=False)
    base_dir = None if in_memory else str(Path(str(path)).parent)
    meta = {p.key: p.value for p in model.metadata_props}
    precision = precision or meta.get("rpiae.precision", "fp32")
    problems: list[str] = []
    if _opset(model) < MIN_OPSET:
        problems.append(f"opset {_opset(model)} < {MIN_OPSET}")
    if "rpiae.config" not in meta:
        problems.append("no rpiae.config in the model metadata")
    return problems + _io_problems(model) + _node_problems(model, base_dir) + _precision_problems(model, precision)


class GraphCheckError(ValueError):
    pass


def assert_graph_ok(path: str | Path, precision: str | None = None) -> None:
    problems = check_graph(path, precision)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        raise GraphCheckError(f"{Path(str(path)).name} fails the graph checks: {shown}")


# fp16 graphs keep these operator types in fp32 where the export's rule says so
_ISLAND_TYPES = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt", "Erf", "Add", "MatMul", "Gemm", "Conv")


def fp32_islands(path: str | Path) -> dict[str, list[str]]:
    """The fp32 compute nodes of a graph that also computes in fp16 (an fp16 graph, or an int8
    graph whose unquantised layers are fp16), by operator type: `by_type` lists the types whose
    every node is fp32 (they can be kept away from TensorRT's fp16 by type), `mixed` the types
    with fp32 and fp16 nodes. Empty for an all-fp32 graph. Reads the graph without its weights."""
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*g.input, *g.output, *g.value_info]}
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:  # Cast and DequantizeLinear say their output types themselves
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            types.update({o: to for o in node.output})
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    per_type: dict[str, set[int]] = {}
    for node in g.node:
        if node.op_type not in _ISLAND_TYPES:
            continue
        dtypes = {types.get(name) for name in node.input if name} - {None}
        if dtypes:
            per_type.setdefault(node.op_type, set()).update(dtypes & {f32, f16})
    if not any(f16 in d for d in per_type.values()):
        return {"by_type": [], "mixed": []}
    return {"by_type": sorted(t for t, d in per_type.items() if d == {f32}),
            "mixed": sorted(t for t, d in per_type.items() if d == {f32, f16})}
