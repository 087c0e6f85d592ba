"""The export targets, declared once: what `rpiae export --target NAME` adds to a bundle, the
function that builds it and the backend whose run of it is measured against PyTorch.

Every target is the same three steps (`rpiae.verify.export_target`): build (the ONNX bundle is
always built or reused first; a target's `builder` then adds its files), check (the files the
step built are run by `checked_by` on real photos and compared with eager PyTorch FP32),
record (the parity rows into the manifest). Adding a target: a builder function beside the code
that writes its files (`module:function`, signature below) and one entry here; the CLI's
`--target` choices, its early check and the parity step read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from rpiae.export.backends import BUNDLE_DEFAULT
from rpiae.export.manifest import KIND_AOTI_PACKAGE, KIND_ONNX, KIND_TRT_ENGINE


@dataclass(frozen=True)
class Built:
    """What a target's builder added: its precisions, and the device they run on (for parity)."""

    precisions: list[str]
    device: str


@dataclass(frozen=True)
class Target:
    name: str  # the `--target` value
    kind: str  # the bundle file kind it adds
    checked_by: str  # the backend (rpiae.export.backends) that runs those files for the parity check
    summary: str
    # "module:function"(bundle, precisions, profile, device, progress, **options) -> Built; "" for the
    # ONNX bundle itself (rpiae.export.build.build_bundle)
    builder: str = ""
    # "module:function"(device) -> (device, note or None): resolves `--device` and refuses, in one
    # line, a target this machine cannot build, before the (long) ONNX export
    prepare: str = ""
    options: tuple[str, ...] = ()  # the builder's own keyword options (the CLI flags of the same names)

    def resolve(self, device: str) -> tuple[str, str | None]:
        return _call(self.prepare, device) if self.prepare else (device, None)

    def build(self, bundle, precisions: list[str], profile, device: str, progress: bool = True,
              **options: Any) -> Built:
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"--target {self.name} takes no {', '.join(sorted(unknown))}")
        return _call(self.builder, bundle, precisions, profile, device, progress=progress, **options)


def _call(spec: str, *args: Any, **kwargs: Any) -> Any:
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)(*args, **kwargs)


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("onnx", KIND_ONNX, BUNDLE_DEFAULT, "the ONNX bundle only (FP32 and each asked precision's graph)"),
    Target("trt", KIND_TRT_ENGINE, "trt", "also TensorRT engines of the asked precisions, for this machine's GPU",
           builder="rpiae.export.tensorrt:build_target", prepare="rpiae.export.tensorrt:prepare_target",
           options=("workspace_gb", "timing_cache", "opt_level", "version_compatible")),
    Target("aoti", KIND_AOTI_PACKAGE, "aoti", "also AOTInductor packages (FP32) for --device",
           builder="rpiae.export.aoti:build_target", prepare="rpiae.export.aoti:prepare_target",
           options=("cache_dir",)),
)}
ONNX_TARGET = "onnx"  # the target every other one starts from
# the `--target` that builds each file kind (what runs each: rpiae.export.backends)
FILE_KIND_TARGET = {t.kind: t.name for t in TARGETS.values()}


def target_info(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown export target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]
