"""How exact and how fast are this CPU's int8 matmul kernels, in ONNX Runtime and OpenVINO?

x86 int8 kernels multiply unsigned 8-bit activations by signed 8-bit weights. Without VNNI
(or AMX) they add each pair of products into a 16-bit integer with saturation (VPMADDUBSW),
so a Q/DQ graph whose weights use all 8 bits can come out different from its own arithmetic.
Two ways out: ONNX Runtime's session option `session.x64quantprecision` (u8 x u8 kernels), or
weights quantised to 7 bits (|q| <= 63: no pair sum can overflow), which `rpiae export
--int8-weight-bits 7` writes.

This measures both on a stack of ViT-B MLP layers (768 -> 3072 -> 768, 257 tokens, tanh between)
in one process, calls alternated, on random inputs:

    python scripts/int8_kernels.py                        # batch 8, 2 threads, 4 blocks, median of 5
    python scripts/int8_kernels.py --activations u8 --json out.json

Rows: each runtime's fp32, int8 (8-bit weights), int8 with ONNX Runtime's u8 x u8 option, int8
with 7-bit weights. Columns: median time, speed relative to the same runtime's fp32, and the
relative error (L2) of the stack's output against the graph's own Q/DQ arithmetic (ONNX Runtime
with every graph optimisation off: quantise, dequantise, fp32 matmul). Exact kernels differ from
it only where float rounding moves a value across a quantisation step, which later layers carry
on (~1e-2 after the default 8 layers); saturating ones are ~10x further off. `--activations u8`
quantises activations as uint8 with zero-point 128 instead of int8 with zero-point 0 (same scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rpiae.bench.machine import cpu_summary

DIM, HIDDEN, TOKENS = 768, 3072, 257
ACTIVATION_RANGE = 4.0  # the activations' quantisation range, |x| <= 4 (inputs are N(0, 1), then tanh)
ACTIVATIONS = {"s8": (np.int8, 0), "u8": (np.uint8, 128)}


def mlp_stack(blocks: int, weight_bits: int | None, activations: str = "s8", seed: int = 0) -> onnx.ModelProto:
    """`blocks` x (MatMul 768->3072, Tanh, MatMul 3072->768, Tanh): fp32 (`weight_bits` None), or
    Q/DQ on every MatMul input: weights per output channel, symmetric, stored as int8 with
    |q| <= 2**(bits-1) - 1 (DQ only); activations per tensor in the given type."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(2 * blocks):
        k, n = (DIM, HIDDEN) if i % 2 == 0 else (HIDDEN, DIM)
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        p = f"fc{i}"
        if weight_bits is None:
            inits.append(numpy_helper.from_array(w, f"{p}_w"))
        else:
            qmax = 2 ** (weight_bits - 1) - 1
            scale = np.abs(w).max(0) / qmax
            dtype, zero = ACTIVATIONS[activations]
            inits += [numpy_helper.from_array(np.round(w / scale).astype(np.int8), f"{p}_wq"),
                      numpy_helper.from_array(scale.astype(np.float32), f"{p}_ws"),
                      numpy_helper.from_array(np.zeros(n, np.int8), f"{p}_wz"),
                      numpy_helper.from_array(np.array(ACTIVATION_RANGE / 127, np.float32), f"{p}_as"),
                      numpy_helper.from_array(np.array(zero, dtype), f"{p}_az")]
            nodes += [helper.make_node("DequantizeLinear", [f"{p}_wq", f"{p}_ws", f"{p}_wz"], [f"{p}_w"], axis=1),
                      helper.make_node("QuantizeLinear", [x, f"{p}_as", f"{p}_az"], [f"{p}_q"]),
                      helper.make_node("DequantizeLinear", [f"{p}_q", f"{p}_as", f"{p}_az"], [f"{p}_dq"])]
            x = f"{p}_dq"
        nodes += [helper.make_node("MatMul", [x, f"{p}_w"], [f"{p}_y"]), helper.make_node("Tanh", [f"{p}_y"], [f"{p}_t"])]
        x = f"{p}_t"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", TOKENS, DIM])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", TOKENS, DIM])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_runner(path: Path, threads: int, u8u8: bool = False, optimise: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not optimise:  # the graph's own arithmetic: Q/DQ nodes and fp32 matmuls, no int8 kernel
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if u8u8:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def openvino_runner(path: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(core.read_model(str(path)), "CPU", config).create_infer_request()
    return lambda x: request.infer({0: x})[0].copy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="images per call (each 257 tokens)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    ap.add_argument("--blocks", type=int, default=4, help="MLP blocks in the stack (two MatMuls each)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row, alternated across rows")
    ap.add_argument("--activations", choices=tuple(ACTIVATIONS), default="s8",
                    help="activation type of the int8 graphs: s8 (zero-point 0, what the bundle writes) or u8 (zero-point 128)")
    ap.add_argument("--runtimes", default="ort,openvino", help="comma-separated: ort, openvino")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    runtimes = [r for r in args.runtimes.split(",") if r]

    x = np.random.default_rng(1).standard_normal((args.batch, TOKENS, DIM)).astype(np.float32)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for bits in (None, 8, 7):
            paths[bits] = Path(tmp) / f"w{bits or 32}.onnx"
            onnx.save(mlp_stack(args.blocks, bits, args.activations), paths[bits])
        exact = {bits: ort_runner(paths[bits], args.threads, optimise=False)(x) for bits in (8, 7)}
        for rt in runtimes:
            make = ort_runner if rt == "ort" else openvino_runner
            variants = [("fp32", None, {}), ("int8, 8-bit weights", 8, {})]
            if rt == "ort":
                variants.append(("int8, 8-bit weights, u8 x u8 (session.x64quantprecision)", 8, {"u8u8": True}))
            variants.append(("int8, 7-bit weights", 7, {}))
            for label, bits, kw in variants:
                rows[f"{rt}: {label}"] = {"runtime": rt, "variant": label, "weight_bits": bits,
                                          "run": make(paths[bits], args.threads, **kw)}
        for row in rows.values():
            y = row["run"](x)  # the warm-up call; its output is the one compared
            ref = exact.get(row["weight_bits"])
            row["rel_error_vs_qdq"] = None if ref is None else float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            row["times"] = []
        for _ in range(args.repeats):
            for row in rows.values():
                t = time.perf_counter()
                row["run"](x)
                row["times"].append(time.perf_counter() - t)
    for row in rows.values():
        row["median_ms"] = round(statistics.median(row.pop("times")) * 1e3, 1)
        del row["run"]
    for row in rows.values():
        fp32 = rows[f"{row['runtime']}: fp32"]["median_ms"]
        row["x_fp32"] = round(fp32 / row["median_ms"], 2)

    cpu = cpu_summary()
    settings = {k: getattr(args, k) for k in ("batch", "threads", "blocks", "repeats", "activations")}
    print(f"{cpu['model']} (flags: {' '.join(cpu['flags']) or 'none'}); {settings}")
    for name, row in rows.items():
        err = "" if row["rel_error_vs_qdq"] is None else f"  error vs Q/DQ {row['rel_error_vs_qdq']:.2e}"
        print(f"  {name:<72} {row['median_ms']:>8.1f} ms  {row['x_fp32']:.2f}x fp32{err}")
    if args.json:
        from rpiae.host import library_versions

        result = {"cpu": cpu, "versions": library_versions(("onnxruntime", "openvino")), **settings, "rows": list(rows.values())}
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
