"""INT8 export options: the calibration method (entropy by default, or max) and the model parts
kept unquantised (`--int8-keep`, io-projections by default), recorded in the graph's metadata and
the manifest."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from rpiae.export.onnx_export import read_metadata
from rpiae.export.precision import INT8_KEEP_PARTS, int8_keep_nodes


def _act_scales(path) -> dict[str, float]:
    """Scale of each activation QuantizeLinear, by the tensor it quantises."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].size == 1}


@pytest.fixture(scope="module")
def other(tmp_path_factory, trained_or_tiny_ckpt, sample_photos):
    """INT8 graphs the non-default way: max calibration, the two bridge parts kept (not the
    io-projections)."""
    from rpiae.export import build_bundle

    out = tmp_path_factory.mktemp("int8opts") / "b"
    return build_bundle(trained_or_tiny_ckpt, out, precisions="int8", calib=sample_photos, int8_calibration="max",
                        int8_keep=["bridge-decoder", "bridge-encoder"], int8_high_precision="fp32", progress=False)


def _part_matmuls(bundle, graph: str, part: str) -> set[str]:
    model = onnx.load(str(bundle.root / f"{graph}.int8.onnx"), load_external_data=False)
    regex = int8_keep_nodes([part])[0]
    return {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and re.match(regex, n.name)}


def _not_int8(bundle, graph: str) -> set[str]:
    return set(bundle.files[f"{graph}.int8.onnx"].facts.precision_report["matmuls_not_int8"])


def test_kept_parts_stay_unquantised_and_the_rest_is_int8(other, bundle_all):
    """Default: entropy calibration, io-projections kept. The other bundle keeps the bridge instead:
    each bundle quantises what the other keeps (attention's own matmuls are never quantised)."""
    for graph, part in (("encode", "bridge-encoder"), ("decode", "bridge-decoder")):
        io = _part_matmuls(bundle_all, graph, "io-projections")
        bridge = _part_matmuls(other, graph, part) - _not_int8(bundle_all, graph)  # its projections
        io_only = io - _part_matmuls(other, graph, part)  # to_moments belongs to both
        assert io_only and len(bridge) >= 3
        assert io <= _not_int8(bundle_all, graph) and not io_only & _not_int8(other, graph)
        assert bridge <= _not_int8(other, graph)
        for b in (bundle_all, other):
            assert b.files[f"{graph}.int8.onnx"].facts.precision_report["per_op_type"]["MatMul"].get("int8", 0) > 0
        default, kept = bundle_all.files[f"{graph}.int8.onnx"].facts, other.files[f"{graph}.int8.onnx"].facts
        assert (default.calibration["method"], default.calibration["keep"]) == ("entropy", ["io-projections"])
        assert (kept.calibration["method"], kept.calibration["keep"]) == ("max", ["bridge-decoder", "bridge-encoder"])
        meta = read_metadata(other.root / f"{graph}.int8.onnx")
        assert meta["rpiae.int8_calibration"] == "max" and meta["rpiae.int8_keep"] == "bridge-decoder,bridge-encoder"
        assert read_metadata(bundle_all.root / f"{graph}.int8.onnx")["rpiae.int8_keep"] == "io-projections"
    # which layers io-projections names: the first and last projection of each part
    assert {n.split("/")[0].rsplit(".", 1)[-1] for n in _part_matmuls(bundle_all, "decode", "io-projections")} == {
        "in_proj", "decoder_embed", "decoder_pred"}


def test_entropy_calibration_gives_other_activation_ranges_than_max(other, bundle_all):
    """The method is really applied: entropy clips activation ranges below their max, so the
    scales of the same tensors are smaller on the whole than max calibration's."""
    ent = _act_scales(bundle_all.root / "decode.int8.onnx")
    mx = _act_scales(other.root / "decode.int8.onnx")
    common = sorted(set(ent) & set(mx))
    assert len(common) >= 8
    ratios = np.array([ent[k] / mx[k] for k in common])
    assert np.median(ratios) < 0.999 and not np.allclose(ratios, 1.0)


def test_int8_bundle_with_the_bridge_kept_runs_close_to_fp32(other, bundle_all, photos):
    from rpiae.engines import load_backend

    with load_backend(other.root, "ort", "int8") as q, load_backend(bundle_all.root, "ort", "fp32") as f:
        z = f.encode(photos[:2])
        zq = q.encode(photos[:2])
        assert np.linalg.norm(zq - z) / np.linalg.norm(z) < 0.2
        assert q.decode(zq).shape == (2, 3, 256, 256)


def test_unknown_parts_and_methods_are_refused_before_any_export(tmp_path, trained_or_tiny_ckpt):
    from rpiae.cli.main import main

    assert set(INT8_KEEP_PARTS) == {"io-projections", "encoder", "bridge-encoder", "bridge-decoder", "pixel-decoder"}
    with pytest.raises(ValueError, match="unknown INT8 keep part decoder; choose from: io-projections, encoder"):
        int8_keep_nodes(["decoder"])
    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["export", "--checkpoint", trained_or_tiny_ckpt, "-p", "int8", "--calib", str(tmp_path),
                                  "--int8-keep", "bridge,encoder", "--out", str(out)])
    assert r.exit_code == 2 and "unknown INT8 keep part bridge" in r.output and not out.exists()
    r = CliRunner().invoke(main, ["export", "--checkpoint", trained_or_tiny_ckpt, "-p", "int8", "--calib", str(tmp_path),
                                  "--int8-calibration", "percentile", "--out", str(out)])
    assert r.exit_code == 2 and "percentile" in r.output and not out.exists()
    from rpiae.export import build_bundle

    with pytest.raises(ValueError, match="int8 calibration must be one of max, entropy"):
        build_bundle(trained_or_tiny_ckpt, out, precisions="int8", calib=np.zeros((1, 3, 256, 256), np.float32),
                     int8_calibration="minmax", progress=False)
    assert not out.exists()
