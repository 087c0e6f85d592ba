"""The backend registry (`rpiae.export.backends`): one entry per runtime, read by every layer
that names backends; a runtime added as one entry is opened, offered and served."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from rpiae.engines import backend_class, load_backend
from rpiae.engines.base import Backend
from rpiae.export.backends import BACKENDS, REFERENCE, REGISTRY, BackendInfo, backend_info, runnable
from rpiae.export.manifest import KIND_ONNX

ROOT = Path(__file__).resolve().parents[1]
# files that read backend names from the registry and must not spell them out again
# (cli/export_cmd.py and export/manifest.py are not: their "trt" and "aoti" are --target names)
READERS = ["engines/__init__.py", "cli/common.py", "cli/triton_cmd.py", "bench/settings.py",
           "bench/runner.py", "export/triton.py", "verify/parity.py", "engines/triton_python.py"]


def test_every_entry_names_its_class():
    import inspect

    for name, info in REGISTRY.items():
        cls = backend_class(name)
        assert issubclass(cls, Backend) and cls.name == name, (name, cls)
        assert info.devices and info.precisions and info.summary
        # what every caller may pass (a Triton model opens one graph), and the options it declares
        accepted = set(inspect.signature(cls.__init__).parameters)
        assert {"precision", "device", "max_batch", "graphs", *info.options} <= accepted, (name, accepted)
    assert REFERENCE in REGISTRY and REGISTRY[REFERENCE].from_weights
    for info in REGISTRY.values():  # a precision run from another's files names one the backend runs
        assert set(info.files_of) <= set(info.precisions) and not set(info.files_of.values()) - {"fp32", "fp16", "int8"}
    with pytest.raises(ValueError, match="unknown backend 'nope'; choose one of: torch, ort"):
        backend_info("nope")


def test_runnable_precisions_follow_the_files_a_bundle_has():
    """What a backend can run from a bundle: its precisions whose files (its own kind, or the
    precision it reads them from) are there; a weights backend runs all of its own."""
    with_bf16 = next(n for n, b in REGISTRY.items() if "bf16" in b.files_of)
    assert runnable(with_bf16, ["fp32"]) == ["fp32", "bf16"]  # bf16 from the FP32 graph
    assert runnable(with_bf16, ["fp16", "int8"]) == ["int8"]
    assert "bf16" not in runnable("ort", ["fp32", "fp16", "int8"])  # ONNX Runtime has no bf16 graph to run
    assert runnable(REFERENCE, []) == list(REGISTRY[REFERENCE].precisions)


def test_the_command_line_offers_the_registry():
    from rpiae.cli.main import main

    def choices(command: str, option: str = "backend") -> list[str]:
        param = next(p for p in main.commands[command].params if p.name == option)
        return list(param.type.choices)

    for command in ("encode", "decode", "extract", "triton"):
        assert choices(command) == list(BACKENDS), command
    assert choices("verify") == [b for b in BACKENDS if b != REFERENCE]


def test_readers_do_not_spell_backend_names():
    for rel in READERS:
        tree = ast.parse((ROOT / rel).read_text())
        literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in REGISTRY
                    and not _is_default(tree, n)]
        assert not literals, f"{rel} names backends {literals}: read them from rpiae.export.backends"


def _is_default(tree: ast.AST, node: ast.Constant) -> bool:
    """A default (a parameter's, an option's, a DEFAULT_* constant) is a choice, not a list of names."""
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and any(v is node for v in ast.walk(n.value)) and all(
                isinstance(t, ast.Name) and t.id.startswith("DEFAULT") for t in n.targets):
            return True
        if isinstance(n, ast.arguments) and any(d is node for d in (*n.defaults, *n.kw_defaults)):
            return True
        if isinstance(n, ast.keyword) and n.arg == "default" and n.value is node:
            return True
    return False


# -- a runtime added as one entry ---------------------------------------------------------------
class EchoBackend(Backend):
    """A stand-in runtime: 'runs' the bundle's ONNX graphs by answering zeros of the right shape."""

    name = "echo"
    native = "numpy"

    def __init__(self, bundle, precision="fp32", device="cpu", max_batch=None, graphs=("encode", "decode")):
        super().__init__(bundle.config, precision, max_batch, graphs)
        self.paths = {g: bundle.graph_path(g, precision) for g in self.graphs}

    def _run(self, graph, x):
        shape = self.config.latent_shape if graph == "encode" else self.config.image_shape
        return np.zeros((len(x), *shape), np.float32)


@pytest.fixture
def echo_registered(monkeypatch):
    import rpiae.export.backends as registry

    entry = BackendInfo("echo", f"{__name__}:EchoBackend", KIND_ONNX, ("fp32", "fp16", "int8"), ("cpu",), "nothing", "a stand-in")
    monkeypatch.setitem(registry.REGISTRY, "echo", entry)
    return entry


def test_a_registered_runtime_is_opened_and_served(echo_registered, bundle_all, tmp_path, photos):
    backend = load_backend(bundle_all.root, "echo", "int8")
    assert isinstance(backend, EchoBackend) and backend.paths["encode"].name == "encode.int8.onnx"
    assert backend.encode(photos[:2]).shape == (2, 64, 16, 16)
    from rpiae.export.triton import choose, write_model_repository

    assert choose(bundle_all, "python", backend="echo") == ("python", "fp32")
    write_model_repository(bundle_all, tmp_path / "repo", platform="python", backend="echo", precision="int8")
    assert sorted(p.name for p in (tmp_path / "repo" / "rpiae_decode" / "bundle").iterdir()) == [
        "decode.int8.onnx", "manifest.json"]
    from rpiae.bench.runner import _static_skip

    assert _static_skip({"backend": "echo", "precision": "fp16"}, True, ["fp32", "int8"]).startswith("the bundle has no fp16")
    assert _static_skip({"backend": "echo", "precision": "bf16"}, True, ["fp32"]) == "echo runs fp32, fp16, int8, not bf16"
    assert "runs an export bundle" in _static_skip({"backend": "echo", "precision": "fp32"}, False, [])


def test_every_precision_record_is_complete_and_each_onnx_pass_resolves():
    """The precision registry (`rpiae.precisions`): each ONNX pass names a real function, the
    vocabularies follow from the records, and ONNX Runtime's TensorRT flags of a quantised graph
    include those of its unquantised layers."""
    import importlib

    from rpiae import precisions as P

    for name, p in P.REGISTRY.items():
        assert p.name == name and p.bits in (8, 16, 32) and p.tolerances, p
        if p.onnx_pass:
            module, _, fn = p.onnx_pass.partition(":")
            assert callable(getattr(importlib.import_module(module), fn)), p.onnx_pass
    assert P.ONNX_PRECISIONS == tuple(n for n, p in P.REGISTRY.items() if p.onnx_pass is not None)
    assert P.TORCH_DTYPES["bf16"] is torch_dtype("bfloat16") and "int8" not in P.TORCH_DTYPES
    assert P.trt_flags("int8") == ("int8", "fp16") and P.trt_flags("int8", "fp32") == ("int8",)
    assert P.trt_flags("fp16") == ("fp16",) and P.trt_flags("fp32") == ()
    assert P.cpu_native("bf16", {"avx2", "amx_bf16"}) and not P.cpu_native("bf16", {"avx2"}) and P.cpu_native("int8", set())


def test_a_precision_without_an_onnx_pass_is_refused_by_the_export(tmp_path, monkeypatch):
    """An export pass is chosen by the precision's record: one without a pass is an error, not
    quietly another precision's graph."""
    from types import SimpleNamespace

    from rpiae import precisions as P
    from rpiae.export import build

    monkeypatch.setitem(P.REGISTRY, "fp8", P.Precision("fp8", 8, None, None))
    with pytest.raises(ValueError, match="fp8 has no ONNX graph"):
        build._add_graph(SimpleNamespace(root=tmp_path), "encode", "fp8", None, {})
    assert list(tmp_path.iterdir()) == []  # refused before any file is written


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def test_every_export_target_is_checked_by_a_backend_that_runs_what_it_builds():
    from rpiae.export.targets import FILE_KIND_TARGET, ONNX_TARGET, TARGETS, target_info

    assert ONNX_TARGET in TARGETS and not TARGETS[ONNX_TARGET].builder
    for t in TARGETS.values():
        runner = REGISTRY[t.checked_by]
        assert runner.runs == t.kind and not runner.from_weights, t
        assert bool(t.builder) == (t.name != ONNX_TARGET) and FILE_KIND_TARGET[t.kind] == t.name
    with pytest.raises(ValueError, match="unknown export target 'fp8'; choose one of: onnx, trt, aoti"):
        target_info("fp8")
    with pytest.raises(TypeError, match="--target aoti takes no workspace_gb"):
        TARGETS["aoti"].build(None, ["fp32"], None, "cpu", workspace_gb=1.0)
