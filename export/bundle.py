"""Export bundles: a directory of graphs plus a `manifest.json` that describes them.

    BUNDLE/
      manifest.json            model config, I/O conventions, files with sha256, precisions,
                               opset, tool versions, parity results, engines (rpiae.export.manifest)
      model.safetensors        the source weights (fp32), so a bundle alone is enough
      encode.fp32.onnx  decode.fp32.onnx  (and .fp16 / .int8 variants)
      engines/...              TensorRT / AOTInductor artefacts, added by later steps

A bundle is written into a hidden temporary directory and renamed when complete, so an
interrupted export leaves nothing that looks finished. Opening a bundle checks the manifest
against its schema, every listed file's size, and that the model config is the same in the
manifest, in the weights' metadata and in every ONNX graph's metadata (the three copies each
reader may trust); a file is sha256-verified before first use, so a tampered or truncated
file is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from rpiae.config import RPiAEConfig
from rpiae.export.manifest import (
    FORMAT_VERSION, KIND_ONNX, MANIFEST, WEIGHTS, BundleError, FileEntry, Manifest, ManifestError, onnx_name,
)
from rpiae.export.spec import PRECISIONS
from rpiae.fileio import atomic_file, sha256_file

__all__ = ["FORMAT_VERSION", "MANIFEST", "WEIGHTS", "Bundle", "BundleError", "ManifestError", "onnx_name"]


def config_differences(a: RPiAEConfig, b: RPiAEConfig) -> list[str]:
    """`field: a vs b` for each field in which two configs differ (the name is a label, not compared)."""
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(a)
            if f.compare and getattr(a, f.name) != getattr(b, f.name)]


class Bundle:
    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self._verified: set[str] = set()

    @property
    def config(self) -> RPiAEConfig:
        return self.manifest.config

    @property
    def files(self) -> dict[str, FileEntry]:
        return self.manifest.files

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
            data = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ManifestError(f"{mpath}: unreadable manifest ({e})") from None
        bundle = cls(root, Manifest.from_dict(data, where=str(mpath)))
        for name, entry in bundle.files.items():
            p = root / name
            if not p.is_file():
                raise BundleError(f"{root}: listed file {name} is missing")
            if p.stat().st_size != entry.bytes:
                raise BundleError(
                    f"{root}: {name} is {p.stat().st_size} bytes, the manifest says {entry.bytes} "
                    "(truncated or modified); re-export the bundle"
                )
        bundle.check_config_copies()
        return bundle

    @staticmethod
    def is_bundle(path: str | Path) -> bool:
        return (Path(path) / MANIFEST).is_file()

    def check_config_copies(self) -> None:
        """Refuse a bundle whose weights or ONNX graphs carry another model config than its manifest."""
        from rpiae.checkpoints import read_config
        from rpiae.export.onnx_export import read_metadata

        copies: list[tuple[str, RPiAEConfig | None]] = []
        if WEIGHTS in self.files:
            copies.append((WEIGHTS, read_config(self.root / WEIGHTS)))
        for name, entry in self.files.items():
            if entry.kind == KIND_ONNX:
                text = read_metadata(self.root / name).get("rpiae.config")
                copies.append((name, RPiAEConfig.from_json(text) if text else None))
        for name, config in copies:
            if config is None:
                raise BundleError(f"{self.root}: {name} carries no model config; re-export the bundle")
            diff = config_differences(self.config, config)
            if diff:
                raise BundleError(f"{self.root}: the model config in {name} differs from the manifest's "
                                  f"({'; '.join(diff[:3])}); re-export the bundle")

    # -- files ---------------------------------------------------------------------------------
    def verify_file(self, name: str) -> Path:
        """Path of a listed file after checking its sha256 (once per process)."""
        if name not in self.files:
            raise BundleError(f"{self.root}: {name} is not part of this bundle")
        p = self.root / name
        if name not in self._verified:
            entry = self.files[name]
            if not p.is_file():
                raise BundleError(f"{self.root}: listed file {name} is missing")
            if sha256_file(p) != entry.sha256:
                raise BundleError(f"{self.root}: {name} fails its sha256 check (tampered or corrupted); re-export the bundle")
            for dep in entry.external_data:
                self.verify_file(dep)
            self._verified.add(name)
        return p

    def verify_all(self) -> None:
        for name in self.files:
            self.verify_file(name)

    def find(self, graph: str, precision: str, kind: str = KIND_ONNX) -> str | None:
        for name, entry in self.files.items():
            if entry.graph == graph and entry.precision == precision and entry.kind == kind:
                return name
        return None

    def precisions(self, kind: str = KIND_ONNX) -> list[str]:
        found = {e.precision for e in self.files.values() if e.kind == kind}
        return [p for p in PRECISIONS if p in found]

    def graph_path(self, graph: str, precision: str, kind: str = KIND_ONNX) -> Path:
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
    def add_file(self, name: str, kind: str, graph: str | None = None, precision: str | None = None,
                 **facts: Any) -> FileEntry:
        """Record a file that already sits at its final place inside the bundle."""
        p = self.root / name
        entry = {"sha256": sha256_file(p), "bytes": p.stat().st_size, "kind": kind, "graph": graph,
                 "precision": precision, **facts}
        self.files[name] = FileEntry.from_dict({k: v for k, v in entry.items() if v is not None},
                                               str(self.root / MANIFEST), name)
        self._verified.add(name)
        return self.files[name]

    def remove_file(self, name: str) -> None:
        self.files.pop(name, None)
        self._verified.discard(name)

    def write_manifest(self) -> None:
        """Write manifest.json atomically, after checking it against the schema."""
        data = self.manifest.to_dict()
        Manifest.from_dict(json.loads(json.dumps(data)), where=str(self.root / MANIFEST))
        with atomic_file(self.root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

    def write_subset(self, dest: str | Path, names: list[str]) -> "Bundle":
        """A bundle at `dest` (a new directory) holding only `names`, their external data and a
        manifest listing just those (sha256-checked here first). Files are hard-linked from
        this bundle where the filesystem allows, else copied."""
        keep = set()
        for name in names:
            self.verify_file(name)
            keep |= {name, *self.files[name].external_data}
        dest = Path(dest)
        dest.mkdir(parents=True)
        manifest = copy.deepcopy(self.manifest)
        manifest.files = {k: v for k, v in manifest.files.items() if k in keep}
        for name in manifest.files:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self.root / name, target)
            except OSError:
                shutil.copyfile(self.root / name, target)
        subset = Bundle(dest, manifest)
        subset.write_manifest()
        return subset

    @classmethod
    def new(cls, root: Path, config: RPiAEConfig, source: dict[str, Any], opset: int) -> "Bundle":
        return cls(Path(root), Manifest(config=config, source=dict(source), opset=opset))

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "bundle": str(self.root),
            "model": m.config.name,
            "source": m.source,
            "precisions": self.precisions(),
            "opset": m.opset,
            "files": {k: {kk: v[kk] for kk in ("kind", "graph", "precision", "bytes", "sha256") if kk in v}
                      for k, v in self.files.items()},
            "engines": {name: e.to_dict() for name, e in m.engines.items()},
            "parity": m.parity,
        }


def model_info(model: "Bundle | str | Path | None") -> dict[str, Any]:
    """What a job ran: {"path", "sha256", "config"} of a checkpoint or bundle (for a bundle, the
    sha256 of its manifest, which lists every file's sha256). An open `Bundle` is described as
    it is, without opening it again."""
    from rpiae.checkpoints import checkpoint_sha256, read_config
    from rpiae.hub import resolve_model

    bundle = model if isinstance(model, Bundle) else None
    path = bundle.root if bundle is not None else resolve_model(model)
    if bundle is None and Bundle.is_bundle(path):
        bundle = Bundle.open(path)
    if bundle is not None:
        return {"path": str(path), "sha256": sha256_file(path / MANIFEST), "config": bundle.config.to_dict()}
    cfg = read_config(path)
    return {"path": str(path), "sha256": checkpoint_sha256(path), "config": cfg.to_dict() if cfg else None}
