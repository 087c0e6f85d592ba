"""--backend-option KEY=VALUE: a backend's own keyword options from the command line (encode,
decode, extract, eval, verify), typed from its constructor, checked against its registry entry,
recorded with what was run; named variants (`openvino-int8-bf16`) as eval rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rpiae.engines import backend_options, load_backend, split_options
from rpiae.export.backends import REGISTRY, RUNTIMES, VARIANTS, variant


def cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def usage_error(r, needle: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], r.output


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("photos")
    for i, img in enumerate(photos[:4]):
        Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(d / f"{i}.png")
    return d


def test_options_are_typed_from_the_backends_constructor():
    assert backend_options("openvino", split_options(["threads=2", "op_profiling=yes", "hint=throughput",
                                                      "int8_rest=bf16"])) == {
        "threads": 2, "op_profiling": True, "hint": "throughput", "int8_rest": "bf16"}
    assert backend_options("ort", split_options(["spinning=false", "exact_int8=1", "threads=3"])) == {
        "spinning": False, "exact_int8": True, "threads": 3}
    assert backend_options("torch", {"compile": "true"}) == {"compile": True}
    with pytest.raises(ValueError, match=r"ort backend has no option hint \(it takes threads, spinning"):
        backend_options("ort", {"hint": "latency"})
    with pytest.raises(ValueError, match="ort option threads: expected an integer, got 'two'"):
        backend_options("ort", {"threads": "two"})
    with pytest.raises(ValueError, match="ort option spinning: expected true or false, got 'maybe'"):
        backend_options("ort", {"spinning": "maybe"})
    with pytest.raises(ValueError, match="ort option profile cannot be given as text"):
        backend_options("ort", {"profile": "1:8:32"})
    assert backend_options("ort", {"hint": "latency", "threads": "1"}, accepted_only=True) == {"threads": 1}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        split_options(["threads"])


def test_every_registered_option_is_a_constructor_parameter():
    """The registry's `options` are what the CLI lets through: each must be a keyword of the class."""
    import inspect

    from rpiae.engines import backend_class

    for name, info in REGISTRY.items():
        params = inspect.signature(backend_class(name).__init__).parameters
        assert set(info.options) <= set(params), (name, set(info.options) - set(params))
        for _, (precisions, options) in info.variants.items():
            assert set(options) <= set(info.options) and set(precisions or info.precisions) <= set(info.precisions)


def test_variants_are_listed_after_their_backend():
    assert variant("openvino-int8-bf16") == ("openvino", {"int8_rest": "bf16"}, ("int8",))
    assert variant("torch-compile") == ("torch", {"compile": True}, None)
    assert variant("ort") == ("ort", {}, None)
    for name, (backend, _, _) in VARIANTS.items():
        assert RUNTIMES.index(backend) < RUNTIMES.index(name)


def test_encode_with_options_gives_the_same_latents_and_describe_records_them(bundle_all, photo_dir, tmp_path):
    plain, opted = tmp_path / "a.npy", tmp_path / "b.npy"
    r = cli("encode", photo_dir, "--model", bundle_all.root, "-b", "ort", "--workers", 0, "-o", plain)
    assert r.exit_code == 0, r.output
    r = cli("encode", photo_dir, "--model", bundle_all.root, "-b", "ort", "-O", "threads=1", "--backend-option",
            "spinning=false", "--workers", 0, "-o", opted)
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(opted), np.load(plain), rtol=0, atol=1e-5)
    with load_backend(bundle_all.root, "ort", "fp32", threads=1, spinning=False) as be:
        assert be.describe()["options"] == {"threads": 1, "spinning": False}
    with load_backend(bundle_all.root, "ort", "fp32") as be:
        assert be.describe()["options"] == {}


def test_bad_options_are_usage_errors_and_write_nothing(bundle_all, photo_dir, tmp_path):
    out = tmp_path / "z.npy"
    usage_error(cli("encode", photo_dir, "--model", bundle_all.root, "-b", "ort", "-O", "int8_rest=bf16", "-o", out),
                "ort backend has no option int8_rest (it takes threads")
    usage_error(cli("encode", photo_dir, "--model", bundle_all.root, "-b", "ort", "-O", "threads=many", "-o", out),
                "ort option threads: expected an integer, got 'many'")
    usage_error(cli("decode", tmp_path / "none.npy", "--model", bundle_all.root, "-O", "threads", "-o", tmp_path / "png"),
                "expected KEY=VALUE")
    assert not out.exists()
    # an option the backend takes but not for this precision: its one-line refusal
    r = cli("encode", photo_dir, "--model", bundle_all.root, "-b", "openvino", "-p", "fp32", "-O", "int8_rest=bf16",
            "-o", out)
    assert r.exit_code == 1 and "int8_rest=bf16 is for int8 graphs, not fp32" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_extract_records_the_options_it_ran_with(bundle_all, photo_dir, tmp_path):
    out = tmp_path / "latents"
    r = cli("extract", photo_dir, "--model", bundle_all.root, "-b", "ort", "-p", "int8", "-O", "exact_int8=true",
            "--workers", 0, "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    backend = json.loads((out / "manifest.json").read_text())["backend"]
    assert backend["backend"] == "ort" and backend["options"] == {"exact_int8": True} and backend["int8_u8u8"] is True


def test_eval_rows_of_variants_and_options(bundle_all, photo_dir, tmp_path, monkeypatch):
    """A variant is a row under its own name, opened with its options and the -O ones its backend
    takes; a precision it does not run is skipped with why; an option no listed backend takes is
    refused."""
    import rpiae.engines.openvino_backend as OV

    monkeypatch.setattr(OV, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])  # no bf16
    out = tmp_path / "eval.json"
    r = cli("eval", photo_dir, "--model", bundle_all.root, "-b", "ort,openvino,openvino-int8-bf16", "-p", "fp32,int8",
            "-O", "exact_int8=true", "-O", "hint=throughput", "--workers", 0, "--quiet", "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    rows = {(row["backend"], row["precision"]): row for row in report["rows"]}
    assert rows[("torch", "fp32")]["options"] == {}  # the reference is never given options
    assert rows[("ort", "int8")]["options"] == {"exact_int8": True}
    assert rows[("openvino", "int8")]["options"] == {"hint": "throughput"}
    skipped = {(s["backend"], s["precision"]): s["reason"] for s in report["skipped_variants"]}
    assert skipped[("openvino-int8-bf16", "fp32")] == "openvino-int8-bf16 runs int8, not fp32"
    assert "bf16 around int8 needs AMX or AVX512-BF16" in skipped[("openvino-int8-bf16", "int8")]
    usage_error(cli("eval", photo_dir, "--model", bundle_all.root, "-b", "ort", "-O", "hint=throughput"),
                "none of ort takes option hint")


def test_eval_runs_a_variant_under_its_name(bundle_all, photo_dir, tmp_path, monkeypatch):
    """The variant's own options reach its backend: here a stand-in records what it was opened with."""
    import rpiae.jobs.evaluate as E

    opened = []
    real = E.load_backend

    def spy(model, backend, precision, device, **kw):
        opened.append((backend, precision, kw))
        return real(model, "ort" if backend == "openvino" else backend, precision, device,
                    **{k: v for k, v in kw.items() if k == "max_batch"})

    monkeypatch.setattr(E, "load_backend", spy)
    out = tmp_path / "eval.json"
    r = cli("eval", photo_dir, "--model", bundle_all.root, "-b", "openvino-int8-bf16", "-p", "int8", "-O", "threads=1",
            "--workers", 0, "--quiet", "--json", out)
    assert r.exit_code == 0, r.output
    assert ("openvino", "int8", {"max_batch": None, "int8_rest": "bf16", "threads": 1}) in opened
    names = [(row["backend"], row["precision"]) for row in json.loads(out.read_text())["rows"]]
    assert names == [("torch", "fp32"), ("openvino-int8-bf16", "int8")]


def test_verify_takes_backend_options(bundle_all, tmp_path):
    out = tmp_path / "v.json"
    r = cli("verify", "--model", bundle_all.root, "-b", "ort", "-p", "int8", "-O", "exact_int8=true", "--batch", 2,
            "--json", out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["ok"] is True
    usage_error(cli("verify", "--model", bundle_all.root, "-b", "ort", "-O", "int8_rest=bf16"),
                "ort backend has no option int8_rest")


def test_triton_python_models_carry_the_options_to_their_backend(bundle_all, tmp_path):
    from google.protobuf import json_format

    from rpiae.engines.triton_python import GraphModel
    from rpiae.export.triton import parse_config

    repo = tmp_path / "repo"
    r = cli("triton", "--model", bundle_all.root, "--platform", "python", "--backend", "ort", "-p", "int8", "-O", "exact_int8=true",
            "-O", "threads=1", "--out", repo)
    assert r.exit_code == 0, r.output
    config = parse_config((repo / "rpiae_encode" / "config.pbtxt").read_text())
    assert json.loads(config.parameters["rpiae_options"].string_value) == {"exact_int8": True, "threads": 1}
    model = GraphModel({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                        "model_repository": str(repo / "rpiae_encode"), "model_instance_kind": "CPU",
                        "model_instance_device_id": "0"})
    info = model.backend.describe()
    assert info["options"] == {"spinning": False, "exact_int8": True, "threads": 1}  # spinning: Triton's own default
    assert info["int8_u8u8"] is True
    model.close()
    usage_error(cli("triton", "--model", bundle_all.root, "-O", "threads=1", "--out", tmp_path / "x"),
                "--backend-option, --python-env and --threads apply to --platform python")
    usage_error(cli("triton", "--model", bundle_all.root, "--platform", "python", "-O", "hint=latency", "--out",
                    tmp_path / "y"), "ort backend has no option hint")
