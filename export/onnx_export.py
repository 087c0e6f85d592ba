"""PyTorch -> ONNX for the two graphs: export, clean up, name, annotate, check.

Steps, each plain: `torch.onnx.export` (dynamo, dynamic batch axis only) -> onnxslim
(constant folding, dead-code removal) -> node names from module scopes (so precision
rules, TensorRT layer reports and humans can read them) -> metadata (the model config:
sizes, I/O conventions, normalisation) -> ONNX checker + shape inference -> save, with
weights as external data (`<name>.data`) when the file would pass 32 MiB.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import onnx
import torch

from rpiae.config import RPiAEConfig
from rpiae.export.graphs import graph_module
from rpiae.export.spec import BATCH_AXIS, graph_spec
from rpiae.fileio import umask
from rpiae.model import RPiAE

OPSET = 18
MAX_BATCH = 1024  # upper bound of the symbolic batch axis in the exported program
TWO_GB = 2**31 - 1024
# a graph file larger than this keeps its weights in `<name>.data` beside it: ONNX Runtime then
# maps the weights from that file instead of parsing a protobuf that holds them and copying them
# out (rpiae-b's fp32 decoder, probed: 1.77 GB held after opening instead of 2.25 GB, opened in 1.8 s
# instead of 4.2 s; its 89 MiB int8 encoder: see bench/results/NOTES.md); and protobuf cannot hold
# more than 2 GB at all. The tiny preset's graphs (under 18 MB) stay one file.
EXTERNAL_DATA_BYTES = 2**25


def _scope(node: onnx.NodeProto) -> str:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (SyntaxError, ValueError):
                return ""
            scope = scopes[-2] if len(scopes) > 1 else ""
            return "" if scope.startswith("_empty") else scope
    return ""


def name_nodes(model: onnx.ModelProto) -> None:
    """Rename nodes to `<module path>/<OpType>_<i>` and drop the exporter's bulky metadata."""
    for i, node in enumerate(model.graph.node):
        node.name = f"{_scope(node)}/{node.op_type}_{i}"
        del node.metadata_props[:]


def set_metadata(model: onnx.ModelProto, config: RPiAEConfig, graph: str, precision: str, extra: dict | None = None) -> None:
    spec = graph_spec(config, graph)
    meta = {
        "rpiae.config": config.to_json(),
        "rpiae.graph": graph,
        "rpiae.precision": precision,
        "rpiae.input": spec.input_name,
        "rpiae.output": spec.output_name,
        **(extra or {}),
    }
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)
    model.producer_name = "rpiae"


def read_metadata(model: onnx.ModelProto | str | Path) -> dict[str, str]:
    """The metadata of a model, or of an ONNX file without parsing its graph."""
    if isinstance(model, onnx.ModelProto):
        return {p.key: p.value for p in model.metadata_props}
    return _file_metadata(Path(model))


_METADATA_PROPS = onnx.ModelProto.DESCRIPTOR.fields_by_name["metadata_props"].number


def _file_metadata(path: Path) -> dict[str, str]:
    """`metadata_props` read off the top level of a serialised ModelProto: each field is a
    protobuf key (varint) and, for length-delimited fields such as the graph, a length that is
    skipped with a seek, so a 2 GB graph is not parsed to read a few kB of metadata. Each
    metadata entry itself is parsed by onnx (`StringStringEntryProto`)."""
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        while (key := _varint(f)) is not None:
            number, wire = key >> 3, key & 7
            if wire == 0:
                _varint(f)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            elif wire == 2:
                size = _varint(f) or 0
                if number == _METADATA_PROPS:
                    entry = onnx.StringStringEntryProto.FromString(f.read(size))
                    out[entry.key] = entry.value
                else:
                    f.seek(size, os.SEEK_CUR)
            else:
                raise ValueError(f"{path}: not an ONNX model (protobuf wire type {wire})")
    return out


def _varint(f) -> int | None:
    """One protobuf varint from `f`, or None at the end of the file."""
    value, shift = 0, 0
    while byte := f.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
    if shift:
        raise ValueError(f"{getattr(f, 'name', 'file')}: truncated protobuf varint")
    return None


def _writing_error(path: Path, e: BaseException) -> Exception | None:
    """The one-line `cannot write PATH: ...` error (`rpiae.fileio.WriteError`) for an exception
    raised while writing `path` (or its external data): an OSError anywhere in its chain; the
    writers' own texts (numpy's `problem writing element N to file`) name neither the file nor
    the cause, so a file system left with (almost) no space says so. None: not a write failure."""
    from rpiae.fileio import WriteError

    cause, seen = e, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if not isinstance(cause, OSError) or isinstance(cause, (FileNotFoundError, WriteError)):
        return None
    text = " ".join(str(cause).split()) or type(cause).__name__
    if cause.errno is None:
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        if free is not None and free < 64 * 2**20:
            text += f" (No space left on device: {free / 2**20:.0f} MiB free on its file system)"
    return WriteError(f"cannot write {path}: {text}")


@contextlib.contextmanager
def _writes(path: Path):
    """Failures while writing `path` as one line naming it (`_writing_error`)."""
    try:
        yield
    except Exception as e:
        error = _writing_error(path, e)
        if error is None:
            raise
        raise error from None


def save_onnx(model: onnx.ModelProto, path: str | Path) -> None:
    """Save, with external data (`<name>.data` beside it) when over `EXTERNAL_DATA_BYTES`; a
    failed write (disk full) is one line naming the file."""
    path = Path(path)
    with _writes(path):
        _save_onnx(model, path)


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    if model.ByteSize() > min(EXTERNAL_DATA_BYTES, TWO_GB):
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + ".data", size_threshold=1024,
        )
        # onnx creates the data file private (0600); it gets the mode every file we write has
        os.chmod(path.with_name(path.name + ".data"), 0o666 & ~umask())
    else:
        onnx.save_model(model, str(path))


def check_model(path: str | Path) -> onnx.ModelProto:
    """ONNX checker (by path, so external data is fine) and strict shape inference."""
    onnx.checker.check_model(str(path), full_check=False)
    model = onnx.load(str(path))
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def export_graph(model: RPiAE, graph: str, path: str | Path, opset: int = OPSET) -> Path:
    """Export one graph (`encode` / `decode`) of `model` as an FP32 ONNX file at `path`."""
    import onnxslim

    path = Path(path)
    module = graph_module(model.eval().float().cpu(), graph)
    spec = graph_spec(model.config, graph)
    x = spec.sample(batch=2)
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=MAX_BATCH)
    raw = path.with_name(path.stem + ".raw.onnx")
    try:
        with warnings.catch_warnings(), _quiet_exporter(), _writes(path):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (x,), str(raw), dynamo=True, opset_version=opset,
                input_names=[spec.input_name], output_names=[spec.output_name],
                dynamic_shapes=({0: batch},), external_data=True, optimize=True, verbose=False,
            )
        proto = onnx.load(str(raw))
    finally:
        for p in (raw, raw.with_name(raw.name + ".data")):
            p.unlink(missing_ok=True)
    name_nodes(proto)  # before slimming: onnxslim drops the scope metadata
    proto = onnxslim.slim(proto)
    for value in (*proto.graph.input, *proto.graph.output):  # one readable batch-axis name
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_AXIS
    set_metadata(proto, model.config, graph, "fp32")
    save_onnx(proto, path)
    check_model(path)
    return path


def export_graph_from_checkpoint(checkpoint: str | Path, graph: str, path: str | Path, opset: int = OPSET) -> Path:
    """`export_graph` of the model in a checkpoint file (what `export_bundle`'s child process runs)."""
    return export_graph(RPiAE.from_checkpoint(checkpoint), graph, path, opset)


class _quiet_exporter:
    """The dynamo exporter logs progress and torchvision notices at WARNING; keep the CLI clean."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        self._env = os.environ.get("TORCH_LOGS")
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False
