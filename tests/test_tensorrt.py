"""TensorRT: everything around the engine on the CPU (profiles, layer-precision check,
manifest entries and refusal, missing TensorRT, the backend's wiring, the CLI), the API
used checked against TensorRT's stubs, and engine build + parity on a GPU with TensorRT."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rpiae.cli.main import main as cli
from rpiae.engines import BackendUnavailable
from rpiae.engines import tensorrt as T
from rpiae.export import Bundle, BundleError
from rpiae.export import tensorrt as B
from rpiae.export import trt_precision as P
from rpiae.export.bundle import WEIGHTS
from rpiae.export.manifest import engine_name
from rpiae.export.profile import BatchProfile

ROOT = Path(__file__).resolve().parents[1]
# the two modules that talk to TensorRT: building engines, and running them
TRT_MODULES = (ROOT / "export" / "tensorrt.py", ROOT / "engines" / "tensorrt.py")
STUBS_VERSION = "10.13.0.35.1"
BUILT_ENV = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}

_GPU_SKIP = ("TensorRT not installed" if not T.tensorrt_available()
             else "CUDA not available" if not torch.cuda.is_available() else None)
requires_trt_gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=_GPU_SKIP or "")


# -- realistic engine-inspector JSON ----------------------------------------------------------
def _t(name, dtype, dims, trt11=False):
    if trt11:
        return {"Name": name, "Location": "Device", "Dimensions": dims, "Datatype": dtype.split()[0],
                "Format": "Row major linear"}
    return {"Name": name, "Location": "Device", "Dimensions": dims, "Format/Datatype": dtype}


def _layer(name, ltype, ins, outs, **extra):
    return {"Name": name, "LayerType": ltype, "Inputs": ins, "Outputs": outs, "TacticValue": "0x0000000000000001",
            "StreamId": 0, "Metadata": f"[ONNX Layer: {name}]", **extra}


def vit_engine_json(low="Half", fp32_fmt="Float", trt11=False, layers_per_block=4, blocks=4):
    """An engine-information JSON shaped like TensorRT's for a small ViT: reformat/cast in,
    per block LayerNorm (fp32) + GEMMs/attention in `low`, reformat out."""
    b = [1, 257, 256]
    layers = [_layer("Reformatting CopyNode for Input Tensor 0 to /patch/Conv", "Reformat",
                     [_t("images", "Row major linear FP32", [1, 3, 256, 256], trt11)],
                     [_t("Reformatted images", "Channel major FP16 format where channel % 8 == 0", [1, 3, 256, 256], trt11)]),
              _layer("/patch/Conv", "CaskConvolution", [_t("Reformatted images", low, [1, 3, 256, 256], trt11)],
                     [_t("/patch/Conv_output_0", low, [1, 256, 16, 16], trt11)], ParameterType="Convolution")]
    for i in range(blocks):
        layers.append(_layer(f"/blocks.{i}/norm1/LayerNormalization", "kgen", [_t(f"x{i}", fp32_fmt, b, trt11)],
                             [_t(f"n{i}", fp32_fmt, b, trt11)]))
        for j in range(layers_per_block):
            layers.append(_layer(f"/blocks.{i}/gemm{j}", "gemm", [_t(f"n{i}_{j}", low, b, trt11)],
                                 [_t(f"g{i}_{j}", low, b, trt11)]))
        layers.append(_layer(f"/blocks.{i}/shape", "Shape", [_t(f"g{i}", low, b, trt11)], [_t(f"s{i}", "Int64", [3], trt11)]))
    layers.append(_layer("/head/Cast", "Cast", [_t("h", low, b, trt11)], [_t("latent", fp32_fmt, [1, 64, 16, 16], trt11)]))
    io = ({"I/O Tensors": [{"Name": "images", "IOMode": "Input", "DataType": "Float"}]} if trt11
          else {"Bindings": ["images", "latent"]})
    return json.dumps({"Layers": layers, **io})


def test_layer_precision_of_realistic_tensor_descriptions():
    assert P.tensor_dtype({"Format/Datatype": "Row major linear FP32"}) == "fp32"
    assert P.tensor_dtype({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}) == "fp16"
    assert P.tensor_dtype({"Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format."}) == "int8"
    assert P.tensor_dtype({"Format/Datatype": "Half"}) == "fp16"
    assert P.tensor_dtype({"Format/Datatype": "Float"}) == "fp32"
    assert P.tensor_dtype({"Datatype": "BFloat16", "Format": "Row major linear FP32 format (kLINEAR)"}) == "bf16"
    assert P.tensor_dtype({"Datatype": "Half", "Format": "Row major linear FP32 format (kLINEAR)"}) == "fp16"  # TRT 11
    assert P.tensor_dtype({"Format/Datatype": "Row major linear Int64"}) is None
    assert P.tensor_dtype({"Format/Datatype": "Row major linear UInt8"}) is None
    assert P.tensor_dtype({"Name": "x"}) is None
    assert P.tensor_dtype({"Data Type": "Half", "Name": "Float gelu"}) == "fp16"  # only the type's own key counts
    # a Q/DQ boundary counts as int8, a cast as its lowest float type
    assert P.layer_precision({"Inputs": [{"Format/Datatype": "Float"}], "Outputs": [{"Format/Datatype": "Int8"}]}) == "int8"
    assert P.layer_precision({"Inputs": [{"Format/Datatype": "Float"}], "Outputs": [{"Format/Datatype": "Half"}]}) == "fp16"
    assert P.layer_precision({"Inputs": [], "Outputs": [{"Format/Datatype": "Int32"}]}) is None


@pytest.mark.parametrize("trt11", [False, True], ids=["trt10-format", "trt11-format"])
def test_fp16_engine_passes_and_summary_counts_compute_layers(trt11):
    s = P.layer_precision_summary(vit_engine_json(trt11=trt11))
    # reformat, shape and cast layers are not compute layers
    assert s["counted"] == 1 + 4 * (1 + 4)
    assert s["by_precision"] == {"fp16": 17, "fp32": 4}
    assert s["fp32_share"] == round(4 / 21, 4) and s["low_precision_share"] == round(17 / 21, 4)
    assert s["fp32_layers"][0] == "/blocks.0/norm1/LayerNormalization"
    assert s["by_layer_type"]["gemm"] == {"fp16": 16}
    P.check_layer_precisions(s, "fp16", "encode.fp16")
    json.dumps(s)  # goes into the manifest as is


def test_engine_silently_in_fp32_fails_the_check():
    s = P.layer_precision_summary(vit_engine_json(low="Row major linear FP32"))
    assert s["fp32_share"] == 1.0
    P.check_layer_precisions(s, "fp32")  # fine for an fp32 engine
    for precision in ("fp16", "int8", "bf16"):
        with pytest.raises(P.EnginePrecisionError, match="runs 100% of its compute layers in fp32|without a single int8"):
            P.check_layer_precisions(s, precision, "decode." + precision)


def test_int8_engine_needs_int8_layers():
    int8 = P.layer_precision_summary(vit_engine_json(low="Thirty-two wide channel vectorized row major Int8 format."))
    assert int8["by_precision"]["int8"] == 17
    P.check_layer_precisions(int8, "int8")
    fp16_only = P.layer_precision_summary(vit_engine_json(low="Half"))
    with pytest.raises(P.EnginePrecisionError, match="without a single int8 layer"):
        P.check_layer_precisions(fp16_only, "int8")
    # mostly-fp32 threshold is a parameter (int8 graphs whose other layers are fp32 pass 1.0)
    mostly32 = P.layer_precision_summary(vit_engine_json(low="Int8", layers_per_block=1, blocks=4))
    mostly32["fp32_share"] = 0.6
    with pytest.raises(P.EnginePrecisionError):
        P.check_layer_precisions(mostly32, "int8")
    P.check_layer_precisions(mostly32, "int8", max_fp32_share=1.0)


def test_layer_information_in_other_shapes():
    layers = json.loads(vit_engine_json())["Layers"]
    # a list of per-layer JSON strings (get_layer_information per index) gives the same summary
    per_layer = [json.dumps(x) for x in layers]
    assert P.layer_precision_summary(per_layer) == P.layer_precision_summary(vit_engine_json())
    assert P.layer_precision_summary(layers[1])["by_precision"] == {"fp16": 1}
    # built without detailed profiling verbosity: names only, cannot be checked
    with pytest.raises(P.EnginePrecisionError, match="ProfilingVerbosity.DETAILED"):
        P.layer_precision_summary(json.dumps({"Layers": ["/patch/Conv", "/blocks.0/gemm0"], "Bindings": ["images"]}))
    with pytest.raises(P.EnginePrecisionError, match="no typed compute layers"):
        P.check_layer_precisions(P.layer_precision_summary({"Layers": []}), "fp16")


# -- profiles -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [("1:8:32", (1, 8, 32)), ("8", (8, 8, 8)), ("1:32", (1, 32, 32)),
                                           (" 2:4:4", (2, 4, 4))])
def test_batch_profile_parse(text, expected):
    p = BatchProfile.parse(text)
    assert (p.min, p.opt, p.max) == expected
    assert BatchProfile.parse(str(p)) == p and p.to_dict() == dict(zip(("min", "opt", "max"), expected))


@pytest.mark.parametrize("text", ["0:1:2", "8:4:2", "1:16:8", "a:b", "1:2:3:4", "", "-1"])
def test_batch_profile_rejects(text):
    with pytest.raises(ValueError, match="batch profile"):
        BatchProfile.parse(text)


# -- engine entries and refusal ----------------------------------------------------------------
def engine_entry(**over):
    return {"kind": "trt-engine", "graph": "encode", "precision": "fp16", "profile": {"min": 1, "opt": 8, "max": 32},
            **BUILT_ENV, "onnx": "encode.fp16.onnx", "onnx_sha256": "0" * 64, **over}


def test_engine_compat_accepts_same_version_and_capability():
    T.check_engine_compat(engine_entry(), dict(BUILT_ENV))
    # another GPU model of the same compute capability runs the same plan
    T.check_engine_compat(engine_entry(), {**BUILT_ENV, "gpu": "NVIDIA H100 PCIe"})


@pytest.mark.parametrize("env,words", [
    ({**BUILT_ENV, "tensorrt": "10.14.1.48"}, ["TensorRT 10.13.0.35 (here: 10.14.1.48)"]),
    ({**BUILT_ENV, "compute_capability": "8.9", "gpu": "NVIDIA L4"}, ["compute capability 9.0", "here: 8.9 on NVIDIA L4"]),
    ({"tensorrt": "11.1.0.4", "compute_capability": "12.0", "gpu": "NVIDIA RTX PRO 6000"}, ["TensorRT 10.13.0.35", "and compute"]),
])
def test_engine_compat_refuses_other_environments(env, words):
    with pytest.raises(T.EngineMismatch) as e:
        T.check_engine_compat(engine_entry(profile={"min": 1, "opt": 4, "max": 16}), env, "/b", "engines/encode.fp16.plan")
    msg = str(e.value)
    assert "\n" not in msg and "/b/engines/encode.fp16.plan" in msg
    assert "Rebuild it on this machine: rpiae export --target trt --precision fp16 --batch 1:4:16 --out /b" in msg
    for w in words:
        assert w in msg
    assert isinstance(e.value, BackendUnavailable)  # the CLI shows it as one line


@pytest.mark.parametrize("here,ok", [
    ("10.13.0.35", True), ("10.14.1.48", True), ("11.1.0.4", True),  # the same or a later 10.x, or 11
    ("10.12.0.36", False), ("12.0.0.1", False),  # older, or two majors on
])
def test_version_compatible_engines_run_on_later_tensorrt(here, ok):
    entry = engine_entry(version_compatible=True)
    env = {**BUILT_ENV, "tensorrt": here}
    if ok:
        T.check_engine_compat(entry, env)
    else:
        with pytest.raises(T.EngineMismatch, match=r"TensorRT 10.13.0.35 \(version-compatible\).*--version-compatible"):
            T.check_engine_compat(entry, env)
    with pytest.raises(T.EngineMismatch):  # still tied to the compute capability it was built for
        T.check_engine_compat(entry, {**env, "compute_capability": "8.9"})
    if here != BUILT_ENV["tensorrt"]:  # and an ordinary engine only runs where it was built
        with pytest.raises(T.EngineMismatch):
            T.check_engine_compat(engine_entry(), env)


def fake_bundle(root: Path, model=None, engines=("fp16",), env=BUILT_ENV, source=None) -> Bundle:
    """A bundle with empty ONNX graphs (only their metadata is real) and engine entries (what a
    GPU machine's export would record), for everything that must be decided before TensorRT is
    touched."""
    import onnx

    from rpiae.config import get_preset
    from rpiae.export.onnx_export import set_metadata

    config = model.config if model is not None else get_preset("tiny")
    root.mkdir(parents=True)
    b = Bundle.new(root, config, source or {"path": None, "sha256": None}, 18)
    if model is not None:
        model.save(root / WEIGHTS)
        b.add_file(WEIGHTS, kind="weights", dtype="float32")
    for graph in ("encode", "decode"):
        for p in ("fp32", "fp16"):
            proto = onnx.helper.make_model(onnx.helper.make_graph([], graph, [], []))
            set_metadata(proto, config, graph, p)
            onnx.save(proto, str(root / f"{graph}.{p}.onnx"))
            b.add_file(f"{graph}.{p}.onnx", kind="onnx", graph=graph, precision=p)
        for p in engines:
            name = engine_name(graph, p)
            (root / "engines").mkdir(exist_ok=True)
            (root / name).write_bytes(b"plan " + graph.encode())
            b.add_file(name, **engine_entry(graph=graph, precision=p, **env, onnx=f"{graph}.{p}.onnx"))
    b.manifest.precisions = ["fp32", "fp16"]
    b.write_manifest()
    return Bundle.open(root)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail here even where TensorRT is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def fake_gpu(monkeypatch):
    """TensorRT 'present' on a GPU of compute capability 8.9 (no TensorRT call is made)."""
    env = {"tensorrt": "10.13.0.35", "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    for module in (T, B):  # the runtime's names and the builder's
        monkeypatch.setattr(module, "import_tensorrt", lambda: object())
        monkeypatch.setattr(module, "require_cuda", lambda device=None: torch.device("cpu"))
        monkeypatch.setattr(module, "current_environment", lambda device=None: dict(env))
    return env


def test_backend_refuses_engines_built_elsewhere(tmp_path, fake_gpu):
    from rpiae.engines.trt_backend import TRTBackend

    bundle = fake_bundle(tmp_path / "b")
    with pytest.raises(T.EngineMismatch, match=r"compute capability 9\.0 on NVIDIA H100.*here: 8\.9 on NVIDIA L4.*"
                                               r"rpiae export --target trt --precision fp16 --batch 1:8:32"):
        TRTBackend(bundle, precision="fp16")
    with pytest.raises(BundleError, match=r"no int8 TensorRT encode engine \(has: fp16\).*--target trt --precision int8"):
        TRTBackend(bundle, precision="int8")


# -- missing TensorRT ------------------------------------------------------------------------
def test_missing_tensorrt_is_one_line(no_tensorrt):
    with pytest.raises(BackendUnavailable) as e:
        T.import_tensorrt()
    assert str(e.value) == T.TRT_MISSING and "\n" not in str(e.value) and "gpu-cu13" in str(e.value) and "gpu-cu12" in str(e.value)
    assert not T.tensorrt_available()


def test_type_stubs_alone_are_not_tensorrt(monkeypatch):
    # tensorrt-stubs installed into site-packages leaves an importable, empty `tensorrt`
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendUnavailable, match="empty `tensorrt` package"):
        T.import_tensorrt()


def test_missing_tensorrt_in_backend_and_builder(tmp_path, no_tensorrt):
    from rpiae.engines import load_backend

    bundle = fake_bundle(tmp_path / "b")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        load_backend(bundle.root, backend="trt", precision="fp16")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        B.build_bundle_engines(bundle, ["fp16"], BatchProfile(1, 8, 32))


# -- CLI --------------------------------------------------------------------------------------
def _one_line_error(result, *words):
    out = result.output
    assert result.exit_code == 1, out
    assert "Traceback" not in out and isinstance(result.exception, SystemExit), out
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, out
    for w in words:
        assert w in errors[0], out


def test_cli_without_tensorrt(tmp_path, no_tensorrt, tiny_model, tiny_ckpt, photos):
    from rpiae.checkpoints import checkpoint_sha256

    source = {"path": tiny_ckpt, "sha256": checkpoint_sha256(tiny_ckpt)}
    bundle = fake_bundle(tmp_path / "b", model=tiny_model, source=source)
    runner = CliRunner()
    # the ONNX graphs of the checkpoint's bundle are reused; the engine build then needs TensorRT
    r = runner.invoke(cli, ["export", "--target", "trt", "--checkpoint", tiny_ckpt, "--precision", "fp16", "--batch",
                            "1:4:8", "--out", str(bundle.root)])
    _one_line_error(r, "TensorRT is not installed: install one GPU stack", "constraints/gpu-cu13.txt")
    from rpiae.imageio import save_image

    img = save_image(photos[0], tmp_path / "a.png")
    r = runner.invoke(cli, ["encode", "--model", str(bundle.root), "--backend", "trt", "--precision", "fp16", str(img),
                            "-o", str(tmp_path / "z.npy")])
    _one_line_error(r, "TensorRT is not installed")
    assert not (tmp_path / "z.npy").exists()
    r = runner.invoke(cli, ["verify", "--model", str(bundle.root), "--backend", "trt", "--batch", "1"])
    _one_line_error(r, "TensorRT is not installed")


def test_cli_refuses_engine_from_another_gpu(tmp_path, fake_gpu, photos):
    from rpiae.imageio import save_image

    bundle = fake_bundle(tmp_path / "b")
    img = save_image(photos[0], tmp_path / "a.png")
    r = CliRunner().invoke(cli, ["encode", "--model", str(bundle.root), "--backend", "trt", "--precision", "fp16",
                                 str(img), "-o", str(tmp_path / "z.npy")])
    _one_line_error(r, "compute capability 9.0", "here: 8.9", "Rebuild it on this machine: rpiae export --target trt")


def test_cli_export_rejects_bad_profile(tmp_path):
    r = CliRunner().invoke(cli, ["export", "--target", "trt", "--batch", "8:4:2", "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "batch profile" in r.output and "Traceback" not in r.output


# -- the TensorRT API this project uses, against TensorRT's own stubs ------------------------
# Documented as removed in TensorRT 11 (NVIDIA, "Migrating from TensorRT 10.x to 11.x", Python API
# reference: "removed in TensorRT 11.x and will cause runtime errors if called"), and absent from
# TensorRT 11.1's Python bindings; all present in the 10.13 stubs. BuilderFlag.DIRECT_IO is listed
# as removed there, still bound in 11.0/11.1 and "deprecated" in 11.4's C++ reference: kept here as
# never to be used. The `_v2` device-memory calls are the TensorRT 11 replacements (not listed).
TRT11_REMOVED = {
    "BuilderFlag.FP16", "BuilderFlag.INT8", "BuilderFlag.BF16", "BuilderFlag.FP8", "BuilderFlag.INT4", "BuilderFlag.FP4",
    "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS", "BuilderFlag.DIRECT_IO",
    "IBuilderConfig.int8_calibrator", "IBuilderConfig.set_calibration_profile", "IBuilderConfig.get_calibration_profile",
    "IBuilderConfig.set_quantization_flag", "IBuilderConfig.get_quantization_flag", "IBuilderConfig.quantization_flags",
    "IBuilderConfig.clear_quantization_flag", "IBuilderConfig.algorithm_selector",
    "ICudaEngine.device_memory_size", "ICudaEngine.get_device_memory_size_for_profile",
    "ICudaEngine.create_execution_context_without_device_memory",
    "Builder.platform_has_fast_fp16", "Builder.platform_has_fast_int8", "Builder.platform_has_tf32",
    "IInt8Calibrator", "IInt8EntropyCalibrator", "IInt8EntropyCalibrator2", "IInt8LegacyCalibrator", "IInt8MinMaxCalibrator",
    "CalibrationAlgoType", "QuantizationFlag", "IAlgorithm", "IAlgorithmContext", "IAlgorithmIOInfo", "IAlgorithmSelector",
    "IAlgorithmVariant", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
}
# which TensorRT class each variable of the two TensorRT modules holds
VAR_TYPES = {
    "logger": "Logger", "builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
    "tensor": "ITensor", "config": "IBuilderConfig", "cache": "ITimingCache",
    "plan": "IHostMemory", "_runtime": "Runtime", "engine": "ICudaEngine",
    "inspector": "EngineInspector", "context": "IExecutionContext",
}


def _stubs_dir() -> Path | None:
    candidates = [os.environ.get("RPIAE_TRT_STUBS"), Path(sys.prefix) / "tensorrt-stubs"]
    for c in candidates:
        if c and (Path(c) / "tensorrt_bindings" / "tensorrt.pyi").is_file():
            return Path(c)
    try:
        from importlib import metadata

        dist = metadata.distribution("tensorrt-stubs")
        p = Path(dist.locate_file("tensorrt_bindings/tensorrt.pyi"))
        return p.parents[1] if p.is_file() else None
    except Exception:
        return None


@pytest.fixture(scope="module")
def trt_api() -> dict[str, set[str]]:
    """{class: members (own + inherited)} and {"<module>": top-level names} from the stubs,
    read as text (the .pyi is not valid Python for mypy nor for ast)."""
    d = _stubs_dir()
    if d is None and os.environ.get("CI") == "true":  # .ci/run installs them: a silent skip would hide a broken step
        pytest.fail(f"tensorrt-stubs=={STUBS_VERSION} not found under {sys.prefix}/tensorrt-stubs (see .ci/run)")
    if d is None:
        pytest.skip(f"tensorrt-stubs not installed: pip install --no-deps --target $VIRTUAL_ENV/tensorrt-stubs "
                    f"tensorrt-stubs=={STUBS_VERSION}")
    classes: dict[str, set[str]] = {}
    bases: dict[str, list[str]] = {}
    current = None
    for line in (d / "tensorrt_bindings" / "tensorrt.pyi").read_text().splitlines():
        if m := re.match(r"^class (\w+)(?:\(([^)]*)\))?:", line):
            current = m.group(1)
            classes[current] = set()
            bases[current] = [b.strip().split(".")[-1] for b in (m.group(2) or "").split(",") if b.strip()]
        elif not line.startswith((" ", "\t")) and line.strip():
            current = None
        elif current and (m := re.match(r"^    (?:def |class )?(\w+)\s*[:(=]", line)):
            classes[current].add(m.group(1))

    def members(c: str) -> set[str]:
        out = set(classes.get(c, ()))
        for b in bases.get(c, ()):
            out |= members(b)
        return out

    api = {c: members(c) for c in classes}
    init = (d / "tensorrt" / "__init__.pyi").read_text()
    top = set(re.findall(r"^(?:def |class )?(\w+)\s*[:(=]", init, flags=re.M))
    top |= set(re.findall(r"'(\w+)'", init.split("__all__", 1)[1].split("]", 1)[0]))
    api["<module>"] = top
    return api


def _receiver(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def tensorrt_uses(*paths: Path) -> set[str]:
    """Every TensorRT API the modules touch: `trt.X`, `trt.X.Y` and `<var>.attr` on the
    variables that hold TensorRT objects (VAR_TYPES)."""
    used = set()
    for node in (n for path in paths or TRT_MODULES for n in ast.walk(ast.parse(path.read_text()))):
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Name) and node.value.id == "trt":
            used.add(node.attr)
        elif (isinstance(node.value, ast.Attribute) and isinstance(node.value.value, ast.Name)
              and node.value.value.id == "trt"):
            used.add(f"{node.value.attr}.{node.attr}")
        elif (name := _receiver(node.value)) in VAR_TYPES:
            used.add(f"{VAR_TYPES[name]}.{node.attr}")
    return used


def test_removed_list_names_real_tensorrt10_apis(trt_api):
    for item in sorted(TRT11_REMOVED):
        cls, _, member = item.partition(".")
        assert cls in trt_api, item
        assert not member or member in trt_api[cls], item


def api_problems(used: set[str], trt_api) -> tuple[list[str], list[str]]:
    """(not in the TensorRT 10.13 API, removed in TensorRT 11) among `used`."""
    missing, removed = [], []
    for item in sorted(used):
        cls, _, member = item.partition(".")
        ok = (item in trt_api["<module>"] or item == "__version__") if not member else member in trt_api.get(cls, ())
        if not ok:
            missing.append(item)
        if item in TRT11_REMOVED or cls in TRT11_REMOVED:
            removed.append(item)
    return missing, removed


def test_every_tensorrt_api_used_exists_and_survives_tensorrt11(trt_api):
    used = tensorrt_uses()
    assert {"IExecutionContext.execute_async_v3", "IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address",
            "EngineInspector.get_engine_information", "LayerInformationFormat.JSON", "MemoryPoolType.WORKSPACE",
            "IBuilderConfig.set_timing_cache", "Runtime.engine_host_code_allowed", "INetworkDefinition.get_input"} <= used, used
    missing, removed = api_problems(used, trt_api)
    assert not missing, f"not in the TensorRT {STUBS_VERSION} API: {missing}"
    assert not removed, f"removed in TensorRT 11: {removed}"


def test_api_check_catches_misspelt_and_removed_apis(tmp_path, trt_api):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def build(trt, builder, config, engine, context):\n"
        "    config.set_flag(trt.BuilderFlag.FP16)\n"
        "    config.int8_calibrator = trt.IInt8EntropyCalibrator2()\n"
        "    n = engine.device_memory_size + engine.num_bindings\n"
        "    context.execute_async_v2([], 0)\n"
    )
    missing, removed = api_problems(tensorrt_uses(bad), trt_api)
    assert set(missing) == {"ICudaEngine.num_bindings", "IExecutionContext.execute_async_v2"}
    assert set(removed) == {"BuilderFlag.FP16", "IBuilderConfig.int8_calibrator", "IInt8EntropyCalibrator2",
                            "ICudaEngine.device_memory_size"}


def test_every_tensorrt_object_is_tracked():
    """Each value produced by a TensorRT call is held in a variable VAR_TYPES knows, so the
    check above sees every attribute used on it."""
    trees = [ast.parse(path.read_text()) for path in TRT_MODULES]
    untracked = []
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute):
            base = _receiver(node.value.func.value)
            if base == "trt" or base in VAR_TYPES:
                for target in node.targets:
                    name = _receiver(target)
                    if name not in VAR_TYPES:
                        untracked.append(ast.unparse(node))
    assert not untracked, untracked
    nodes = [n for tree in trees for n in ast.walk(tree)]
    names = {n.id for n in nodes if isinstance(n, ast.Name)} | {n.attr for n in nodes if isinstance(n, ast.Attribute)}
    assert set(VAR_TYPES) <= names, set(VAR_TYPES) - names  # the map does not rot


def test_progress_monitor_overrides_real_methods(trt_api):
    tree = ast.parse(TRT_MODULES[0].read_text())
    monitors = [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.bases and "IProgressMonitor" in ast.unparse(c.bases[0])]
    assert monitors
    defined = {f.name for f in monitors[0].body if isinstance(f, ast.FunctionDef)} - {"__init__"}
    assert defined == {"phase_start", "step_complete", "phase_finish"} <= trt_api["IProgressMonitor"]


def test_tensorrt_is_imported_lazily_and_only_in_its_two_modules():
    for module in TRT_MODULES:
        top = [n for n in ast.parse(module.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not any("tensorrt" in ast.unparse(n).split() for n in top)
    for path in [*(ROOT / "engines").glob("*.py"), *(ROOT / "export").glob("*.py")]:
        if path in TRT_MODULES:
            continue
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Import):
                assert all(a.name.split(".")[0] != "tensorrt" for a in n.names), path
            if isinstance(n, ast.ImportFrom):
                assert (n.module or "").split(".")[0] != "tensorrt", path
    # importing the project never imports TensorRT
    code = ("import sys, rpiae.engines.tensorrt, rpiae.engines.trt_backend, rpiae.export.tensorrt, rpiae.export.triton, "
            "rpiae.cli.triton_cmd;"
            "sys.exit('tensorrt' in sys.modules)")
    import subprocess

    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# -- on a GPU with TensorRT ------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory, bundle_all):
    """The session's fp32/fp16/int8 bundle, copied, with engines for every precision."""
    root = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(bundle_all.root, root)
    bundle = Bundle.open(root)
    B.build_bundle_engines(bundle, ["fp32", "fp16", "int8"], BatchProfile(1, 4, 8), workspace_gb=2.0,
                           timing_cache=root.parent / "timing.cache", opt_level=3, progress=False)
    return Bundle.open(root)


@pytest.mark.gpu
@requires_trt_gpu
def test_engines_are_recorded_and_typed(engine_bundle):
    env = T.current_environment()
    assert engine_bundle.precisions("trt-engine") == ["fp32", "fp16", "int8"]
    for precision in ("fp32", "fp16", "int8"):
        for graph in ("encode", "decode"):
            e = engine_bundle.files[engine_name(graph, precision)]
            assert e["kind"] == "trt-engine" and e["profile"] == {"min": 1, "opt": 4, "max": 8}
            assert e["tensorrt"] == env["tensorrt"] and e["compute_capability"] == env["compute_capability"]
            assert e["onnx_sha256"] == engine_bundle.files[f"{graph}.{precision}.onnx"]["sha256"]
            lp = e["layer_precisions"]
            if precision != "fp32":
                assert lp["fp32_share"] <= T.MAX_FP32_SHARE, lp
            if precision == "int8":
                assert lp["by_precision"].get("int8", 0) > 0, lp
            assert engine_name(graph, precision) in engine_bundle.manifest.engines
    assert (engine_bundle.root.parent / "timing.cache").stat().st_size > 0


@pytest.mark.gpu
@requires_trt_gpu
def test_engine_parity_against_pytorch(engine_bundle, sample_photos):
    from rpiae.verify import verify_bundle

    report = verify_bundle(engine_bundle, backend="trt", images=sample_photos, batches=[1, 3, 8, 11], device="cuda")
    assert report["results"] and report["ok"], json.dumps(report["results"], indent=1)


@pytest.mark.gpu
@requires_trt_gpu
def test_engines_pass_polygraphys_comparison(engine_bundle, sample_photos):
    from rpiae.verify.polygraphy import compare_bundle

    report = compare_bundle(engine_bundle, backend="trt", images=sample_photos, batch=3, device="cuda")
    assert [r["precision"] for r in report["results"]] == ["fp32", "fp16", "int8"]
    assert report["ok"], json.dumps(report["results"], indent=1)


@pytest.mark.gpu
@requires_trt_gpu
def test_engine_backend_on_gpu_tensors_and_streams(engine_bundle, sample_photos):
    from rpiae.engines import load_backend

    x = torch.from_numpy(sample_photos[:5]).cuda()
    with load_backend(engine_bundle.root, backend="trt", precision="fp16", device="cuda") as be:
        z = be.encode(x)
        assert z.is_cuda and z.dtype == torch.float32 and z.shape == (5, 64, 16, 16)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            z2 = be.encode(x)
        s.synchronize()
        torch.testing.assert_close(z, z2)
        assert be.describe()["profile"] == "1:4:8"


@pytest.mark.gpu
@requires_trt_gpu
def test_cli_trt_end_to_end(tmp_path, engine_bundle, photos):
    from rpiae.imageio import save_image

    bundle = tmp_path / "b"
    shutil.copytree(engine_bundle.root, bundle)
    runner = CliRunner()
    r = runner.invoke(cli, ["export", "--target", "trt", "--precision", "fp16", "--batch", "1:2:4", "--out", str(bundle)])
    assert r.exit_code == 0, r.output
    b = Bundle.open(bundle)
    assert b.files[engine_name("encode", "fp16")]["profile"]["max"] == 4
    trt_rows = [row for row in b.manifest.parity if row.get("backend") == "trt"]  # the target's recorded parity
    assert trt_rows and all(row["ok"] and row["precision"] == "fp16" for row in trt_rows), trt_rows
    imgs = [str(save_image(p, tmp_path / f"{i}.png")) for i, p in enumerate(photos[:3])]
    r = runner.invoke(cli, ["encode", "-m", str(bundle), "-b", "trt", "-p", "fp16", "-d", "cuda", *imgs, "-o", str(tmp_path / "z.npy")])
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "z.npy").shape == (3, 64, 16, 16)
    r = runner.invoke(cli, ["verify", "-m", str(bundle), "-b", "trt", "-d", "cuda", "-p", "fp16", "--batch", "1,3"])
    assert r.exit_code == 0, r.output


@pytest.mark.gpu
@requires_trt_gpu
def test_version_compatible_engine_on_gpu(tmp_path, bundle_all, sample_photos):
    from rpiae.verify import verify_bundle

    root = tmp_path / "bundle"
    shutil.copytree(bundle_all.root, root)
    B.build_bundle_engines(Bundle.open(root), ["fp16"], BatchProfile(1, 2, 4), workspace_gb=2.0, progress=False,
                           version_compatible=True)
    bundle = Bundle.open(root)
    assert bundle.files[engine_name("encode", "fp16")]["version_compatible"] is True
    report = verify_bundle(bundle, backend="trt", images=sample_photos, batches=[3], device="cuda")
    assert report["ok"], json.dumps(report["results"], indent=1)


# -- the build and run code paths, against a stand-in `tensorrt` module ----------------------
# It implements the calls our module and polygraphy's loaders make (the stubs test above
# proves ours exist in TensorRT; polygraphy's real code runs on it), records them, and "runs"
# an engine on CPU memory: each output item is the mean of its input item. This exercises
# the Python around TensorRT without a GPU.
class FakeTRT:
    modules: list = []  # every stand-in made, so that a later one can replace an earlier one
    SHAPES = {"encode": (("images", (3, 256, 256)), ("latent", (64, 16, 16))),
              "decode": (("latent", (64, 16, 16)), ("image", (3, 256, 256)))}

    def __init__(self, version="10.13.0.35", layers=None, parse_ok=True, profile=(1, 4, 8), cache_matches=True):
        import ctypes
        import enum
        import types

        rec = self.record = {"flags": [], "pool": [], "shapes": [], "parsed": [], "phases": [], "contexts": 0,
                             "runs": [], "host_code": [], "waits": []}
        shapes, prof = self.SHAPES, profile
        trt11 = int(version.split(".")[0]) >= 11  # TensorRT 11's API: removals and the inspector's new schema
        layers = layers or vit_engine_json(trt11=trt11)
        m = self.module = types.ModuleType("tensorrt")
        m.__version__ = version
        FakeTRT.modules.append(m)

        def enum_(name, *members):  # string-valued, with the __members__ map polygraphy walks
            values = {k: f"{name}.{k}" for k in members}
            return type(name, (), {**values, "__members__": values})

        # 11 removed EXPLICIT_BATCH and the precision builder flags (STRONGLY_TYPED stays, ignored)
        m.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1} if trt11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        m.BuilderFlag = enum_("BuilderFlag", "TF32", *(() if trt11 else ("FP16", "INT8")), "VERSION_COMPATIBLE",
                              "EXCLUDE_LEAN_RUNTIME")
        m.MemoryPoolType = enum_("MemoryPoolType", "WORKSPACE")
        m.ProfilingVerbosity = enum_("ProfilingVerbosity", "DETAILED")
        m.LayerInformationFormat = enum_("LayerInformationFormat", "JSON")
        m.TensorIOMode = enum_("TensorIOMode", "INPUT", "OUTPUT")
        m.DeviceType = enum_("DeviceType", "GPU", "DLA")
        m.LayerType = enum_("LayerType", "SHAPE", "QUANTIZE", "DEQUANTIZE")
        m.DataType = enum_("DataType", "FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8")

        class Logger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = "internal_error", "error", "warning", "info", "verbose"

            def __init__(self, severity):
                assert severity == "warning"

        class ILogger:
            def __init__(self):
                pass

        class IProgressMonitor:
            def __init__(self):
                pass

        class Tensor:
            is_shape_tensor = False
            dtype = "DataType.FLOAT"

            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                rec["flags"].append(flags)
                self.graph = None
                self.num_inputs = 1

            def __iter__(self):  # polygraphy looks for layers with a precision set: none here
                return iter(())

            def get_input(self, i):
                name, shape = shapes[self.graph][0]
                return Tensor(name, (-1, *shape))

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0 if parse_ok else 1

            def parse_from_file(self, path):
                rec["parsed"].append(path)
                self.network.graph = Path(path).name.split(".")[0]
                return parse_ok

            def get_error(self, i):
                return "In node 3 (importMatMul): UNSUPPORTED_NODE"

        class TimingCache:
            def __init__(self, data):
                self.data = data

            def serialize(self):
                return b"timing cache after " + self.data

        class Config:
            builder_optimization_level = None
            profiling_verbosity = None
            progress_monitor = None
            DLA_core = -1
            default_device_type = "DeviceType.GPU"

            def __init__(self):
                self.flags = {"BuilderFlag.TF32"}  # TensorRT's default
                self.profiles = []

            @property
            def num_optimization_profiles(self):
                return len(self.profiles)

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def get_flag(self, flag):
                return flag in self.flags

            def set_memory_pool_limit(self, pool, size):
                rec["pool"].append((pool, size))

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

            def create_timing_cache(self, data):
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.data.startswith(b"other gpu") and not ignore_mismatch:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec["shapes"].append((name, tuple(lo), tuple(opt), tuple(hi)))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                self.config = Config()
                return self.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec["config"] = config
                if config.progress_monitor is not None:
                    config.progress_monitor.phase_start("Building", None, 2)
                    assert config.progress_monitor.step_complete("Building", 0) is True
                    config.progress_monitor.step_complete("Building", 1)
                    config.progress_monitor.phase_finish("Building")
                    rec["phases"].append("Building")
                return f"PLAN {network.graph}".encode()

        class Inspector:
            def get_engine_information(self, fmt):
                assert fmt == "LayerInformationFormat.JSON"
                return layers

        class Context:
            def __init__(self, engine):
                self.engine, self.shapes, self.addresses = engine, {}, {}

            def set_input_shape(self, name, shape):
                self.shapes[name] = tuple(shape)
                return prof[0] <= shape[0] <= prof[2]

            def get_tensor_shape(self, name):
                (iname, _), (oname, oshape) = self.engine.io
                assert name == oname
                return (self.shapes[iname][0], *oshape)

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr

            def execute_async_v3(self, stream):
                (iname, ishape), (oname, oshape) = self.engine.io
                n = self.shapes[iname][0]
                size_in, size_out = n * int(np.prod(ishape)), n * int(np.prod(oshape))
                x = np.ctypeslib.as_array((ctypes.c_float * size_in).from_address(self.addresses[iname]))
                y = np.repeat(x.reshape(n, -1).mean(1), size_out // n).astype(np.float32)
                ctypes.memmove(self.addresses[oname], y.ctypes.data, y.nbytes)
                rec["runs"].append((self.engine.graph, n, stream))
                return True

        class Engine:
            def __init__(self, plan):
                self.plan = bytes(plan)
                self.graph = self.plan.decode().split()[-1]
                self.io = shapes[self.graph]
                self.num_io_tensors = 2

            def serialize(self):
                return self.plan

            def get_tensor_name(self, i):
                return self.io[i][0]

            def get_tensor_mode(self, name):
                return "TensorIOMode.INPUT" if name == self.io[0][0] else "TensorIOMode.OUTPUT"

            def get_tensor_dtype(self, name):
                return "DataType.FLOAT"

            def get_tensor_profile_shape(self, name, index):
                assert name == self.io[0][0] and index == 0
                return [(b, *self.io[0][1]) for b in prof]

            def create_engine_inspector(self):
                return Inspector()

            def create_execution_context(self):
                rec["contexts"] += 1
                rec.setdefault("context_devices", []).append(rec["device_scope"][-1] if rec.get("device_scope") else None)
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                self._host_code = False

            @property
            def engine_host_code_allowed(self):
                return self._host_code

            @engine_host_code_allowed.setter
            def engine_host_code_allowed(self, value):
                self._host_code = value
                rec["host_code"].append(value)

            def deserialize_cuda_engine(self, plan):
                return Engine(plan)

        for cls in (Logger, ILogger, IProgressMonitor, OnnxParser, Builder, Runtime):
            setattr(m, cls.__name__, cls)
        m.init_libnvinfer_plugins = lambda logger, namespace: True


@pytest.fixture
def fake_trt(monkeypatch, fake_gpu):
    import contextlib

    from polygraphy.backend.trt import util as poly_util

    def install(**kw):
        fake = FakeTRT(**kw)
        monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
        for module in (T, B):
            monkeypatch.setattr(module, "import_tensorrt", _real_import_tensorrt)  # the real check, on the stand-in
        monkeypatch.setattr(B, "_LOGGERS", {})
        # polygraphy imports TensorRT lazily once per module and keeps one logger: point both at the stand-in
        for name, mod in list(sys.modules.items()):
            held = getattr(mod, "trt", None)
            if name.startswith("polygraphy.") and (type(held).__name__ == "LazyModule" or held in FakeTRT.modules):
                monkeypatch.setattr(mod, "trt", fake.module)
        monkeypatch.setattr(poly_util, "TRT_LOGGER", None)
        rec = fake.record

        class Stream:
            def __init__(self, handle):
                self.cuda_stream = handle

            def wait_event(self, event):
                rec["waits"].append((self.cuda_stream, event.recorded_on))

        class Event:
            def __init__(self):
                self.recorded_on = None

            def record(self, stream):
                self.recorded_on = stream.cuda_stream

            def synchronize(self):
                rec.setdefault("synchronized", 0)
                rec["synchronized"] += 1

        streams = iter(range(1000, 2000))
        current = {"s": Stream(next(streams))}
        @contextlib.contextmanager
        def device_scope(d):  # torch.cuda.device: which GPU is current inside the block
            rec.setdefault("device_scope", []).append(str(d))
            try:
                yield
            finally:
                rec["device_scope"].pop()

        monkeypatch.setattr(torch.cuda, "device", device_scope)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: current["s"])
        monkeypatch.setattr(torch.cuda, "Event", Event)
        fake.new_stream = lambda: current.update(s=Stream(next(streams)))
        return fake

    return install


_real_import_tensorrt = T.import_tensorrt


@pytest.mark.parametrize("version,flags", [("10.13.0.35", 1 << 1), ("11.1.0.4", 0)])
def test_build_bundle_engines_with_stand_in_tensorrt(tmp_path, fake_trt, fake_gpu, version, flags):
    fake = fake_trt(version=version)
    bundle = fake_bundle(tmp_path / "b", engines=())
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    built = B.build_bundle_engines(bundle, ["fp16"], BatchProfile(1, 4, 8), workspace_gb=1.5, timing_cache=cache,
                                   opt_level=5, progress=True)
    rec = fake.record
    assert rec["flags"] == [flags, flags]  # strongly typed: the network flag on 10, implicit on 11
    assert rec["pool"] == [("MemoryPoolType.WORKSPACE", int(1.5 * 2**30))] * 2
    assert rec["shapes"] == [("images", (1, 3, 256, 256), (4, 3, 256, 256), (8, 3, 256, 256)),
                             ("latent", (1, 64, 16, 16), (4, 64, 16, 16), (8, 64, 16, 16))]
    assert rec["config"].builder_optimization_level == 5 and rec["config"].profiling_verbosity == "ProfilingVerbosity.DETAILED"
    assert [Path(p).name for p in rec["parsed"]] == ["encode.fp16.onnx", "decode.fp16.onnx"] and rec["phases"]
    assert cache.read_bytes() == b"timing cache after timing cache after old"  # read, updated, written per engine
    assert sorted(built) == [engine_name("decode", "fp16"), engine_name("encode", "fp16")]
    b = Bundle.open(bundle.root)
    b.verify_all()
    for graph in ("encode", "decode"):
        name = engine_name(graph, "fp16")
        assert (b.root / name).read_bytes() == f"PLAN {graph}".encode()
        e = b.files[name]
        assert e["kind"] == "trt-engine" and e["profile"] == {"min": 1, "opt": 4, "max": 8}
        assert e["tensorrt"] == "10.13.0.35" and e["compute_capability"] == fake_gpu["compute_capability"]
        assert e["gpu"] == fake_gpu["gpu"] and e["onnx"] == f"{graph}.fp16.onnx"
        assert e["onnx_sha256"] == b.files[f"{graph}.fp16.onnx"]["sha256"] and e["strongly_typed"] is True
        assert e["layer_precisions"]["by_precision"] == {"fp16": 17, "fp32": 4}
        assert e["version_compatible"] is False and e["tf32"] is False and e["built_with"] == "polygraphy"
        assert e.facts.layer_precisions == e["layer_precisions"] and e.facts.profile == e["profile"]
        assert built[name].to_dict() == e.to_dict() and set(b.manifest.engines) == set(built)
    assert "engines" not in json.loads((b.root / "manifest.json").read_text())  # the facts live in `files` only
    assert b.precisions("trt-engine") == ["fp16"]


def test_build_clears_tf32(tmp_path, fake_trt):
    """TensorRT enables TF32 by default: FP32 layers would round matmul inputs to 10 bits."""
    fake = fake_trt()
    B.build_bundle_engines(fake_bundle(tmp_path / "b", engines=()), ["fp32"], BatchProfile(1, 4, 8), progress=False)
    flags = fake.record["config"].flags
    assert "BuilderFlag.TF32" not in flags and "BuilderFlag.VERSION_COMPATIBLE" not in flags


def test_strongly_typed_flag_only_on_tensorrt10(tmp_path, fake_trt):
    for version, expected in (("10.0.1.6", 1 << 1), ("11.4.0.106", 0)):
        fake = fake_trt(version=version)
        B.build_bundle_engines(fake_bundle(tmp_path / version, engines=()), ["fp16"], BatchProfile(1, 4, 8), progress=False)
        assert set(fake.record["flags"]) == {expected}, version


def test_version_compatible_engines(tmp_path, fake_trt, fake_gpu):
    from rpiae.engines.trt_backend import TRTBackend

    fake = fake_trt()
    bundle = fake_bundle(tmp_path / "b", engines=())
    built = B.build_bundle_engines(bundle, ["fp16"], BatchProfile(1, 4, 8), progress=False, version_compatible=True)
    assert "BuilderFlag.VERSION_COMPATIBLE" in fake.record["config"].flags
    b = Bundle.open(bundle.root)
    entry = b.files[engine_name("encode", "fp16")]
    assert entry["version_compatible"] is True and built[engine_name("encode", "fp16")].facts.version_compatible is True
    assert T.rebuild_command(b.root, entry).endswith("--version-compatible --out " + str(b.root))
    # a TensorRT runtime may only run the lean runtime inside such a plan when told to
    fake.record["host_code"].clear()  # (polygraphy allows it when it deserializes after the build)
    with TRTBackend(b, precision="fp16") as be:
        assert be.describe()["version_compatible"] is True
    assert fake.record["host_code"] == [True, True]


def test_execution_context_is_made_on_the_engines_gpu(fake_trt):
    """The context's activation memory goes to the GPU current when it is made: with
    --device cuda:1 that must be GPU 1, not whichever GPU the process had current."""
    fake = fake_trt()
    runner = T.EngineRunner(b"PLAN encode", "cuda:1")
    assert fake.record["context_devices"] == ["cuda:1"]
    runner.close()


def test_refused_timing_cache_is_an_error(tmp_path, fake_trt):
    fake_trt()
    bundle = fake_bundle(tmp_path / "b", engines=())
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"other gpu's cache")
    with pytest.raises(B.EngineBuildError, match=r"refused the timing cache .*timing.cache.*another TensorRT version or GPU"):
        B.build_bundle_engines(bundle, ["fp16"], BatchProfile(1, 4, 8), timing_cache=cache, progress=False)
    assert cache.read_bytes() == b"other gpu's cache"  # left as it was
    assert Bundle.open(bundle.root).precisions("trt-engine") == [] and not (bundle.root / "engines").exists()


def test_missing_polygraphy_is_one_line(tmp_path, fake_trt, monkeypatch):
    fake_trt()
    monkeypatch.setitem(sys.modules, "polygraphy.backend", None)
    with pytest.raises(BackendUnavailable, match="polygraphy is not installed"):
        B.build_bundle_engines(fake_bundle(tmp_path / "b", engines=()), ["fp16"], BatchProfile(1, 4, 8), progress=False)


def test_build_refuses_fp32_engine_and_parse_errors(tmp_path, fake_trt):
    fake_trt(layers=vit_engine_json(low="Float"))
    bundle = fake_bundle(tmp_path / "b", engines=())
    with pytest.raises(P.EnginePrecisionError, match="TensorRT encode.fp16: fp16 engine runs 100%"):
        B.build_bundle_engines(bundle, ["fp16"], BatchProfile(1, 4, 8), progress=False)
    b = Bundle.open(bundle.root)
    assert not (b.root / "engines").exists() and b.precisions("trt-engine") == [] and not b.manifest.engines
    fake_trt(parse_ok=False)
    with pytest.raises(B.EngineBuildError, match="could not parse .*encode.fp16.onnx: In node 3 .*UNSUPPORTED_NODE"):
        B.build_bundle_engines(bundle, ["fp16"], BatchProfile(1, 4, 8), progress=False)
    with pytest.raises(BundleError, match="no int8 ONNX graphs"):
        B.build_bundle_engines(bundle, ["int8"], BatchProfile(1, 4, 8), progress=False)


@pytest.mark.parametrize("profile,batches", [((1, 4, 8), [8, 2]), ((2, 2, 4), [4, 4, 2])])
def test_engine_runner_with_stand_in_tensorrt(tmp_path, fake_trt, fake_gpu, profile, batches):
    from rpiae.engines.trt_backend import TRTBackend

    fake = fake_trt(profile=profile)
    bundle = fake_bundle(tmp_path / "b", engines=())
    B.build_bundle_engines(bundle, ["fp16"], BatchProfile(*profile), progress=False)
    fake.record["host_code"].clear()
    x = np.random.default_rng(0).random((10, 3, 256, 256), dtype=np.float32)
    with TRTBackend(Bundle.open(bundle.root), precision="fp16") as be:
        assert be.max_batch == profile[2]
        z = be.encode(x)
        assert z.shape == (10, 64, 16, 16) and z.dtype == np.float32
        np.testing.assert_allclose(z[:, 0, 0, 0], x.reshape(10, -1).mean(1), rtol=1e-5)
        assert [n for g, n, s in fake.record["runs"]] == batches
        # a batch below the profile's minimum is padded and the padding dropped
        one = be.decode(torch.ones(1, 64, 16, 16))
        assert one.shape == (1, 3, 256, 256) and fake.record["runs"][-1][1] == profile[0]
        assert fake.record["contexts"] == 2  # one per engine
        assert fake.record["waits"] == []  # one stream so far: nothing to wait for
        first = fake.record["runs"][0][2]
        fake.new_stream()
        be.encode(x[:1])
        # the same context on a new stream: that stream first waits for the context's last enqueue
        assert fake.record["contexts"] == 2
        assert fake.record["waits"] == [(first + 1, first)]
        assert fake.record["host_code"] == []  # not a version-compatible engine: no host code allowed
    assert fake.record["synchronized"] == 2  # closing waits for each engine's last enqueue


def test_the_trt_target_records_its_parity_on_the_trt_backend(tmp_path, fake_trt, fake_gpu, tiny_model, tiny_ckpt,
                                                               monkeypatch):
    """`rpiae export --target trt`: build (stand-in TensorRT) -> check (on the trt backend, on the
    GPU, the built precisions, a batch inside the profile) -> record (manifest.parity)."""
    from rpiae.checkpoints import checkpoint_sha256
    import rpiae.verify.export as E

    fake_trt()
    bundle = fake_bundle(tmp_path / "b", model=tiny_model, engines=(),
                         source={"path": tiny_ckpt, "sha256": checkpoint_sha256(tiny_ckpt)})
    calls = []

    def measured(bundle, backend, images, batches, precisions, device):
        calls.append((backend, batches, precisions, device, sorted(bundle.manifest.engines)))
        return {"results": [{"backend": backend, "device": device, "precision": p, "ok": True, "checks": {},
                             "metrics": {"batch": batches[0]}} for p in precisions]}

    monkeypatch.setattr(E, "verify_bundle", measured)
    b = E.export_target(tiny_ckpt, bundle.root, "trt", precisions=["fp16"], profile=BatchProfile(1, 2, 3), device="auto",
                 progress=False)
    assert calls == [("trt", [3], ["fp16"], "cuda", [engine_name("decode", "fp16"), engine_name("encode", "fp16")])]
    assert [r["backend"] for r in Bundle.open(b.root).manifest.parity] == ["trt"]  # written to the manifest
    with pytest.raises(ValueError, match="TensorRT engines are built and checked on a GPU: --device cuda"):
        E.export_target(tiny_ckpt, bundle.root, "trt", precisions=["fp16"], device="cpu")
