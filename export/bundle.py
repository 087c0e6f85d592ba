"""Export bundles: a directory of graphs plus a `manifest.json` that describes them.

    BUNDLE/
      manifest.json            model config, I/O conventions, files with sha256, precisions,
                               opset, tool versions, parity results, engines
      model.safetensors        the source weights (fp32), so a bundle alone is enough
      encode.fp32.onnx  decode.fp32.onnx  (and .fp16 / .int8 variants)
      engines/...              TensorRT / AOTInductor artefacts, added by later steps

A bundle is written into a hidden temporary directory and renamed when complete, so an
interrupted export leaves nothing that looks finished. Opening a bundle checks every
listed file's size; a file is sha256-verified before first use, so a tampered or truncated
file is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata as _md
from pathlib import Path
from typing import Any

from rpiae.config import RPiAEConfig
from rpiae.fileio import atomic_file, sha256_file

MANIFEST = "manifest.json"
FORMAT = "rpiae-bundle"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


class BundleError(ValueError):
    """A bundle that is missing, incomplete, tampered with, or lacks what was asked for."""


def onnx_name(graph: str, precision: str) -> str:
    return f"{graph}.{precision}.onnx"


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("rpiae", "torch", "onnx", "onnxruntime", "onnxslim", "onnxscript", "nvidia-modelopt", "tensorrt", "polygraphy"):
        try:
            out[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            pass
    return out


def io_conventions(config: RPiAEConfig) -> dict[str, Any]:
    c, g, s = config.latent_channels, config.grid_size, config.image_size
    return {
        "encode": {
            "input": {"name": "images", "shape": ["batch", 3, s, s], "dtype": "float32", "layout": "NCHW",
                      "colour": "RGB", "range": [0.0, 1.0]},
            "output": {"name": "latent", "shape": ["batch", c, g, g], "dtype": "float32",
                       "meaning": "posterior mean, normalised per element: (z - latent_mean) / sqrt(latent_var + eps)"
                       if config.latent_norm else "posterior mean, unscaled"},
        },
        "decode": {
            "input": {"name": "latent", "shape": ["batch", c, g, g], "dtype": "float32"},
            "output": {"name": "image", "shape": ["batch", 3, s, s], "dtype": "float32", "layout": "NCHW",
                       "colour": "RGB", "range": "nominally [0, 1], not clamped: clamp and quantise in post-processing"},
        },
        "image_policy": "see rpiae.imageio: by default the RPiAE authors' preprocessing (PIL convert('RGB'), ADM "
                        "center_crop_arr: BOX halving, BICUBIC short side to 256, centre crop 256x256, / 255)",
    }


class Bundle:
    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self.config = RPiAEConfig.from_dict(manifest["config"])
        self._verified: set[str] = set()

    # -- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> "Bundle":
        root = Path(path)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"{root}: not a bundle directory")
        if not mpath.is_file():
            raise BundleError(f"{root}: no {MANIFEST} (an incomplete or foreign directory)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise BundleError(f"{mpath}: not an rpiae bundle manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise BundleError(f"{mpath}: bundle format {manifest['format_version']} is newer than this rpiae")
        bundle = cls(root, manifest)
        for name, entry in manifest.get("files", {}).items():
            p = root / name
            if not p.is_file():
                raise BundleError(f"{root}: listed file {name} is missing")
            if p.stat().st_size != entry["bytes"]:
                raise BundleError(
                    f"{root}: {name} is {p.stat().st_size} bytes, the manifest says {entry['bytes']} "
                    "(truncated or modified); re-export the bundle"
                )
        return bundle

    @staticmethod
    def is_bundle(path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    # -- files ---------------------------------------------------------------------------------
    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest.setdefault("files", {})

    def verify_file(self, name: str) -> Path:
        """Path of a listed file after checking its sha256 (once per process)."""
        if name not in self.files:
            raise BundleError(f"{self.root}: {name} is not part of this bundle")
        p = self.root / name
        if name not in self._verified:
            entry = self.files[name]
            if not p.is_file():
                raise BundleError(f"{self.root}: listed file {name} is missing")
            digest = sha256_file(p)
            if digest != entry["sha256"]:
                raise BundleError(f"{self.root}: {name} fails its sha256 check (tampered or corrupted); re-export the bundle")
            for dep in entry.get("external_data", []):
                self.verify_file(dep)
            self._verified.add(name)
        return p

    def verify_all(self) -> None:
        for name in self.files:
            self.verify_file(name)

    def find(self, graph: str, precision: str, kind: str = "onnx") -> str | None:
        for name, entry in self.files.items():
            if entry.get("graph") == graph and entry.get("precision") == precision and entry.get("kind") == kind:
                return name
        return None

    def precisions(self, kind: str = "onnx") -> list[str]:
        found = {e["precision"] for e in self.files.values() if e.get("kind") == kind and "precision" in e}
        return [p for p in ("fp32", "fp16", "bf16", "int8") if p in found]

    def graph_path(self, graph: str, precision: str, kind: str = "onnx") -> Path:
        name = self.find(graph, precision, kind)
        if name is None:
            have = ", ".join(self.precisions(kind)) or "none"
            raise BundleError(
                f"bundle {self.root} has no {precision} {graph} {kind} (has: {have}); "
                f"re-export with --precision {precision}"
            )
        return self.verify_file(name)

    def weights_path(self) -> Path:
        if WEIGHTS not in self.files:
            raise BundleError(f"bundle {self.root} carries no {WEIGHTS}")
        return self.verify_file(WEIGHTS)

    # -- writing -------------------------------------------------------------------------------
    def add_file(self, name: str, **entry: Any) -> dict[str, Any]:
        """Record a file that already sits at its final place inside the bundle."""
        p = self.root / name
        record = {"sha256": sha256_file(p), "bytes": p.stat().st_size, **entry}
        self.files[name] = record
        self._verified.add(name)
        return record

    def remove_file(self, name: str) -> None:
        self.files.pop(name, None)
        self._verified.discard(name)

    def write_manifest(self) -> None:
        with atomic_file(self.root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=False) + "\n")

    @classmethod
    def new(cls, root: Path, config: RPiAEConfig, source: dict[str, Any], opset: int) -> "Bundle":
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_dict(),
            "io": io_conventions(config),
            "source": source,
            "opset": opset,
            "precisions": [],
            "files": {},
            "tools": tool_versions(),
            "parity": {},
            "engines": {},
        }
        return cls(Path(root), manifest)

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "bundle": str(self.root),
            "model": m["config"].get("name"),
            "source": m.get("source"),
            "precisions": self.precisions(),
            "opset": m.get("opset"),
            "files": {k: {kk: v[kk] for kk in ("kind", "graph", "precision", "bytes", "sha256") if kk in v} for k, v in self.files.items()},
            "engines": m.get("engines", {}),
            "parity": m.get("parity", {}),
        }
