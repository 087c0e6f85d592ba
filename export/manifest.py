"""The bundle manifest (`BUNDLE/manifest.json`): its schema as dataclasses, checked when a
manifest is written and when one is opened, and the vocabulary of the files a bundle holds.

    {"format": "rpiae-bundle", "format_version": 1, "created": ISO time,
     "config": RPiAEConfig.to_dict(), "io": the graphs' I/O conventions (from GraphSpec),
     "source": {"path", "sha256"} of the checkpoint, "opset": 18, "precisions": [...],
     "files": {name: {"sha256", "bytes", "kind", "graph"?, "precision"?, ...kind-specific facts}},
     "tools": {library: version}, "parity": [row, ...], "latent_stats"?: {"file", "sha256", "eps"}}

A file entry's common facts are typed fields of `FileEntry`; what only one kind has is its
kind's facts dataclass (`KIND_FACTS`: an ONNX graph's `precision_report`, an engine's `profile`
and TensorRT version, a package's CPU level), `entry.facts`. A manifest that breaks the schema
is refused with one line naming the field. Earlier writers of this format also put an
`engines` section that repeats the engine files' facts; it is read and dropped (the files hold
them; `Manifest.engines` lists them).
"""

from __future__ import annotations

import datetime as _dt
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from rpiae.config import RPiAEConfig
from rpiae.export.spec import GRAPHS, PRECISIONS, graph_specs
from rpiae.host import library_versions

MANIFEST = "manifest.json"
FORMAT = "rpiae-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"

# what a file in a bundle is (manifest `files[name].kind`)
KIND_WEIGHTS = "weights"
KIND_ONNX = "onnx"
KIND_ONNX_DATA = "onnx-external-data"
KIND_TRT_ENGINE = "trt-engine"
KIND_AOTI_PACKAGE = "aoti-package"
FILE_KINDS = (KIND_WEIGHTS, KIND_ONNX, KIND_ONNX_DATA, KIND_TRT_ENGINE, KIND_AOTI_PACKAGE)

TOOLS = ("rpiae", "torch", "onnx", "onnxruntime", "onnxslim", "onnxscript", "nvidia-modelopt", "tensorrt", "polygraphy")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class BundleError(ValueError):
    """A bundle that is missing, incomplete, tampered with, or lacks what was asked for."""


class ManifestError(BundleError):
    """A manifest that does not follow the schema."""


def onnx_name(graph: str, precision: str) -> str:
    return f"{graph}.{precision}.onnx"


def engine_name(graph: str, precision: str) -> str:
    return f"engines/{graph}.{precision}.plan"


def io_conventions(config: RPiAEConfig) -> dict[str, Any]:
    """The graphs' I/O as recorded for readers of the manifest (other languages, Triton users)."""
    specs = graph_specs(config)
    enc, dec = specs["encode"], specs["decode"]
    meaning = ("posterior mean, normalised per element: (z - latent_mean) / sqrt(latent_var + eps)"
               if config.latent_norm else "posterior mean, unscaled")
    image = {"dtype": "float32", "layout": "NCHW", "colour": "RGB"}
    return {
        "encode": {
            "input": {"name": enc.input_name, "shape": ["batch", *enc.input_shape], **image, "range": list(enc.input_range)},
            "output": {"name": enc.output_name, "shape": ["batch", *enc.output_shape], "dtype": "float32", "meaning": meaning},
        },
        "decode": {
            "input": {"name": dec.input_name, "shape": ["batch", *dec.input_shape], "dtype": "float32"},
            "output": {"name": dec.output_name, "shape": ["batch", *dec.output_shape], **image,
                       "range": "nominally [0, 1], not clamped: clamp and quantise in post-processing"},
        },
        "image_policy": "see rpiae.imageio: by default the RPiAE authors' preprocessing (PIL convert('RGB'), ADM "
                        "center_crop_arr: BOX halving, BICUBIC short side to 256, centre crop 256x256, / 255)",
    }


# -- schema checks: each raises ManifestError("<where>: <field>: <problem>") --------------------------
def _expect(ok: bool, where: str, what: str, problem: str) -> None:
    if not ok:
        raise ManifestError(f"{where}: {what}: {problem}")


def _typed(d: Mapping, key: str, types: type | tuple[type, ...], where: str, prefix: str = "",
           optional: bool = False) -> Any:
    value = d.get(key)
    if value is None and optional:
        return None
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    got = type(value).__name__ if key in d else "nothing"
    _expect(ok, where, f"{prefix}{key}", f"expected {' or '.join(t.__name__ for t in types)}, got {got}")
    return value


# -- what each kind of file records beyond its hash: one dataclass per kind -----------------------
def _options(hint: Any) -> tuple[type, ...]:
    """The plain types a field annotation of the facts dataclasses allows (`X | None`: X, NoneType)."""
    return tuple(typing.get_origin(t) or t for t in (typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)))


def _type_ok(value: Any, hint: Any) -> bool:
    """`value` fits a field annotation of the facts dataclasses."""
    for t in _options(hint):
        if value is None and t is type(None):
            return True
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is not type(None) and isinstance(value, t) and (t is bool or not isinstance(value, bool)):
            return True
    return False


def _type_name(hint: Any) -> str:
    return " | ".join("None" if t is type(None) else t.__name__ for t in _options(hint))


@dataclass(frozen=True)
class Facts:
    """What a kind of file records beyond its hash, size, graph and precision. Fields are the
    JSON keys; keys an rpiae version of the same format adds later are kept in `extra`, so a
    manifest written by a newer rpiae reads and writes back unchanged."""

    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str, prefix: str) -> "Facts":
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        for name, f in known.items():
            missing = f.default is MISSING and f.default_factory is MISSING
            _expect(not (missing and name not in d), where, f"{prefix}{name}", "missing")
            if name in d:
                _expect(_type_ok(d[name], hints[name]), where, f"{prefix}{name}",
                        f"expected {_type_name(hints[name])}, got {type(d[name]).__name__}")
        return cls(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}


@dataclass(frozen=True)
class WeightsFacts(Facts):
    dtype: str = "float32"


@dataclass(frozen=True)
class OnnxFacts(Facts):
    opset: int | None = None
    external_data: list = field(default_factory=list)  # names of the graph's external-data files
    precision_report: dict | None = None  # op types per precision, Q/DQ counts (rpiae.export.precision)
    calibration: dict | None = None  # quantised graphs: {"images", "method", "high_precision", "weight_bits" (absent: 8), "source"}

    @property
    def weight_bits(self) -> int | None:
        """Bits of a quantised graph's weights (8 where an earlier export did not record them);
        None for a graph that is not quantised."""
        return None if self.calibration is None else int(self.calibration.get("weight_bits", 8))


@dataclass(frozen=True)
class OnnxDataFacts(Facts):
    pass


@dataclass(frozen=True)
class EngineFacts(Facts):
    """A TensorRT plan: where it runs (TensorRT version, GPU) and how it was built."""

    profile: dict = field(default_factory=dict)  # {"min", "opt", "max"} batch
    tensorrt: str | None = None
    gpu: str | None = None
    compute_capability: str | None = None
    onnx: str | None = None  # the ONNX graph it was built from, and that graph's sha256
    onnx_sha256: str | None = None
    version_compatible: bool = False
    strongly_typed: bool | None = None
    tf32: bool | None = None
    builder_optimization_level: int | None = None
    workspace_gb: float | None = None
    input: str | None = None
    built_with: str | None = None
    layer_precisions: dict | None = None  # {"by_precision", "fp32_share", ...} of the built engine


@dataclass(frozen=True)
class PackageFacts(Facts):
    """An AOTInductor package: the device type and CPU level or GPU it was compiled for."""

    device: str = "cpu"
    torch: str | None = None
    batch: dict | None = None  # {"min", "opt", "max"}
    cpu_level: str | None = None
    isa: str | None = None
    march: str | None = None
    cpu_flags: list | None = None
    capability: str | None = None
    sm: str | None = None
    gpu: str | None = None
    cuda: str | None = None
    export_s: float | None = None
    compile_s: float | None = None


KIND_FACTS: dict[str, type[Facts]] = {KIND_WEIGHTS: WeightsFacts, KIND_ONNX: OnnxFacts, KIND_ONNX_DATA: OnnxDataFacts,
                                      KIND_TRT_ENGINE: EngineFacts, KIND_AOTI_PACKAGE: PackageFacts}
ENGINE_KINDS = (KIND_TRT_ENGINE, KIND_AOTI_PACKAGE)  # built for one machine kind by `--target trt|aoti`


@dataclass
class FileEntry(Mapping):
    """One file of a bundle: its common fields and its kind's typed `facts`; reads like its
    JSON object too (`entry["kind"]`, `entry.get(...)`)."""

    sha256: str
    bytes: int
    kind: str
    graph: str | None = None
    precision: str | None = None
    facts: Facts = field(default_factory=Facts)

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str) -> "FileEntry":
        p = f"files[{name!r}]."
        _expect(isinstance(d, Mapping), where, p[:-1], "expected an object")
        sha = _typed(d, "sha256", str, where, p)
        _expect(bool(_SHA256.match(sha)), where, f"{p}sha256", "expected 64 lowercase hex digits")
        size = _typed(d, "bytes", int, where, p)
        _expect(size >= 0, where, f"{p}bytes", "negative")
        kind = _typed(d, "kind", str, where, p)
        _expect(kind in FILE_KINDS, where, f"{p}kind", f"{kind!r} is not one of {', '.join(FILE_KINDS)}")
        graph = _typed(d, "graph", str, where, p, optional=True)
        _expect(graph is None or graph in GRAPHS, where, f"{p}graph", f"{graph!r} is not one of {', '.join(GRAPHS)}")
        precision = _typed(d, "precision", str, where, p, optional=True)
        _expect(precision is None or precision in PRECISIONS, where, f"{p}precision",
                f"{precision!r} is not one of {', '.join(PRECISIONS)}")
        rest = {k: v for k, v in d.items() if k not in ("sha256", "bytes", "kind", "graph", "precision")}
        return cls(sha, size, kind, graph, precision, KIND_FACTS[kind].from_dict(rest, where, p))

    @property
    def external_data(self) -> list[str]:
        """The files this one needs beside it (an ONNX graph's external data; none for other kinds)."""
        return getattr(self.facts, "external_data", [])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sha256": self.sha256, "bytes": self.bytes, "kind": self.kind}
        out.update({k: v for k, v in (("graph", self.graph), ("precision", self.precision)) if v is not None})
        return {**out, **self.facts.to_dict()}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


@dataclass
class Manifest:
    config: RPiAEConfig
    source: dict[str, Any]  # {"path", "sha256"} of the checkpoint the graphs came from (None: an in-memory model)
    opset: int
    files: dict[str, FileEntry] = field(default_factory=dict)
    precisions: list[str] = field(default_factory=list)
    parity: list[dict[str, Any]] = field(default_factory=list)
    tools: dict[str, str] = field(default_factory=lambda: library_versions(TOOLS))
    io: dict[str, Any] | None = None
    latent_stats: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.io is None:
            self.io = io_conventions(self.config)

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST) -> "Manifest":
        """Check `d` against the schema; one-line ManifestError naming the first field that fails."""
        _expect(isinstance(d, Mapping), where, "manifest", "expected a JSON object")
        _expect(d.get("format") == FORMAT, where, "format", f"{d.get('format')!r}: not an rpiae bundle manifest")
        version = _typed(d, "format_version", int, where)
        _expect(version <= FORMAT_VERSION, where, "format_version", f"{version} is newer than this rpiae ({FORMAT_VERSION})")
        try:
            config = RPiAEConfig.from_dict(_typed(d, "config", dict, where))
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where}: config: {' '.join(str(e).split())}") from None
        source = _typed(d, "source", dict, where)
        for key in ("path", "sha256"):
            _typed(source, key, str, where, "source.", optional=True)
        files = {name: FileEntry.from_dict(e, where, name) for name, e in _typed(d, "files", dict, where).items()}
        precisions = _typed(d, "precisions", list, where)
        _expect(all(p in PRECISIONS for p in precisions), where, "precisions", f"{precisions} names an unknown precision")
        parity = d.get("parity") or []  # an empty parity section may be written as {}: no rows
        _expect(isinstance(parity, list), where, "parity", "expected a list of result rows")
        for i, row in enumerate(parity):
            _expect(isinstance(row, dict), where, f"parity[{i}]", "expected an object")
            _typed(row, "precision", str, where, f"parity[{i}].")
            _typed(row, "ok", bool, where, f"parity[{i}].")
            _typed(row, "checks", dict, where, f"parity[{i}].")
        _typed(d, "engines", dict, where, optional=True)  # earlier writers: a copy of the engine files' facts, dropped
        stats = _typed(d, "latent_stats", dict, where, optional=True)
        if stats is not None:
            _typed(stats, "sha256", str, where, "latent_stats.")
        return cls(config=config, source=dict(source), opset=_typed(d, "opset", int, where), files=files,
                   precisions=list(precisions), parity=list(parity),
                   tools=dict(_typed(d, "tools", dict, where)), io=_typed(d, "io", dict, where, optional=True),
                   latent_stats=stats, created=str(d.get("created", "")), format_version=version)

    @property
    def engines(self) -> dict[str, FileEntry]:
        """The files built for one kind of machine (TensorRT plans, AOTInductor packages)."""
        return {name: e for name, e in self.files.items() if e.kind in ENGINE_KINDS}

    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": FORMAT, "format_version": self.format_version, "created": self.created,
            "config": self.config.to_dict(), "io": self.io, "source": self.source, "opset": self.opset,
            "precisions": self.precisions, "files": {k: v.to_dict() for k, v in self.files.items()},
            "tools": self.tools, "parity": self.parity,
        }
        if self.latent_stats is not None:
            out["latent_stats"] = self.latent_stats
        return out
