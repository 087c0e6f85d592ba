"""INT8 on x86 CPUs without VNNI: u8 x s8 kernels add pairs of products in 16 bits with
saturation. Covered here: which CPUs that is (by their flags, given, never this machine's),
7-bit weights (`narrow_weights`, `rpiae export --int8-weight-bits 7`), ONNX Runtime's exact
u8 x u8 option chosen by the backend, OpenVINO's warning. The numeric tests hold on every CPU:
on one with VNNI the kernels are exact anyway, on one without they are exact only through the fix
under test."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rpiae.engines.ort_backend import session_options
from rpiae.export.precision import narrow_weights
from rpiae.precisions import int8_pairs_saturate

AVX2 = {"sse4_1", "avx2", "fma"}


@pytest.mark.parametrize("flags, saturates", [
    (AVX2, True),
    (AVX2 | {"avx512f", "avx512bw"}, True),  # AVX-512 before VNNI (Skylake-SP)
    (AVX2 | {"avx512f", "avx512_vnni"}, False),
    (AVX2 | {"avx_vnni"}, False),
    (AVX2 | {"amx_tile", "amx_int8"}, False),
    ({"asimd", "asimddp"}, False),  # Arm: no x86 u8 x s8 kernels
    (set(), False),  # flags unreadable: nothing is claimed
])
def test_which_cpus_saturate_int8_pair_sums(flags, saturates):
    assert int8_pairs_saturate(flags) is saturates


def _qdq_matmul(w_bits: int, k: int = 768, n: int = 64, seed: int = 0):
    """(x -> Q/DQ -> MatMul with a per-channel int8 weight of `w_bits` bits, its FP32 twin): a
    layer whose pair sums overflow 16 bits with 8-bit weights and inputs spread over the range."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    qmax = 2 ** (w_bits - 1) - 1
    scale = (np.abs(w).max(0) / qmax).astype(np.float32)
    inits = [numpy_helper.from_array(np.round(w / scale).astype(np.int8), "wq"), numpy_helper.from_array(scale, "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(np.array(4 / 127, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
             helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x, u8u8=False, optimise=True):
    import onnxruntime as ort

    opts = session_options(1, u8u8=u8u8)
    if not optimise:  # the graph's own arithmetic: quantise, dequantise, fp32 matmul
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("w_bits, u8u8", [(8, True), (7, False)])
def test_the_fixes_make_onnx_runtime_int8_exact(w_bits, u8u8):
    """8-bit weights with the u8 x u8 option, and 7-bit weights with ONNX Runtime's defaults, both
    compute the graph's own Q/DQ arithmetic (3e-7 measured, float rounding; 8-bit weights on the
    default kernels of an AVX2 CPU without VNNI are 3e-2 off)."""
    x = np.random.default_rng(1).uniform(-4, 4, (64, 768)).astype(np.float32)
    model = _qdq_matmul(w_bits)
    assert _rel(_run(model, x, u8u8=u8u8), _run(model, x, optimise=False)) < 1e-5


def _fp32_and_int8(tmp_path, external: bool):
    """A fp32 graph (MatMul weight w, Conv weight c with an all-zero output channel) saved in
    tmp_path, and its 8-bit Q/DQ twin (per-channel symmetric, fp16 scales, weights under their
    fp32 names, as ModelOpt writes them)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    c = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    c[2] = 0
    fp32 = helper.make_model(helper.make_graph(
        [helper.make_node("Conv", ["img", "c"], ["f"]), helper.make_node("Identity", ["w"], ["w_out"])], "f",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, 4, 3, 3]),
         helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [16, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(c, "c")]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "fp32.onnx"
    onnx.save(fp32, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location="fp32.onnx.data",
              size_threshold=0)

    def q8(a, axis):
        red = tuple(i for i in range(a.ndim) if i != axis)
        scale = np.where(np.abs(a).max(red) > 0, np.abs(a).max(red) / 127, 1.0).astype(np.float16)
        shape = [-1 if i == axis else 1 for i in range(a.ndim)]
        return np.round(a / scale.astype(np.float32).reshape(shape)).astype(np.int8), scale

    (wq, ws), (cq, cs) = q8(w, 1), q8(c, 0)
    int8 = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "w_scale"], ["wd"], axis=1),
         helper.make_node("DequantizeLinear", ["c", "c_scale"], ["cd"], axis=0)], "q", [],
        [helper.make_tensor_value_info("wd", TensorProto.FLOAT16, [16, 8]),
         helper.make_tensor_value_info("cd", TensorProto.FLOAT16, [4, 3, 2, 2])],
        [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(ws, "w_scale"),
         numpy_helper.from_array(cq, "c"), numpy_helper.from_array(cs, "c_scale")]), opset_imports=[helper.make_opsetid("", 19)])
    return path, int8, {"w": (w, 1), "c": (c, 0)}, {"w_scale": ws, "c_scale": cs}


@pytest.mark.parametrize("external", [False, True])
def test_narrow_weights_requantises_from_the_fp32_weights(tmp_path, external):
    path, model, weights, old_scales = _fp32_and_int8(tmp_path, external)
    assert narrow_weights(model, path, 7) == 2
    onnx.checker.check_model(model, full_check=True)
    got = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, (w, axis) in weights.items():
        q, scale = got[name], got[f"{name}_scale"]
        assert q.dtype == np.int8 and scale.dtype == np.float16  # the graph's types are kept
        red = tuple(i for i in range(w.ndim) if i != axis)
        shape = [-1 if i == axis else 1 for i in range(w.ndim)]
        amax = np.abs(w).max(red)
        live = amax > 0
        np.testing.assert_allclose(scale[live].astype(np.float32), amax[live] / 63, rtol=1e-3)  # fp16 rounding
        assert (np.abs(q).max(red)[live] == 63).all() and np.abs(q).max() <= 63
        err = np.abs(q * scale.astype(np.float32).reshape(shape) - w)
        assert (err <= 0.5 * scale.astype(np.float32).reshape(shape) * 1.01).all()  # rounded once, from fp32
        # an all-zero channel stays zero and keeps its scale
        assert (q[2] == 0).all() if name == "c" else True
        if name == "c":
            assert scale[2] == old_scales["c_scale"][2]


def test_8_bit_weights_past_127_are_requantised(tmp_path):
    """A channel of small weights (|w| < ~1e-3) gets a fp16 scale in the subnormal range; rounded
    to nearest, as ModelOpt stores it, the scale can be below max|w| / 127 and the channel's
    largest weight saturates at -128, outside TensorRT's [-127, 127]. The export redoes only
    such weights, with the scale rounded up: every |q| <= 127, each weight within half a step."""
    from rpiae.export.checks import check_graph

    path, model, weights, _ = _fp32_and_int8(tmp_path, external=False)
    w = weights["w"][0].copy()
    amax = 127 * 10.4 * 2.0 ** -24  # its scale, 10.4 steps of fp16's subnormals, rounds down to 10
    w[:, 3] *= amax / np.abs(w[:, 3]).max()  # the column (channel, axis 1) of small weights
    w[0, 3] = -amax  # its largest |w| is negative
    fp32 = onnx.load(str(path))
    for t in fp32.graph.initializer:
        if t.name == "w":
            t.CopyFrom(numpy_helper.from_array(w, "w"))
    onnx.save(fp32, str(path))
    scale = (np.abs(w).max(0) / 127).astype(np.float16)  # to nearest, as ModelOpt stores it
    q = np.clip(np.rint(w / scale.astype(np.float32)), -128, 127).astype(np.int8)  # saturating, as QuantizeLinear
    assert q.min() == -128  # the case under test: the rounded-down subnormal scale
    inits = {t.name: t for t in model.graph.initializer}
    inits["w"].CopyFrom(numpy_helper.from_array(q, "w"))
    inits["w_scale"].CopyFrom(numpy_helper.from_array(scale, "w_scale"))
    c_before = numpy_helper.to_array(inits["c"]).copy()
    saved = tmp_path / "int8.onnx"
    onnx.save(model, str(saved))
    assert any("int8 weight -128" in p for p in check_graph(saved))

    assert narrow_weights(model, path, 8, only=lambda q: bool((q == -128).any())) == 1  # w only
    got = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(got["c"], c_before)  # a weight within range is left as it was
    q, s = got["w"], got["w_scale"].astype(np.float32)
    assert got["w_scale"].dtype == np.float16 and np.abs(q).max() == 127 and q.min() >= -127
    assert (np.abs(q * s - w) <= 0.5 * s * 1.001).all()
    onnx.save(model, str(saved))
    assert not any("int8 weight -128" in p for p in check_graph(saved))


def test_export_int8_of_a_model_with_small_channels(tmp_path, sample_photos):
    """End to end: a model with a few output channels of small weights (as training leaves
    them) exports to INT8 with every graph check passed (it failed with `int8 weight -128`)."""
    import torch

    from tests.conftest import make_tiny
    from rpiae.export.checks import check_graph
    from rpiae.verify import export_bundle

    model = make_tiny(seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and any(k in name for k in ("qkv", "proj", "mlp")):
                p[:4] *= 1e-3 * torch.rand(4, 1, generator=g)
    ckpt = tmp_path / "small.safetensors"
    model.save(ckpt)
    out = tmp_path / "b"
    export_bundle(ckpt, out, precisions="fp32,int8", calib=sample_photos[:8], progress=False)
    for graph in ("encode", "decode"):
        assert check_graph(out / f"{graph}.int8.onnx", "int8") == []


def test_export_with_7_bit_weights(tmp_path, trained_or_tiny_ckpt, sample_photos):
    """`rpiae export --int8-weight-bits 7`: every int8 weight within +-63 (and some at 63), the
    bits in the graph's metadata and the manifest, the recorded parity within the INT8 bound."""
    from click.testing import CliRunner

    from rpiae.cli.main import main
    from rpiae.export.onnx_export import read_metadata
    from rpiae.samples import write_sample_photos

    calib = tmp_path / "calib"
    write_sample_photos(calib)
    out = tmp_path / "b7"
    args = ["export", "--checkpoint", trained_or_tiny_ckpt, "--precision", "fp32,int8", "--int8-high-precision", "fp32",
            "--int8-weight-bits", "7", "--calib", str(calib), "--out", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in ("encode", "decode"):
        name = f"{graph}.int8.onnx"
        assert manifest["files"][name]["calibration"]["weight_bits"] == 7
        assert read_metadata(out / name)["rpiae.int8_weight_bits"] == "7"
        model = onnx.load(str(out / name))
        dq_weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
        qs = [numpy_helper.to_array(t) for t in model.graph.initializer
              if t.name in dq_weights and t.data_type == TensorProto.INT8 and len(t.dims) > 1]
        assert qs and max(int(np.abs(q).max()) for q in qs) == 63
    rows = [r for r in manifest["parity"] if r["precision"] == "int8"]
    assert rows and all(r["ok"] for r in rows)
    res = CliRunner().invoke(main, args[:-2] + ["--int8-weight-bits", "6", "--out", str(tmp_path / "b6")])
    assert res.exit_code == 2 and "'6' is not one of '8', '7'" in res.output


@pytest.fixture
def cpu_flags(monkeypatch):
    """Set the CPU flags the backends see (rpiae.host.cpu_flags)."""
    import rpiae.host

    def use(flags):
        monkeypatch.setattr(rpiae.host, "cpu_flags", lambda: set(flags))

    return use


def test_ort_backend_runs_8_bit_int8_exactly_where_the_cpu_saturates(bundle_all, cpu_flags):
    from rpiae.engines.ort_backend import ORTBackend

    def opened(**kw):
        be = ORTBackend(bundle_all, "int8", **kw)
        entries = set()
        for g in be.graphs:
            opts = be.session(g).get_session_options()
            try:
                entries.add(opts.get_session_config_entry("session.x64quantprecision"))
            except Exception:  # noqa: BLE001 - ONNX Runtime raises when the key was never set
                entries.add(None)
        return be.describe()["int8_u8u8"], entries

    cpu_flags(AVX2)
    assert opened() == (True, {"1"})
    assert opened(exact_int8=False) == (False, {None})
    cpu_flags(AVX2 | {"avx512_vnni"})
    assert opened() == (False, {None})
    assert opened(exact_int8=True) == (True, {"1"})
    assert "int8_u8u8" not in ORTBackend(bundle_all, "fp32").describe()


def test_7_bit_bundles_need_no_u8u8(bundle_all, cpu_flags, tmp_path):
    """A bundle whose int8 graphs record 7-bit weights keeps the fast kernels on every CPU."""
    import shutil

    from rpiae.engines.base import int8_saturates
    from rpiae.export import Bundle

    cpu_flags(AVX2)
    assert int8_saturates(bundle_all, "int8", ("encode", "decode"))
    assert not int8_saturates(bundle_all, "fp32", ("encode", "decode"))
    copy = tmp_path / "b"
    shutil.copytree(bundle_all.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["files"].values():
        if entry.get("calibration"):
            entry["calibration"]["weight_bits"] = 7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert not int8_saturates(Bundle.open(copy), "int8", ("encode", "decode"))


def test_openvino_warns_where_its_int8_kernels_saturate(bundle_all, cpu_flags, capsys):
    pytest.importorskip("openvino")
    from rpiae.engines.openvino_backend import OpenVINOBackend

    cpu_flags(AVX2)
    be = OpenVINOBackend(bundle_all, "int8", threads=1)
    err = capsys.readouterr().err
    assert be.describe()["int8_saturates"] is True
    assert "has no VNNI" in err and "--int8-weight-bits 7" in err
    cpu_flags(AVX2 | {"avx512_vnni"})
    be = OpenVINOBackend(bundle_all, "int8", threads=1)
    assert be.describe()["int8_saturates"] is False and "VNNI" not in capsys.readouterr().err
