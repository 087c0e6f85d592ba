"""Precision variants of an FP32 graph, each a plain ONNX file (TensorRT 11 takes precision
from the graph: strongly typed networks, no builder flags).

- FP16: NVIDIA ModelOpt AutoCast. FP32 I/O; LayerNormalization and Softmax stay FP32 (ViT
  LayerNorm overflows in FP16), and so do the pos-embed Adds, the last projection of each
  graph (`to_moments`, `decoder_pred`) and the graph-level resize / de-normalisation.
- INT8: ModelOpt's ONNX quantizer, explicit Q/DQ: symmetric (zero-point 0), per-channel
  weights stored as int8 (DQ only, a quarter of the FP32 bytes), activations calibrated on
  real images (the KL-divergence optimum of each activation's histogram, `method="entropy"`, by
  default; or its max). Residual Adds and the attention MatMuls are not quantised (per-tensor Q/DQ
  there rounds small tokens to zero and the [0, 1] softmax range is too coarse for 257
  tokens); LayerNorm/Softmax never are, nor the graph-level 256->224 resize (it would
  quantise the input pixels), nor, by default, the first and last projection of each part
  (`keep`, `INT8_KEEP_PARTS["io-projections"]`: half of INT8's reconstruction loss on real photos
  for under 1 % of the matmul work). Everything not quantised runs in `high_precision` (fp16 for
  TensorRT by default). Every quantised activation gets one Q/DQ pair per consumer
  (`dedicated_qdq_pairs`), so that each MatMul is its own QDQ unit for the runtime.
  `weight_bits=7` requantises the weights from the FP32 graph to |q| <= 63 (`narrow_weights`):
  on x86 CPUs without VNNI the int8 kernels of ONNX Runtime and OpenVINO add pairs of u8 x s8
  products in 16 bits with saturation, which 8-bit weights overflow and 7-bit weights cannot.
  With 8-bit weights, a weight ModelOpt stored with a -128 is requantised the same way to
  |q| <= 127 (TensorRT's int8 weight range): ModelOpt rounds each channel's fp16 scale to
  nearest, and in fp16's subnormal range (a channel of small weights, |w| < ~1e-3, as trained
  models have) that can be percents below max|w| / 127, so its largest weight lands past -127.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from rpiae.config import RPiAEConfig
from rpiae.export.onnx_export import read_metadata, save_onnx, set_metadata
from rpiae.precisions import INT8_HIGH_PRECISION, INT8_WEIGHT_BITS, INT8_WEIGHT_BITS_DEFAULT

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
INT8_EXCLUDED_NODES = [r"^/"]  # graph level: the resize matmuls would quantise the input pixels
# parts of the model an INT8 graph can leave unquantised (`keep`; they then run in the graph's
# high precision, or in the runtime's hint: OpenVINO's `int8_rest`), by their module paths
INT8_KEEP_PARTS = {
    # the projection into and out of each part: patch embedding, to_moments, the bridge decoder's
    # in_proj, the pixel decoder's embed and its last projection (under 1 % of the matmul work)
    "io-projections": r"^.*\.(patch_embeddings\.|to_moments/|in_proj/|decoder_embed/|decoder_pred/)",
    "encoder": r"^model\.encoder\.",  # the representation encoder (DINOv2 / SigLIP2)
    "bridge-encoder": r"^model\.vb_feature_encoder\.",  # its features -> latent
    "bridge-decoder": r"^model\.vb_feature_decoder\.",  # latent -> features
    "pixel-decoder": r"^model\.decoder\.",  # features -> pixels
}
# activation calibration: max |x| over the calibration set, or the range that minimises the KL
# divergence of each activation's histogram (ONNX Runtime's entropy calibrator; more memory)
INT8_CALIBRATIONS = ("max", "entropy")
# the defaults: on real photos, entropy with the io-projections kept loses half of what max with
# everything quantised does (-0.08 vs -0.16 dB PSNR), at the same speed
INT8_CALIBRATION_DEFAULT = "entropy"
INT8_KEEP_DEFAULT = ("io-projections",)


def parse_int8_keep(text: str) -> list[str]:
    """`--int8-keep` text (comma-separated parts, or none) as the list of parts; ValueError
    naming the choices for an unknown one."""
    parts = [p.strip() for p in text.split(",") if p.strip() and p.strip() != "none"]
    int8_keep_nodes(parts)
    return parts


def int8_keep_nodes(parts: tuple[str, ...] | list[str]) -> list[str]:
    """The node-name regexes of `parts` (names of `INT8_KEEP_PARTS`); ValueError naming the choices."""
    bad = [p for p in parts if p not in INT8_KEEP_PARTS]
    if bad:
        raise ValueError(f"unknown INT8 keep part {', '.join(bad)}; choose from: {', '.join(INT8_KEEP_PARTS)}")
    return [INT8_KEEP_PARTS[p] for p in parts]


class QuantizationUnavailable(RuntimeError):
    pass


class QuantizationError(RuntimeError):
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


# NVIDIA ModelOpt's INT8 pass holds about ten copies of the graph at once, whatever the size
# of the calibration set (it calibrates one sample at a time). Measured peak RSS (ModelOpt 0.47,
# ONNX Runtime 1.32): rpiae-b decode (1.83 GB graph) 18.4 GB with 1, 4 or 16 latents alike, and
# with fp32 or fp16 around the int8 layers; rpiae-b encode (0.36 GB) 3.95 GB. It runs in a child
# process, so that this peak is returned to the system when it ends and does not add to the
# exporting process's own memory.
INT8_MEMORY_PER_GRAPH_BYTE = 10.0
INT8_MEMORY_BASE = 600 << 20  # interpreter, onnxruntime and modelopt themselves


def onnx_bytes(path: str | Path) -> int:
    """Size of an ONNX graph on disk, with its external-data file."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def int8_memory_needed(graph_bytes: int) -> int:
    """Bytes of free RAM the INT8 pass of an FP32 graph of `graph_bytes` needs (measured, see above)."""
    return int(INT8_MEMORY_BASE + INT8_MEMORY_PER_GRAPH_BYTE * graph_bytes)


def check_int8_memory(graph_bytes: int, name: str) -> None:
    """Refuse, before minutes of work and an OOM kill, an INT8 pass that cannot fit in RAM.
    RPIAE_INT8_MEMORY_CHECK=0 skips the check (swap, or a smaller measured need)."""
    import os

    import psutil

    if os.environ.get("RPIAE_INT8_MEMORY_CHECK", "1") == "0":
        return
    need, free = int8_memory_needed(graph_bytes), psutil.virtual_memory().available
    if free < need:
        raise QuantizationError(
            f"INT8 quantisation of {name} needs about {need / 1e9:.1f} GB of free memory "
            f"(ModelOpt holds ~{INT8_MEMORY_PER_GRAPH_BYTE:g} copies of the {graph_bytes / 1e9:.2f} GB graph), "
            f"{free / 1e9:.1f} GB are available: free memory or export int8 on a larger machine "
            "(RPIAE_INT8_MEMORY_CHECK=0 skips this check)"
        )


def to_int8(src: str | Path, dst: str | Path, calibration: np.ndarray, high_precision: str = INT8_HIGH_PRECISION,
            weight_bits: int = INT8_WEIGHT_BITS_DEFAULT, method: str = INT8_CALIBRATION_DEFAULT,
            keep: tuple[str, ...] | list[str] = INT8_KEEP_DEFAULT) -> Path:
    """INT8 Q/DQ variant of an FP32 graph, calibrated on `calibration` (N, ...) inputs with
    `method` (`INT8_CALIBRATIONS`), leaving the model parts `keep` (`INT8_KEEP_PARTS`)
    unquantised.

    ModelOpt runs in a child process (see INT8_MEMORY_PER_GRAPH_BYTE); the result then gets
    one Q/DQ pair per consumer (`dedicated_qdq_pairs`) and, for `weight_bits` 7, weights
    requantised to |q| <= 63 (`narrow_weights`)."""
    from rpiae.isolation import ChildProcessDied, run_in_child

    if weight_bits not in INT8_WEIGHT_BITS:
        raise ValueError(f"int8 weight bits must be one of {', '.join(map(str, INT8_WEIGHT_BITS))}, not {weight_bits}")
    if method not in INT8_CALIBRATIONS:
        raise ValueError(f"int8 calibration must be one of {', '.join(INT8_CALIBRATIONS)}, not {method!r}")
    excluded = INT8_EXCLUDED_NODES + int8_keep_nodes(keep)
    _modelopt()  # a missing ModelOpt is a one-line error here, not in the child
    graph_bytes = onnx_bytes(src)
    check_int8_memory(graph_bytes, Path(src).name)
    meta = read_metadata(src)
    calibration = {meta["rpiae.input"]: np.ascontiguousarray(calibration, dtype=np.float32)}
    with tempfile.TemporaryDirectory(prefix="rpiae-int8-") as tmp:
        out = Path(tmp) / "int8.onnx"
        try:
            run_in_child(_modelopt_int8, str(src), str(out), calibration, high_precision, method, excluded,
                         what=f"the INT8 pass of {Path(src).name}")
        except ChildProcessDied as e:
            raise QuantizationError(f"{e}; it needs about {int8_memory_needed(graph_bytes) / 1e9:.1f} GB") from None
        model = onnx.load(str(out))
    dedicated_qdq_pairs(model)
    if weight_bits != 8:
        narrow_weights(model, src, weight_bits)
    else:  # only the weights ModelOpt took past TensorRT's [-127, 127]
        narrow_weights(model, src, 8, only=lambda q: bool((q == -128).any()))
    _finish(model, meta, "int8", dst, {"rpiae.int8_high_precision": high_precision,
                                       "rpiae.int8_weight_bits": str(weight_bits), "rpiae.int8_calibration": method,
                                       "rpiae.int8_keep": ",".join(keep)})
    return Path(dst)


def _modelopt_int8(src: str, out: str, calibration: dict[str, np.ndarray], high_precision: str, method: str,
                   excluded: list[str]) -> None:
    """ModelOpt's INT8 quantizer (runs in the child process)."""
    _, quantization = _modelopt()
    with _quiet():
        quantization.quantize(
            onnx_path=src,
            quantize_mode="int8",
            calibration_data=calibration,
            calibration_method=method,
            calibration_eps=["cpu"],
            op_types_to_exclude=INT8_EXCLUDED_OP_TYPES,
            op_types_to_exclude_fp16=FP32_OP_TYPES,
            nodes_to_exclude=excluded,
            disable_mha_qdq=True,
            dq_only=True,
            high_precision_dtype=high_precision,
            use_zero_point=False,
            output_path=out,
            log_level="ERROR",
        )


def dedicated_qdq_pairs(model: onnx.ModelProto) -> int:
    """Give every consumer of a quantised activation its own QuantizeLinear -> DequantizeLinear
    pair, with its own copies of the scale and zero-point (in place, with onnx-graphsurgeon);
    returns how many pairs were added.

    ModelOpt shares one Q/DQ between the consumers of a tensor (q, k and v projections of
    one LayerNorm output). ONNX Runtime's CPU fusion into an int8 MatMul needs a Q -> DQ
    pair per MatMul, and its common-subexpression pass merges pairs that read the same
    scale initializer, hence the copies. The arithmetic is unchanged (ONNX Runtime's
    quantizer does the same with its `DedicatedQDQPair` option).
    """
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    names = set(graph.tensors()) | {n.name for n in graph.nodes}  # copies get names of their own
    added = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        dqs = list(q.outputs[0].outputs)
        if not dqs or any(n.op != "DequantizeLinear" or n.outputs[0] in graph.outputs for n in dqs):
            continue
        # (dq, consumer, input slot) of every use of the dequantised tensor; the first keeps the pair
        users = [(dq, {id(u): u for u in dq.outputs[0].outputs}.values()) for dq in dqs]  # each consumer once
        uses = [(dq, user, i) for dq, consumers in users for user in consumers
                for i, t in enumerate(user.inputs) if t is dq.outputs[0]]
        for k, (dq, user, i) in enumerate(uses[1:], start=1):
            user.inputs[i] = _qdq_copy(gs, graph, q, dq, k, names)
            added += 1
    if added:
        graph.cleanup().toposort()  # drops the DQs whose every use now has its own pair
        model.CopyFrom(gs.export_onnx(graph, ir_version=model.ir_version, opset_imports=list(model.opset_import)))
    return added


def narrow_weights(model: onnx.ModelProto, fp32: str | Path, bits: int,
                   only: Callable[[np.ndarray], bool] | None = None) -> int:
    """Requantise the int8 weights of a Q/DQ graph to `bits` (symmetric, per channel as stored:
    scale = max|w| / (2**(bits-1) - 1) along the DequantizeLinear's axis, rounded up to the
    scale's dtype so that no weight lands past +-(2**(bits-1) - 1)), from the FP32 graph `fp32`
    the quantiser started from (its weights keep their names there), in place; returns how many
    weights were requantised. `only(q)`, given a stored int8 weight, picks the weights to redo
    (default: all). Scales keep their dtype; only the weights redone are read from `fp32` (its
    external data one tensor at a time)."""
    from onnx import numpy_helper

    qmax = 2 ** (bits - 1) - 1
    inits = {t.name: t for t in model.graph.initializer}
    source = {t.name: t for t in onnx.load(str(fp32), load_external_data=False).graph.initializer}
    done = 0
    for node in model.graph.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.data_type != onnx.TensorProto.INT8 or node.input[0] not in source:
            continue
        if only is not None and not only(numpy_helper.to_array(q)):
            continue
        w = numpy_helper.to_array(source[node.input[0]], base_dir=str(Path(fp32).parent)).astype(np.float32)
        old = numpy_helper.to_array(inits[node.input[1]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w.ndim
        if old.ndim == 0:  # per tensor
            amax, shape = np.abs(w).max(), ()
        else:
            amax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
            shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        scale = np.asarray(amax / qmax).astype(old.dtype)
        short = scale.astype(np.float32) * qmax < amax  # rounded down (fp16: subnormal scales of small channels)
        scale = np.where(short, np.nextafter(scale, np.asarray(np.inf, old.dtype)), scale)
        scale = np.where(amax > 0, scale, old)  # an all-zero channel keeps its scale
        wq = np.clip(np.rint(w / scale.astype(np.float32).reshape(shape)), -qmax, qmax).astype(np.int8)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(wq, node.input[0]))
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(np.asarray(scale), node.input[1]))
        done += 1
    return done


def _qdq_copy(gs, graph, q, dq, k: int, names: set[str]):
    """A copy of the pair q -> dq (suffix `_k`, own scale/zero-point constants); its output tensor.
    Names are made unique against `names`: Q nodes that share a scale (ModelOpt gives each
    consumer its own Q of one tensor) would otherwise give their copies the same name."""
    def fresh(name):
        unique, n = name, 1
        while unique in names:
            n += 1
            unique = f"{name}_{n}"
        names.add(unique)
        return unique

    copies: dict[int, object] = {}  # the pair's constants, shared by its Q and DQ as in the original pair

    def own(t):
        if not isinstance(t, gs.Constant):
            return t
        if id(t) not in copies:
            copies[id(t)] = gs.Constant(fresh(f"{t.name}_{k}"), t.values.copy())
        return copies[id(t)]

    q_out = gs.Variable(fresh(f"{q.outputs[0].name}_{k}"), dtype=q.outputs[0].dtype, shape=q.outputs[0].shape)
    dq_out = gs.Variable(fresh(f"{dq.outputs[0].name}_{k}"), dtype=dq.outputs[0].dtype, shape=dq.outputs[0].shape)
    graph.nodes.append(gs.Node("QuantizeLinear", fresh(f"{q.name}_{k}"), dict(q.attrs),
                               [q.inputs[0], *map(own, q.inputs[1:])], [q_out], domain=q.domain))
    graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{dq.name}_{k}"), dict(dq.attrs),
                               [q_out, *map(own, dq.inputs[1:])], [dq_out], domain=dq.domain))
    return dq_out


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
