"""Export: graph checks, parity vs PyTorch at batch 1/3/8, bundles and their integrity."""

from __future__ import annotations

import json
import shutil
import stat

import numpy as np
import onnx
import pytest
import torch

from rpiae import RPiAE
from rpiae.engines import load_backend
from rpiae.export import Bundle, BundleError
from rpiae.verify import export_bundle, verify_bundle
from rpiae.export.checks import check_graph
from rpiae.export.graphs import bicubic_matrix
from rpiae.export.onnx_export import read_metadata
from rpiae.fileio import sha256_file, umask
from rpiae.verify.parity import TOLERANCES

ONNX_FILES = [f"{g}.{p}.onnx" for g in ("encode", "decode") for p in ("fp32", "fp16", "int8")]


@pytest.mark.parametrize("name", ONNX_FILES)
def test_graph_checks_pass(bundle_all, name):
    path = bundle_all.root / name
    assert check_graph(path) == []
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    inp = model.graph.input[0].type.tensor_type.shape.dim
    assert inp[0].dim_param == "batch" and all(d.dim_value > 0 for d in inp[1:])
    ops = {n.op_type for n in model.graph.node}
    assert "Resize" not in ops  # 256->224 is two matmuls
    assert not ops & {"DynamicQuantizeLinear", "MatMulInteger"}
    meta = read_metadata(model)
    assert json.loads(meta["rpiae.config"]) == bundle_all.manifest.config.to_dict()


def test_fp16_keeps_layernorm_softmax_and_io_fp32(bundle_all):
    model = onnx.shape_inference.infer_shapes(onnx.load(str(bundle_all.root / "decode.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    ln = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert ln and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in ln)
    mm = [n for n in model.graph.node if n.op_type == "MatMul"]
    fp16 = [n for n in mm if types.get(n.input[0]) == onnx.TensorProto.FLOAT16]
    assert len(fp16) > 0.8 * len(mm)  # the bulk really is fp16
    last = [n for n in mm if "decoder_pred" in n.name]
    assert last and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in last)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_int8_is_symmetric_per_channel_qdq(bundle_all):
    model = onnx.load(str(bundle_all.root / "encode.int8.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qs
    for n in qs:
        if len(n.input) > 2 and n.input[2] in inits:
            assert not inits[n.input[2]].any()
    per_channel = [n for n in qs if n.op_type == "DequantizeLinear" and n.input[1] in inits and inits[n.input[1]].size > 1]
    assert per_channel, "weights are quantised per channel"
    report = bundle_all.files["encode.int8.onnx"]["precision_report"]
    layer_norms = sum(n.op_type == "LayerNormalization" for n in model.graph.node)
    assert layer_norms >= 2 * bundle_all.config.encoder_depth
    assert report["per_op_type"]["LayerNormalization"] == {"fp32": layer_norms}
    assert report["per_op_type"]["MatMul"].get("int8", 0) > 0
    assert report["matmuls_not_int8"], "the layers kept in higher precision are reported"


def test_graph_checks_catch_bad_graphs(bundle_all, tmp_path):
    """The checks can fail: an antialiased Resize, a non-zero zero-point, a fixed batch."""
    model = onnx.load(str(bundle_all.root / "encode.int8.onnx"))
    zp = next(t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and
              any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] == t.name for n in model.graph.node))
    arr = onnx.numpy_helper.to_array(zp).copy()
    arr[...] = 3
    zp.CopyFrom(onnx.numpy_helper.from_array(arr, zp.name))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.node.append(onnx.helper.make_node("Resize", ["images", "", "", ""], ["r"], name="bad_resize", mode="cubic", antialias=1))
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    w = next(t for t in model.graph.initializer if t.name in weights and t.data_type == onnx.TensorProto.INT8 and t.dims)
    arr = onnx.numpy_helper.to_array(w).copy()
    arr.flat[0] = -128
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    found = check_graph(model)
    problems = " | ".join(found)
    assert "non-zero zero-point" in problems and "antialiased Resize" in problems and "batch axis is not symbolic" in problems
    assert "int8 weight -128" in problems
    # the same graph with every tensor in external data (as large graphs are saved): the values
    # are read from the data file beside it, so the same problems are found
    onnx.save_model(model, str(tmp_path / "bad.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="bad.onnx.data", size_threshold=0)
    assert (tmp_path / "bad.onnx.data").stat().st_size > (tmp_path / "bad.onnx").stat().st_size
    assert sorted(check_graph(tmp_path / "bad.onnx")) == sorted(found)


def test_graph_checks_want_signed_int8_quantisation():
    """TensorRT's explicit quantisation is signed int8: a QuantizeLinear without a zero-point
    (ONNX then quantises to uint8) or with a uint8 one, and a dequantised uint8 weight, fail."""
    from onnx import TensorProto, helper, numpy_helper

    def graph(q_inputs, inits):
        nodes = [helper.make_node("QuantizeLinear", q_inputs, ["q"], name="q"),
                 helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq"),
                 helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], name="dq_w"),
                 helper.make_node("Add", ["y", "wf"], ["out"], name="add")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
                              initializer=[numpy_helper.from_array(np.float32(0.1), "s"), *inits])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])

    w8 = numpy_helper.from_array(np.ones(4, np.int8), "w")
    zp = [p for p in check_graph(graph(["x", "s", "z"], [numpy_helper.from_array(np.int8(0), "z"), w8]), "int8")
          if "zero-point" in p or "UINT8" in p]
    assert zp == []  # the good graph: int8 zero-point of 0, int8 weights
    missing = check_graph(graph(["x", "s"], [w8]), "int8")
    assert any("q: QuantizeLinear without a zero-point quantises to uint8" in p for p in missing)
    unsigned = check_graph(graph(["x", "s", "z"], [numpy_helper.from_array(np.uint8(0), "z"),
                                                 numpy_helper.from_array(np.ones(4, np.uint8), "w")]), "int8")
    assert any("q: zero-point of type UINT8, not INT8" in p for p in unsigned)
    assert any("dq_w: dequantises a UINT8 tensor" in p for p in unsigned)


@pytest.mark.parametrize("graph", ["encode", "decode"])
def test_int8_weights_are_stored_as_int8_with_one_qdq_pair_per_consumer(bundle_all, graph):
    """Weights are int8 initializers behind a DequantizeLinear (no fp32 copy in the file), and every
    quantised activation has its own Q -> DQ pair per consumer."""
    root = bundle_all.root
    assert (root / f"{graph}.int8.onnx").stat().st_size < 0.4 * (root / f"{graph}.fp32.onnx").stat().st_size
    model = onnx.load(str(root / f"{graph}.int8.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weight_dqs = [n for n in dqs if n.input[0] in inits]
    cfg = bundle_all.config
    assert len(weight_dqs) >= 6 * (cfg.encoder_depth if graph == "encode" else cfg.decoder_depth)  # q k v o fc1 fc2
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in weight_dqs)
    assert not [n for n in qs if n.input[0] in inits], "no weight is quantised at run time"
    for q in qs:
        users = consumers[q.output[0]]
        assert [u.op_type for u in users] == ["DequantizeLinear"], q.name
        assert len(consumers[users[0].output[0]]) == 1, users[0].name


def test_dedicated_qdq_pairs_leave_the_arithmetic_unchanged(capfd):
    """A Q/DQ feeding two MatMuls becomes two pairs with their own scales; outputs identical.
    Two Qs of one tensor that share a scale and zero-point (as ModelOpt writes them) give their
    copies distinct names, and each copied Q and its DQ share one copy, as the original pair did."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rpiae.export.precision import dedicated_qdq_pairs

    rng = np.random.default_rng(0)
    ws = [rng.standard_normal((8, 4)).astype(np.float32) for _ in range(4)]
    nodes = []
    for p in ("a", "b"):  # two Q/DQ pairs of x reading the same s and zp, two MatMuls each
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], [f"xq_{p}"], name=f"q_{p}"),
                  helper.make_node("DequantizeLinear", [f"xq_{p}", "s", "zp"], [f"xd_{p}"], name=f"dq_{p}")]
    nodes += [helper.make_node("MatMul", [f"xd_{p}", f"w{i}"], [f"y{i}"], name=f"mm{i}")
              for i, p in enumerate("aabb")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [3, 4]) for i in range(4)],
        [numpy_helper.from_array(np.array(0.02, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp"),
         *(numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(ws))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((3, 8)).astype(np.float32)

    def run(m):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})

    before = run(model)
    capfd.readouterr()
    assert dedicated_qdq_pairs(model) == 2
    assert "distinct tensors" not in "".join(capfd.readouterr())  # onnx-graphsurgeon's name-clash warning
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 4 and ops.count("DequantizeLinear") == 4
    inits = [t.name for t in model.graph.initializer]
    assert len(inits) == len(set(inits)) == 4 + 2 * 3, inits  # weights; s, zp and a copy of each per added pair
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)
    producer = {o: n for n in model.graph.node for o in n.output}
    scales = set()
    for i in range(4):
        dq = producer[next(n for n in model.graph.node if n.name == f"mm{i}").input[0]]
        q = producer[dq.input[0]]
        assert q.input[1:] == dq.input[1:], (q, dq)  # the pair reads one scale and one zero-point
        scales.add(dq.input[1])
    assert len(scales) == 3  # each added pair has its own scale: no common-subexpression merge with its original
    for a, b in zip(before, run(model)):
        np.testing.assert_array_equal(a, b)
    assert dedicated_qdq_pairs(model) == 0  # idempotent


@pytest.mark.parametrize("graph", ["encode", "decode"])
def test_onnxruntime_runs_every_quantised_matmul_as_an_integer_matmul(tmp_path, bundle_all, sample_photos, graph):
    """The CPU variant (fp32 around the int8 layers): in ONNX Runtime's optimised graph no
    MatMul is left reading a DequantizeLinear (a weight dequantised at every call)."""
    import onnxruntime as ort

    from rpiae.export.precision import to_int8

    src = bundle_all.root / f"{graph}.fp32.onnx"
    if graph == "encode":
        calib = sample_photos[:4]
    else:
        with load_backend(bundle_all.root, backend="torch") as be:
            calib = be.encode(sample_photos[:4])
    path = to_int8(src, tmp_path / f"{graph}.int8.onnx", calib, high_precision="fp32")
    quantised = sum(1 for n in onnx.load(str(path)).graph.node if n.op_type == "MatMul")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "optimised.onnx"))
    producer = {o: n.op_type for n in opt.graph.node for o in n.output}
    dq_matmuls = [n.name for n in opt.graph.node if n.op_type == "MatMul" and
                  any(producer.get(i) == "DequantizeLinear" for i in n.input)]
    integer = sum(1 for n in opt.graph.node if n.op_type == "MatMulIntegerToFloat")
    assert dq_matmuls == []
    assert integer >= 6 * (bundle_all.config.encoder_depth if graph == "encode" else bundle_all.config.decoder_depth)
    assert integer < quantised  # attention MatMuls stay float


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_parity_batches_1_3_8(bundle_all, sample_photos, precision):
    report = verify_bundle(bundle_all, backend="ort", images=sample_photos, batches=[1, 3, 8], precisions=[precision])
    assert len(report["results"]) == 3
    for row in report["results"]:
        assert set(row["checks"]) == set(TOLERANCES[precision])
        assert row["ok"], row
    if precision == "fp32":
        m = report["results"][-1]["metrics"]
        assert m["latent_max_abs_rel"] <= 1e-4 and m["latent_cosine_min"] >= 0.99999 and m["decoded_psnr_db"] >= 60


def test_parity_is_recorded_in_manifest(bundle_all):
    rows = bundle_all.manifest.parity
    assert {r["precision"] for r in rows} == {"fp32", "fp16", "int8"} and all(r["ok"] for r in rows)
    m = bundle_all.manifest
    assert m.source["sha256"] and m.opset >= 17 and m.tools["onnxruntime"]
    assert m.io["encode"]["input"]["shape"] == ["batch", 3, 256, 256]
    for name in ONNX_FILES + ["model.safetensors"]:
        assert m.files[name].sha256 == sha256_file(bundle_all.root / name)


def test_resize_matrix_equals_torch_bicubic():
    x = torch.rand(2, 3, 256, 256)
    r = bicubic_matrix(256, 224)
    ref = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    torch.testing.assert_close(r @ x @ r.T, ref, rtol=0, atol=2e-6)


def test_ort_backend_splits_batches_and_round_trips_types(bundle_all, sample_photos):
    x = sample_photos[:5]
    with load_backend(bundle_all.root, backend="ort") as whole, load_backend(bundle_all.root, backend="ort", max_batch=2) as split:
        a, b = whole.encode(x), split.encode(x)
        assert a.shape == (5, 64, 16, 16) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-5)
        t = split.encode(torch.from_numpy(x))
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
        assert isinstance(split.decode(t[:1]), torch.Tensor)


def test_torch_backend_on_bundle_matches_checkpoint(bundle_all, trained_or_tiny_ckpt, sample_photos):
    x = sample_photos[:2]
    with load_backend(bundle_all.root, backend="torch") as a, load_backend(trained_or_tiny_ckpt, backend="torch") as b:
        np.testing.assert_array_equal(a.encode(x), b.encode(x))


def test_tampered_and_truncated_files_are_refused(bundle_all, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle_all.root, copy)
    path = copy / "decode.fp32.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    bundle = Bundle.open(copy)  # same size: caught by the hash on first use
    with pytest.raises(BundleError, match="sha256"):
        bundle.graph_path("decode", "fp32")
    with pytest.raises(BundleError, match="sha256"):
        load_backend(copy, backend="ort")
    path.write_bytes(bytes(data[:1000]))
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(copy)


def test_missing_precision_is_a_clear_error(tmp_path, trained_or_tiny_ckpt):
    b = export_bundle(trained_or_tiny_ckpt, tmp_path / "fp32only", precisions="fp32", progress=False)
    with pytest.raises(BundleError, match=r"no int8 encode onnx \(has: fp32\); re-export with --precision int8"):
        load_backend(b.root, backend="ort", precision="int8")


def test_interrupted_export_leaves_nothing_that_looks_finished(tmp_path, trained_or_tiny_ckpt, monkeypatch):
    import rpiae.export.build as api

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "run_in_child", boom)  # after the weights were written
    with pytest.raises(KeyboardInterrupt):
        export_bundle(trained_or_tiny_ckpt, tmp_path / "out", precisions="fp32,fp16", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_and_int8_needs_calibration(tmp_path, trained_or_tiny_ckpt):
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        export_bundle(trained_or_tiny_ckpt, tmp_path / "exists", progress=False)
    with pytest.raises(ValueError, match="--calib"):
        export_bundle(trained_or_tiny_ckpt, tmp_path / "x", precisions="int8", progress=False)
    with pytest.raises(ValueError, match="unknown precision"):
        export_bundle(trained_or_tiny_ckpt, tmp_path / "x", precisions="fp8", progress=False)


@pytest.mark.slow
def test_rpiae_b_encode_graph_exports(tmp_path):
    from rpiae.export.onnx_export import export_graph

    torch.manual_seed(0)
    model = RPiAE.from_preset("rpiae-b")
    path = export_graph(model, "encode", tmp_path / "encode.fp32.onnx")
    assert check_graph(path) == []
    import onnxruntime as ort

    x = np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)
    z = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x)).numpy()
    assert np.abs(z - ref).max() <= 1e-4 * np.abs(ref).max()


def test_large_graphs_use_external_data(tmp_path, trained_or_tiny_ckpt, sample_photos, monkeypatch):
    """Graphs past `EXTERNAL_DATA_BYTES` (32 MiB: rpiae-b's four graphs; protobuf's limit is 2 GB)
    keep their weights in `<name>.data`; the bundle hashes both."""
    import rpiae.export.build as api
    import rpiae.export.onnx_export as ox

    assert ox.EXTERNAL_DATA_BYTES == 2**25 < ox.TWO_GB
    monkeypatch.setattr(ox, "EXTERNAL_DATA_BYTES", 1024)  # treat every graph as "large"
    monkeypatch.setattr(api, "run_in_child", lambda fn, *args, what: fn(*args))  # so the patch applies
    b = export_bundle(trained_or_tiny_ckpt, tmp_path / "ext", precisions="fp32,int8", progress=False,
                      parity_images=sample_photos[:2], calib=sample_photos[:2])
    for name in ("encode.fp32.onnx", "decode.fp32.onnx", "encode.int8.onnx", "decode.int8.onnx"):
        assert b.files[name]["external_data"] == [name + ".data"] and name + ".data" in b.files
        assert (b.root / name).stat().st_size < 1_000_000 < (b.root / (name + ".data")).stat().st_size
        # readable by others like every file we write (onnx makes its data files 0600)
        assert stat.S_IMODE((b.root / (name + ".data")).stat().st_mode) == 0o666 & ~umask()
    assert {(r["precision"], r["ok"]) for r in b.manifest.parity} == {("fp32", True), ("int8", True)}
    # the other runtime that reads the graphs finds the weights beside them
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')")
    with load_backend(b.root, "openvino", "fp32", graphs=("encode",)) as ov, \
            load_backend(b.root, "ort", "fp32", graphs=("encode",)) as ref:
        z, z_ref = ov.encode(sample_photos[:2]), ref.encode(sample_photos[:2])
    assert np.abs(np.asarray(z) - np.asarray(z_ref)).max() <= 1e-4 * np.abs(np.asarray(z_ref)).max()
    data = b.root / "encode.fp32.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="encode.fp32.onnx.data fails its sha256"):
        Bundle.open(b.root).graph_path("encode", "fp32")


def test_verify_refuses_a_bundle_without_the_backends_files(bundle_all):
    with pytest.raises(BundleError, match=r"no trt-engine files to verify; build them with `rpiae export --target trt`"):
        verify_bundle(bundle_all, backend="trt")


def test_int8_calibrates_on_every_image_and_refuses_to_start_without_the_memory(bundle_all, sample_photos, tmp_path,
                                                                               monkeypatch):
    """All calibration images are used (ModelOpt's memory does not grow with them); an INT8 pass
    that cannot fit in RAM is refused up front with the measured need, not OOM-killed later."""
    import psutil

    from rpiae.export.precision import QuantizationError, int8_memory_needed, onnx_bytes, to_int8

    for graph in ("encode", "decode"):
        assert bundle_all.files[f"{graph}.int8.onnx"]["calibration"]["images"] == len(sample_photos)
    src = bundle_all.root / "decode.fp32.onnx"
    need = int8_memory_needed(onnx_bytes(src))
    from rpiae.export.build import _fp32_graph_bytes

    model = RPiAE.from_checkpoint(bundle_all.weights_path())
    for graph in ("encode", "decode"):  # the up-front estimate export_bundle checks before any work
        size = onnx_bytes(bundle_all.root / f"{graph}.fp32.onnx")
        assert 0.98 * size <= _fp32_graph_bytes(model, graph) <= 1.05 * size

    class Mem:
        available = need - 1

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Mem)
    with pytest.raises(QuantizationError, match=r"INT8 quantisation of decode.fp32.onnx needs about .* GB of free memory"):
        to_int8(src, tmp_path / "x.onnx", np.zeros((1, 64, 16, 16), np.float32))
    assert not (tmp_path / "x.onnx").exists()


def test_manifest_parity_rows_record_the_providers_that_ran(bundle_all):
    rows = bundle_all.manifest.parity
    assert rows and all(r["providers"] == ["CPUExecutionProvider"] for r in rows)
