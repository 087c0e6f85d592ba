"""Triton model repositories: configs parsed by Triton's own model-config protobuf
(tritonclient), the onnxruntime_onnx and tensorrt_plan variants, the ensemble, the CLI and
the client example (against an in-process stand-in for the server that runs the
repository's own files with ONNX Runtime)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rpiae.cli.main import main as cli
from rpiae.export.manifest import engine_name
from rpiae.export.triton import (
    TritonConfigError,
    check_repository,
    config_text,
    ensemble_config,
    model_config,
    parse_config,
    write_model_repository,
)
from rpiae.export import Bundle, BundleError
from rpiae.fileio import sha256_file

pytest.importorskip("tritonclient.grpc", reason='tritonclient not installed: pip install "tritonclient[grpc]"')
from tritonclient.grpc import model_config_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMG = ("images", "TYPE_FP32", [3, 256, 256])
LAT = ("latent", "TYPE_FP32", [64, 16, 16])
OUT = ("image", "TYPE_FP32", [3, 256, 256])


def test_model_config_parses_with_tritons_protobuf():
    text = config_text(model_config("m", "tensorrt_plan", 16, [IMG], [LAT], "KIND_GPU", 2, [4, 16, 64], 250), ["a comment"])
    assert text.startswith("# a comment\n")
    c = parse_config(text)
    assert isinstance(c, model_config_pb2.ModelConfig)
    assert c.name == "m" and c.platform == "tensorrt_plan" and c.max_batch_size == 16
    assert c.input[0].name == "images" and list(c.input[0].dims) == [3, 256, 256]  # no batch axis
    assert c.input[0].data_type == model_config_pb2.TYPE_FP32 and list(c.output[0].dims) == [64, 16, 16]
    assert c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and c.instance_group[0].count == 2
    assert list(c.dynamic_batching.preferred_batch_size) == [4, 16]  # within the profile
    assert c.dynamic_batching.max_queue_delay_microseconds == 250
    cpu = parse_config(config_text(model_config("m", "onnxruntime_onnx", 8, [IMG], [LAT], "KIND_CPU")))
    assert cpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


def test_model_config_refuses_impossible_combinations():
    with pytest.raises(ValueError, match="GPU instances only"):
        model_config("m", "tensorrt_plan", 8, [IMG], [LAT], "KIND_CPU")
    with pytest.raises(ValueError, match="unknown Triton platform"):
        model_config("m", "pytorch", 8, [IMG], [LAT])


def _repo(**over):
    steps = [{"model": "enc", "input_map": {"images": "images"}, "output_map": {"latent": "latent"}},
             {"model": "dec", "input_map": {"latent": "latent"}, "output_map": {"image": "image"}}]
    configs = {"enc": model_config("enc", "onnxruntime_onnx", 8, [IMG], [LAT], "KIND_CPU"),
               "dec": model_config("dec", "onnxruntime_onnx", 8, [LAT], [OUT], "KIND_CPU"),
               "ens": ensemble_config("ens", 8, over.pop("steps", steps), [IMG], over.pop("outputs", [LAT, OUT]))}
    configs.update(over)
    return configs


def test_ensemble_wiring_is_checked():
    parsed = check_repository(_repo())
    ens = parsed["ens"]
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["enc", "dec"]
    assert dict(ens.ensemble_scheduling.step[1].input_map) == {"latent": "latent"}
    bad_steps = {
        "not in the repository": [{"model": "nope", "input_map": {"images": "images"}, "output_map": {}}],
        "before anything writes them": [{"model": "dec", "input_map": {"latent": "latent"}, "output_map": {"image": "image"}}],
        "has no outputs": [{"model": "enc", "input_map": {"images": "images"}, "output_map": {"z": "latent"}}],
        "maps inputs": [{"model": "enc", "input_map": {"x": "images"}, "output_map": {"latent": "latent"}}],
    }
    for words, steps in bad_steps.items():
        with pytest.raises(TritonConfigError, match=words):
            check_repository(_repo(steps=steps))
    with pytest.raises(TritonConfigError, match="produced by no step"):
        check_repository(_repo(outputs=[LAT, OUT, ("extra", "TYPE_FP32", [1])]))
    with pytest.raises(TritonConfigError, match="names the model"):
        check_repository(_repo(dec=model_config("other", "onnxruntime_onnx", 8, [LAT], [OUT], "KIND_CPU")))
    with pytest.raises(TritonConfigError, match="no batch axis"):
        check_repository(_repo(dec=model_config("dec", "onnxruntime_onnx", 8, [LAT], [("image", "TYPE_FP32", [-1, 3, 256, 256])], "KIND_CPU")))
    with pytest.raises(TritonConfigError, match="does not parse"):
        parse_config('name: "x"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\ninput [ { nam: "images" } ]\n')
    with pytest.raises(TritonConfigError, match="does not parse"):
        parse_config('name: "x"\ndynamic_batching { preferred_batch_size: [ 4, ] }\n')


def _check_repo_dir(repo: Path) -> dict:
    configs = {d.name: parse_config((d / "config.pbtxt").read_text()) for d in repo.iterdir() if d.is_dir()}
    parsed = check_repository(configs)
    for name in configs:
        assert (repo / name / "1").is_dir()
    return parsed


@pytest.mark.parametrize("precision,kind", [("fp32", "cpu"), ("fp16", "gpu"), ("int8", "auto")])
def test_onnxruntime_repository_from_bundle(tmp_path, bundle_all, sample_photos, precision, kind):
    import onnxruntime as ort

    repo = tmp_path / "repo"
    s = write_model_repository(bundle_all, repo, precision=precision, platform="auto", instance_kind=kind, max_batch=4)
    assert s["platform"] == "onnxruntime_onnx" and s["precision"] == precision
    parsed = _check_repo_dir(repo)
    assert set(parsed) == {"rpiae_encode", "rpiae_decode", "rpiae"}
    assert parsed["rpiae_encode"].instance_group[0].kind == (
        model_config_pb2.ModelInstanceGroup.KIND_GPU if kind == "gpu" else model_config_pb2.ModelInstanceGroup.KIND_CPU)
    assert parsed["rpiae_encode"].max_batch_size == 4 and parsed["rpiae"].max_batch_size == 4
    for graph in ("encode", "decode"):
        model = repo / f"rpiae_{graph}" / "1" / "model.onnx"
        assert sha256_file(model) == bundle_all.files[f"{graph}.{precision}.onnx"]["sha256"]
        io = bundle_all.manifest.io[graph]
        c = parsed[f"rpiae_{graph}"]
        assert c.input[0].name == io["input"]["name"] and c.output[0].name == io["output"]["name"]
        assert list(c.input[0].dims) == io["input"]["shape"][1:] and list(c.output[0].dims) == io["output"]["shape"][1:]
    # what Triton's onnxruntime backend loads runs, and gives the bundle's results
    sess = ort.InferenceSession(str(repo / "rpiae_encode" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    z = sess.run(None, {"images": sample_photos[:2]})[0]
    from rpiae.engines import load_backend

    with load_backend(bundle_all.root, backend="ort", precision=precision) as be:
        np.testing.assert_allclose(z, be.encode(sample_photos[:2]), rtol=1e-5, atol=1e-5)


def test_external_data_travels_with_model_onnx(tmp_path, bundle_all, sample_photos):
    import onnxruntime as ort

    root = tmp_path / "b"
    shutil.copytree(bundle_all.root, root)
    b = Bundle.open(root)
    name = "encode.fp32.onnx"
    model = onnx.load(str(root / name))
    onnx.save(model, str(root / name), save_as_external_data=True, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=1024)
    b.add_file(name + ".data", kind="onnx-external-data", graph="encode", precision="fp32")
    entry = {k: v for k, v in b.files[name].items() if k not in ("sha256", "bytes")}
    b.add_file(name, **{**entry, "external_data": [name + ".data"]})
    b.write_manifest()
    repo = tmp_path / "repo"
    write_model_repository(root, repo, precision="fp32")
    version = repo / "rpiae_encode" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["encode.fp32.onnx.data", "model.onnx"]
    sess = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"images": sample_photos[:1]})[0].shape == (1, 64, 16, 16)


def _with_fake_engines(bundle_all, root: Path, precision="fp16", profile=None, **extra) -> Bundle:
    """The bundle plus engine entries as a GPU machine's `rpiae export --target trt` writes them."""
    shutil.copytree(bundle_all.root, root)
    b = Bundle.open(root)
    for graph in ("encode", "decode"):
        name = engine_name(graph, precision)
        (root / "engines").mkdir(exist_ok=True)
        (root / name).write_bytes(f"serialized {graph} engine".encode())
        b.add_file(name, kind="trt-engine", graph=graph, precision=precision,
                   profile=profile or {"min": 1, "opt": 4, "max": 16}, tensorrt="10.13.0.35",
                   gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", onnx=f"{graph}.{precision}.onnx",
                   onnx_sha256=b.files[f"{graph}.{precision}.onnx"]["sha256"], **extra)
    b.write_manifest()
    return Bundle.open(root)


def test_tensorrt_repository_from_engines(tmp_path, bundle_all):
    b = _with_fake_engines(bundle_all, tmp_path / "b")
    repo = tmp_path / "repo"
    s = write_model_repository(b, repo)  # auto: the bundle has engines -> tensorrt_plan, fp16
    assert s["platform"] == "tensorrt_plan" and s["precision"] == "fp16" and s["instance_kind"] == "KIND_GPU"
    parsed = _check_repo_dir(repo)
    enc = parsed["rpiae_encode"]
    assert enc.platform == "tensorrt_plan" and enc.max_batch_size == 16
    assert list(enc.dynamic_batching.preferred_batch_size) == [4, 16]
    assert enc.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    for graph in ("encode", "decode"):
        plan = repo / f"rpiae_{graph}" / "1" / "model.plan"
        assert plan.read_bytes() == f"serialized {graph} engine".encode()
    text = (repo / "rpiae_encode" / "config.pbtxt").read_text()
    assert "TensorRT 10.13.0.35" in text and "compute capability 9.0" in text
    # the ONNX variant of the same bundle for users without TensorRT
    s = write_model_repository(b, tmp_path / "ort", precision="fp16", platform="onnxruntime")
    assert s["platform"] == "onnxruntime_onnx"


def test_version_compatible_engines_name_the_server_option(tmp_path, bundle_all):
    from click.testing import CliRunner

    from rpiae.cli.main import main

    plain = write_model_repository(_with_fake_engines(bundle_all, tmp_path / "b0"), tmp_path / "r0")
    assert plain["server_args"] == []
    b = _with_fake_engines(bundle_all, tmp_path / "b", version_compatible=True)
    s = write_model_repository(b, tmp_path / "repo")
    assert s["server_args"] == ["--backend-config=tensorrt,version-compatible=true"]
    text = (tmp_path / "repo" / "rpiae_encode" / "config.pbtxt").read_text()
    assert "version-compatible TensorRT 10.13.0.35" in text and "10.13.0.35 or later" in text
    r = CliRunner().invoke(main, ["triton", "-m", str(b.root), "-o", str(tmp_path / "repo2")])
    assert r.exit_code == 0, r.output
    assert "--backend-config=tensorrt,version-compatible=true" in [line for line in r.output.splitlines()
                                                                  if line.startswith("serve:")][0]


def test_tensorrt_repository_refusals(tmp_path, bundle_all):
    b = _with_fake_engines(bundle_all, tmp_path / "b")
    with pytest.raises(ValueError, match="exceeds the engine profile's maximum 16"):
        write_model_repository(b, tmp_path / "r1", max_batch=64)
    with pytest.raises(ValueError, match="GPU instances only"):
        write_model_repository(b, tmp_path / "r2", instance_kind="cpu")
    with pytest.raises(BundleError, match=r"no int8 TensorRT engines \(has: fp16\).*--target trt --precision int8"):
        write_model_repository(b, tmp_path / "r3", precision="int8", platform="tensorrt")
    b2 = _with_fake_engines(bundle_all, tmp_path / "b2", profile={"min": 2, "opt": 4, "max": 8})
    with pytest.raises(ValueError, match="rebuild with --batch 1:4:8"):
        write_model_repository(b2, tmp_path / "r4")
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


def test_repository_is_written_atomically(tmp_path, bundle_all, monkeypatch):
    repo = tmp_path / "repo"
    write_model_repository(bundle_all, repo, precision="fp32")
    with pytest.raises(FileExistsError):
        write_model_repository(bundle_all, repo, precision="fp32")
    write_model_repository(bundle_all, repo, precision="fp16", overwrite=True)
    assert "precision fp16" in (repo / "rpiae_encode" / "config.pbtxt").read_text()

    import rpiae.export.triton as triton

    def broken(configs):
        raise TritonConfigError("rejected")

    monkeypatch.setattr(triton, "check_repository", broken)
    with pytest.raises(TritonConfigError):
        write_model_repository(bundle_all, tmp_path / "other", precision="fp32")
    assert not (tmp_path / "other").exists() and not list(tmp_path.glob(".other*"))


def test_cli_triton(tmp_path, bundle_all):
    runner = CliRunner()
    repo = tmp_path / "model_repository"
    r = runner.invoke(cli, ["triton", "--model", str(bundle_all.root), "--precision", "fp16", "--out", str(repo),
                            "--instances", "2", "--max-batch", "8"])
    assert r.exit_code == 0, r.output
    assert "onnxruntime_onnx fp16" in r.output and "tritonserver --model-repository" in r.output
    parsed = _check_repo_dir(repo)
    assert parsed["rpiae_decode"].instance_group[0].count == 2 and parsed["rpiae"].max_batch_size == 8
    r = runner.invoke(cli, ["triton", "--model", str(bundle_all.root), "--out", str(repo)])
    assert r.exit_code == 1 and "already exists" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["triton", "--model", str(bundle_all.root), "--platform", "tensorrt", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "has no TensorRT engines (has: none)" in r.output and "rpiae export --target trt" in r.output
    r = runner.invoke(cli, ["triton", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "y")])
    assert r.exit_code == 1 and "Traceback" not in r.output


# -- the client example against a stand-in server --------------------------------------------
class _Response:
    def __init__(self, outputs):
        self._outputs = outputs

    def as_numpy(self, name):
        return self._outputs[name]


class FakeTriton:
    """Serves a model repository in-process the way Triton would: reads each config.pbtxt
    with the model-config protobuf, enforces max_batch_size, runs model.onnx with ONNX
    Runtime and follows the ensemble's steps."""

    def __init__(self, repo: Path) -> None:
        import onnxruntime as ort

        self.configs = {d.name: parse_config((d / "config.pbtxt").read_text()) for d in repo.iterdir() if d.is_dir()}
        self.sessions = {n: ort.InferenceSession(str(repo / n / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
                         for n, c in self.configs.items() if c.platform == "onnxruntime_onnx"}
        self.batches: list[int] = []

    def get_model_metadata(self, model, as_json=False):
        c = self.configs[model]
        return {"name": model, "inputs": [{"name": t.name} for t in c.input], "outputs": [{"name": t.name} for t in c.output]}

    def get_model_config(self, model, as_json=False):
        return {"config": {"name": model, "max_batch_size": self.configs[model].max_batch_size}}

    def _run(self, model, tensors):
        c = self.configs[model]
        if c.platform == "ensemble":
            pool = dict(tensors)
            for step in c.ensemble_scheduling.step:
                out = self._run(step.model_name, {k: pool[v] for k, v in step.input_map.items()})
                pool.update({v: out[k] for k, v in step.output_map.items()})
            return {t.name: pool[t.name] for t in c.output}
        sess = self.sessions[model]
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, tensors)))

    def infer(self, model, inputs, outputs=None, **kw):
        c = self.configs[model]
        tensors = {}
        for i in inputs:
            assert i.datatype() == "FP32"
            tensors[i.name()] = np.frombuffer(i._get_content(), dtype=np.float32).reshape(i.shape())
            assert list(tensors[i.name()].shape[1:]) == list(next(t for t in c.input if t.name == i.name()).dims)
        n = next(iter(tensors.values())).shape[0]
        assert n <= c.max_batch_size, "Triton rejects batches above max_batch_size"
        self.batches.append(n)
        result = self._run(model, tensors)
        return _Response({o.name(): result[o.name()] for o in outputs} if outputs else result)


def _client_module():
    spec = importlib.util.spec_from_file_location("triton_client", ROOT / "examples" / "triton_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_client_example_round_trip(tmp_path, bundle_all, sample_photos):
    repo = tmp_path / "repo"
    write_model_repository(bundle_all, repo, precision="fp32", max_batch=2)
    server = FakeTriton(repo)
    client = _client_module()
    out = client.infer(server, "rpiae", sample_photos[:5])
    assert server.batches == [2, 2, 1]
    assert out["latent"].shape == (5, 64, 16, 16) and out["image"].shape == (5, 3, 256, 256)
    from rpiae.engines import load_backend

    with load_backend(bundle_all.root, backend="ort", precision="fp32") as be:
        z = be.encode(sample_photos[:5])
        np.testing.assert_allclose(out["latent"], z, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["image"], be.decode(z), rtol=1e-4, atol=1e-4)
    enc = client.infer(server, "rpiae_encode", sample_photos[:3])
    assert list(enc) == ["latent"]
    with pytest.raises(SystemExit) as e:
        client.main(["--help"])
    assert e.value.code == 0


def test_default_precision_follows_the_instance_kind(tmp_path, bundle_all):
    from rpiae.export.triton import choose

    assert choose(bundle_all, "auto") == ("onnxruntime", "fp32")  # ONNX Runtime on CPUs: fp32 is fastest there
    assert choose(bundle_all, "onnxruntime", instance_kind="gpu") == ("onnxruntime", "fp16")
    assert choose(bundle_all, "onnxruntime", "int8") == ("onnxruntime", "int8")
    b = _with_fake_engines(bundle_all, tmp_path / "b", precision="int8")
    assert choose(b) == ("tensorrt", "int8")
    assert choose(b, precision="fp16") == ("onnxruntime", "fp16")  # no fp16 engine: its ONNX graph


# -- python-backend repositories (served for real in test_triton_served.py) ---------------------
def test_python_repository_layout(tmp_path, bundle_all):
    import os

    repo = tmp_path / "repo"
    summary = write_model_repository(bundle_all, repo, precision="int8", platform="python", backend="ort",
                                     instances=2, max_batch=6, threads=1, python_env="/opt/env")
    assert summary["platform"] == "python" and summary["backend"] == "ort" and summary["python_env"] == "/opt/env"
    parsed = _check_repo_dir(repo)
    for graph, (inp, out) in {"encode": ("images", "latent"), "decode": ("latent", "image")}.items():
        c = parsed[f"rpiae_{graph}"]
        assert c.backend == "python" and not c.platform and c.max_batch_size == 6
        assert (c.input[0].name, c.output[0].name) == (inp, out)
        assert c.input[0].data_type == model_config_pb2.TYPE_FP32  # the backend casts; the wire is float32
        params = {k: v.string_value for k, v in c.parameters.items()}
        assert params == {"rpiae_graph": graph, "rpiae_backend": "ort", "rpiae_precision": "int8", "rpiae_bundle": "bundle",
                          "rpiae_threads": "1", "EXECUTION_ENV_PATH": "/opt/env"}
        assert c.instance_group[0].count == 2 and c.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        model_py = (repo / f"rpiae_{graph}" / "1" / "model.py").read_text()
        assert "class TritonPythonModel" in model_py and "GraphModel" in model_py
        # the model's own bundle: its graph only, hash-checked, listed by a pruned manifest
        sub = Bundle.open(repo / f"rpiae_{graph}" / "bundle")
        assert sorted(sub.files) == [f"{graph}.int8.onnx"]
        sub.verify_all()
        assert sha256_file(sub.root / f"{graph}.int8.onnx") == bundle_all.files[f"{graph}.int8.onnx"].sha256
    assert not (repo / "bundle").exists()  # nothing at the top level but models
    assert all((repo / m / "config.pbtxt").is_file() for m in os.listdir(repo))


def test_python_repository_with_the_torch_backend_and_refusals(tmp_path, bundle_all):
    from rpiae.export.triton import choose

    assert choose(bundle_all, "python", backend="torch") == ("python", "fp32")
    assert choose(bundle_all, "python", "bf16", backend="torch") == ("python", "bf16")
    repo = tmp_path / "torch"
    write_model_repository(bundle_all, repo, platform="python", backend="torch", python_env=None)
    for graph in ("encode", "decode"):
        sub = Bundle.open(repo / f"rpiae_{graph}" / "bundle")
        assert sorted(sub.files) == ["model.safetensors"]
        params = parse_config((repo / f"rpiae_{graph}" / "config.pbtxt").read_text()).parameters
        assert "EXECUTION_ENV_PATH" not in params  # the server's own Python
    with pytest.raises(BundleError, match="has no int8 weights"):
        choose(bundle_all, "python", "int8", backend="torch")
    with pytest.raises(BundleError, match="TensorRT engines"):
        write_model_repository(bundle_all, tmp_path / "t", platform="python", backend="trt", instance_kind="gpu")
    b = _with_fake_engines(bundle_all, tmp_path / "b", precision="fp16")
    with pytest.raises(ValueError, match="GPU instances only"):
        write_model_repository(b, tmp_path / "t2", platform="python", backend="trt", precision="fp16")
    with pytest.raises(ValueError, match="unknown backend"):
        choose(bundle_all, "python", backend="nope")


def test_cli_triton_python_and_serve_errors(tmp_path, bundle_all, monkeypatch):
    runner = CliRunner()
    repo = tmp_path / "repo"
    r = runner.invoke(cli, ["triton", "--model", str(bundle_all.root), "--platform", "python", "--out", str(repo)])
    assert r.exit_code == 0, r.output
    assert "python (ort backend) fp32" in r.output and f"rpiae serve {repo}" in r.output
    assert "must have rpiae installed" in r.output
    _check_repo_dir(repo)
    r = runner.invoke(cli, ["triton", "--model", str(bundle_all.root), "--backend", "torch", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "apply to --platform python" in r.output
    monkeypatch.setenv("RPIAE_TRITONSERVER", str(tmp_path / "no-such-tritonserver"))
    r = runner.invoke(cli, ["serve", str(repo)])
    assert r.exit_code == 1 and "no such tritonserver binary" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, ["serve", str(tmp_path / "nothing")])
    assert r.exit_code == 2
