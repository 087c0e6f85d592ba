"""The bundle contract: the manifest's schema (checked on write and on open, one-line errors),
the three copies of the model config (manifest, weights, ONNX metadata) that must agree, the
GraphSpec every layer reads, and a reused bundle's source checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rpiae.cli.main import main as cli
from rpiae.config import RPiAEConfig, get_preset
from rpiae.export import Bundle, BundleError
from rpiae.export.manifest import MANIFEST, EngineFacts, Manifest, ManifestError, OnnxFacts, PackageFacts
from rpiae.export.onnx_export import read_metadata, set_metadata
from rpiae.export.spec import GRAPHS, graph_spec
from rpiae.fileio import sha256_file


@pytest.fixture
def copy(bundle_all, tmp_path):
    """The session's bundle, copied (fp32 graphs and weights only), to be tampered with."""
    root = tmp_path / "b"
    root.mkdir()
    manifest = json.loads((bundle_all.root / MANIFEST).read_text())
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k in ("model.safetensors", "encode.fp32.onnx",
                                                                               "decode.fp32.onnx")}
    for name in manifest["files"]:
        shutil.copyfile(bundle_all.root / name, root / name)
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def _rewrite_manifest(root, edit) -> None:
    m = json.loads((root / MANIFEST).read_text())
    edit(m)
    for name, entry in m["files"].items():  # the files' own hashes stay right: only the config differs
        entry.update(sha256=sha256_file(root / name), bytes=(root / name).stat().st_size)
    (root / MANIFEST).write_text(json.dumps(m))


def test_a_bundle_whose_config_copies_disagree_is_refused_naming_the_copy(copy):
    config = Bundle.open(copy).config  # as exported: the three copies agree
    tau = config.noise_tau
    other = config.to_dict() | {"noise_tau": tau + 0.25}

    # 1. an ONNX graph carrying another config
    proto = onnx.load(str(copy / "decode.fp32.onnx"))
    set_metadata(proto, RPiAEConfig.from_dict(other), "decode", "fp32")
    onnx.save(proto, str(copy / "decode.fp32.onnx"))
    _rewrite_manifest(copy, lambda m: None)
    with pytest.raises(BundleError) as e:
        Bundle.open(copy)
    assert str(e.value) == (f"{copy}: the model config in decode.fp32.onnx differs from the manifest's "
                            f"(noise_tau: {tau!r} vs {tau + 0.25!r}); re-export the bundle")

    # 2. the manifest agreeing with that graph, so the weights and the encoder graph differ
    _rewrite_manifest(copy, lambda m: m.update(config=other))
    with pytest.raises(BundleError, match=rf"the model config in model.safetensors differs .*noise_tau: {tau + 0.25!r} vs"):
        Bundle.open(copy)

    # 3. the weights re-saved with the manifest's config: now only encode.fp32.onnx disagrees
    tensors = load_file(str(copy / "model.safetensors"))
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "rpiae", "config": json.dumps(other)})
    _rewrite_manifest(copy, lambda m: None)
    with pytest.raises(BundleError, match=r"the model config in encode.fp32.onnx differs"):
        Bundle.open(copy)


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["files"]["encode.fp32.onnx"].update(bytes="12"), "files['encode.fp32.onnx'].bytes: expected int, got str"),
    (lambda m: m["files"]["model.safetensors"].update(kind="pickle"), "files['model.safetensors'].kind: 'pickle' is not one of"),
    (lambda m: m["files"]["encode.fp32.onnx"].update(precision="fp8"), "precision: 'fp8' is not one of fp32, fp16, bf16, int8"),
    (lambda m: m["files"]["encode.fp32.onnx"].update(sha256="xyz"), "sha256: expected 64 lowercase hex digits"),
    (lambda m: m.pop("opset"), "opset: expected int, got nothing"),
    (lambda m: m.update(config={**m["config"], "latent_chanels": 64}), "config: unknown config fields: latent_chanels"),
    (lambda m: m.update(parity=[{"precision": "fp32"}]), "parity[0].ok: expected bool, got nothing"),
    (lambda m: m.update(format_version=99), "format_version: 99 is newer than this rpiae"),
    (lambda m: m.update(format="something-else"), "format: 'something-else': not an rpiae bundle manifest"),
    # each kind's facts are typed
    (lambda m: m["files"]["encode.fp32.onnx"].update(opset="18"), "files['encode.fp32.onnx'].opset: expected int | None, got str"),
    (lambda m: m["files"]["encode.fp32.onnx"].update(external_data="x.data"), ".external_data: expected list, got str"),
    (lambda m: m["files"]["model.safetensors"].update(dtype=32), "files['model.safetensors'].dtype: expected str, got int"),
])
def test_a_malformed_manifest_is_refused_in_one_line(copy, edit, words):
    m = json.loads((copy / MANIFEST).read_text())
    edit(m)
    (copy / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ManifestError) as e:
        Bundle.open(copy)
    assert words in str(e.value) and "\n" not in str(e.value) and str(copy / MANIFEST) in str(e.value)


def test_the_schema_is_checked_on_write(copy):
    before = (copy / MANIFEST).read_bytes()
    b = Bundle.open(copy)
    b.manifest.parity.append({"precision": "fp32", "ok": "yes", "checks": {}})
    with pytest.raises(ManifestError, match=r"parity\[\d+\]\.ok: expected bool, got str"):
        b.write_manifest()
    assert (copy / MANIFEST).read_bytes() == before  # the refused manifest was not written
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]  # nor left a temporary file


def test_an_empty_parity_mapping_opens_as_no_rows(copy):
    m = json.loads((copy / MANIFEST).read_text())
    m["parity"] = {}
    (copy / MANIFEST).write_text(json.dumps(m))
    b = Bundle.open(copy)
    assert b.manifest.parity == []
    assert Manifest.from_dict(b.manifest.to_dict()).to_dict() == b.manifest.to_dict()


def test_graph_specs_follow_the_config_and_the_graphs(bundle_all):
    for config in (get_preset("tiny"), get_preset("ps-vae-tiny")):
        enc, dec = (graph_spec(config, g) for g in GRAPHS)
        assert enc.output_shape == dec.input_shape == (config.latent_channels, config.grid_size, config.grid_size)
        assert enc.input_shape == dec.output_shape == (3, config.image_size, config.image_size)
        assert tuple(enc.sample(3).shape) == (3, *enc.input_shape) and float(enc.sample(3).min()) >= 0
    for graph in GRAPHS:  # what the exported graphs declare
        spec = graph_spec(bundle_all.config, graph)
        model = onnx.load(str(bundle_all.root / f"{graph}.fp32.onnx"), load_external_data=False)
        (inp,), (out,) = model.graph.input, model.graph.output
        assert (inp.name, out.name) == (spec.input_name, spec.output_name)
        assert [d.dim_value for d in inp.type.tensor_type.shape.dim][1:] == list(spec.input_shape)
        assert read_metadata(bundle_all.root / f"{graph}.fp32.onnx") == read_metadata(model)


def test_reusing_a_bundle_needs_the_checkpoint_it_came_from(bundle_all, tiny_ckpt):
    # (aoti: a target this machine can build, so that its early check passes and the reuse check speaks)
    r = CliRunner().invoke(cli, ["export", "--target", "aoti", "--device", "cpu", "--checkpoint", tiny_ckpt,
                                 "--out", str(bundle_all.root)])
    assert r.exit_code == 1, r.output
    error = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and f"was exported from {bundle_all.manifest.source['path']}" in error[0]
    assert f"not from {tiny_ckpt}" in error[0] and "--overwrite" in error[0]


FORMAT1 = Path(__file__).parent / "data" / "manifest-format1.json"


def test_a_manifest_of_earlier_writers_reads_and_writes_back_every_fact():
    """tests/data/manifest-format1.json: a real tiny export (fp32 + int8) as this format's first
    writer recorded it, with TensorRT and AOTInductor entries and its `engines` section (a copy of
    the engine files' facts, no longer written)."""
    old = json.loads(FORMAT1.read_text())
    m = Manifest.from_dict(old)
    plan, pt2 = m.files["engines/encode.int8.plan"], m.files["engines/aoti/encode.fp32.cpu-x86-64-v3.pt2"]
    assert isinstance(plan.facts, EngineFacts) and plan.facts.profile == {"min": 1, "opt": 8, "max": 32}
    assert plan.facts.tensorrt == "10.13.0.35" and plan.facts.layer_precisions["fp32_share"] == 0.05
    assert isinstance(pt2.facts, PackageFacts) and pt2.facts.cpu_level == "x86-64-v3" and pt2.facts.compile_s == 30.25
    onnx_int8 = m.files["encode.int8.onnx"].facts
    assert isinstance(onnx_int8, OnnxFacts) and onnx_int8.calibration["images"] == 4 and onnx_int8.opset == 18
    assert set(m.engines) == {n for n, e in old["files"].items() if e["kind"] in ("trt-engine", "aoti-package")}
    new = m.to_dict()
    assert "engines" not in new and new["files"] == old["files"]  # every fact kept, in `files` only
    assert {k: v for k, v in new.items() if k != "created"} == {k: v for k, v in old.items() if k not in ("engines", "created")}


def test_facts_of_a_later_writer_are_kept(copy):
    """A key a later rpiae adds to a kind's facts reads back and writes back unchanged."""
    _rewrite_manifest(copy, lambda m: m["files"]["encode.fp32.onnx"].update(producer_note={"by": "rpiae 9"}))
    b = Bundle.open(copy)
    assert b.files["encode.fp32.onnx"].facts.extra == {"producer_note": {"by": "rpiae 9"}}
    b.write_manifest()
    assert json.loads((copy / MANIFEST).read_text())["files"]["encode.fp32.onnx"]["producer_note"] == {"by": "rpiae 9"}


def test_a_bundle_with_the_engines_section_still_opens(copy):
    _rewrite_manifest(copy, lambda m: m.update(engines={"trt:encode.fp16": {"file": "engines/encode.fp16.plan"}}))
    b = Bundle.open(copy)
    assert b.manifest.engines == {} and b.precisions() == ["fp32"]
    b.write_manifest()
    assert "engines" not in json.loads((copy / MANIFEST).read_text())
