"""AOTInductor backend: runs a bundle's `.pt2` packages (compiled by rpiae.export.aoti) in-process.

Before loading, each package is checked against this machine (device, torch version, CPU
level flags or GPU compute capability) and refused with a one-line `BackendUnavailable`
when it cannot run here. AOTInductor's own input checks are switched on
(`AOTI_RUNTIME_CHECK_INPUTS=1`); the batch range of the package is checked here as well:
larger batches are split by the base class, a batch below the package's minimum (a fixed
batch profile) is padded with copies of its last item and the padding is dropped again.
Packages are unpacked under the rpiae cache directory (`cache_dir=`, `$RPIAE_CACHE_DIR`,
`~/.cache/rpiae`), not the system temp directory.

Both packages are loaded when the backend is opened: a package that cannot load is a
`BackendUnavailable` (the benchmark lists the row as skipped, and loading counts as load
time, not first-call time); only an error of the loaded package on a given input is an
`InputError`. CUDA packages run in their device's scope with TF32 off (FP32 parity).
"""

from __future__ import annotations

import torch

import logging
import os
import platform
from pathlib import Path
from typing import Any

from rpiae.cache import compiler_workdir
from rpiae.engines.base import (
    Backend, BackendUnavailable, InputError, check_graphs, device_scope, precision_context,
)
from rpiae.export.aoti import (
    CPU_LEVELS, PRECISION, bundle_packages, cuda_target, target_device, torch_minor, torch_version,
)
from rpiae.export.bundle import Bundle
from rpiae.export.manifest import KIND_AOTI_PACKAGE
from rpiae.export.spec import GRAPHS
from rpiae.host import cpu_flags


def enable_runtime_input_checks() -> None:
    """AOTInductor's generated input checks (shape, dtype, stride, batch upper bound) run only
    when AOTI_RUNTIME_CHECK_INPUTS is set; each model library reads it once, on first run."""
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"


def load_package(path: str | Path, device_index: int = -1, cache_dir: str | Path | None = None):
    """`torch._inductor.aoti_load_package` with input checks on, unpacked under `cache_dir`.

    Does not check the machine: call `check_runnable` on the manifest entry first.
    """
    enable_runtime_input_checks()
    pkg_log = logging.getLogger("torch.export.pt2_archive._package")
    level = pkg_log.level
    # torch warns when the package's ISA differs from this CPU's best one; the CPU level is
    # checked by check_runnable, and a CPU with more than the level needs is not a problem
    pkg_log.setLevel(logging.ERROR)
    try:
        with compiler_workdir(cache_dir):
            return torch._inductor.aoti_load_package(str(path), device_index=device_index)
    finally:
        pkg_log.setLevel(level)


def check_runnable(entry: dict[str, Any], device: str = "cpu", name: str = "package") -> None:
    """Refuse, with one line, a package this machine cannot run. Raises BackendUnavailable."""
    kind, index = target_device(device)
    if entry.get("device") != kind:
        raise BackendUnavailable(f"{name} was compiled for {entry.get('device')}, not {kind}")
    built = entry.get("torch", "?")
    if torch_minor(built) != torch_minor(torch_version()):
        raise BackendUnavailable(
            f"{name} was compiled with torch {built}, this is torch {torch_version()}: re-run "
            f"`rpiae export --target aoti --device {kind}` with this torch"
        )
    if kind == "cpu":
        level = entry.get("cpu_level", "?")
        machines = CPU_LEVELS.get(level, {}).get("machines", ())
        if platform.machine() not in machines:
            raise BackendUnavailable(f"{name} was compiled for {level} CPUs, this machine is {platform.machine()}")
        have = cpu_flags()
        missing = [f for f in entry.get("cpu_flags", []) if f not in have]
        if have and missing:
            raise BackendUnavailable(
                f"{name} was compiled for {level}; this CPU lacks {', '.join(missing)}: "
                "re-export on a machine of this CPU level or use the ort/torch backend"
            )
        return
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"{name} is a CUDA package and torch.cuda.is_available() is False here")
    here = cuda_target(None if index < 0 else index)
    if here["capability"] != entry.get("capability"):
        raise BackendUnavailable(
            f"{name} was compiled for compute capability {entry.get('capability')} ({entry.get('gpu')}), "
            f"this GPU is {here['capability']} ({here['gpu']}): re-export on this GPU"
        )


def find_packages(bundle: Bundle, device: str = "cpu", precision: str = PRECISION,
                  graphs: tuple[str, ...] = GRAPHS) -> dict[str, tuple[str, dict[str, Any]]]:
    """graph -> (file name, manifest entry) of the bundle's packages of `graphs` for `device`'s type."""
    kind, _ = target_device(device)
    found = {g: v for g, v in bundle_packages(bundle, kind, precision).items() if g in graphs}
    if set(found) != set(graphs):
        have = sorted({f"{e.facts.device}/{e.precision}" for e in bundle.files.values() if e.kind == KIND_AOTI_PACKAGE})
        raise BackendUnavailable(
            f"bundle {bundle.root} has no {precision} AOTInductor packages for {kind} "
            f"(has: {', '.join(have) or 'none'}); run `rpiae export --target aoti --device {kind} --out {bundle.root}`"
        )
    return found


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class AOTIBackend(Backend):
    name = "aoti"
    native = "torch"

    def __init__(
        self, bundle: Bundle, precision: str = "fp32", device: str = "cpu", max_batch: int | None = None,
        cache_dir: str | None = None, graphs: tuple[str, ...] = GRAPHS,
    ) -> None:
        self.check_precision(precision)
        try:
            kind, index = target_device(device)
        except ValueError as e:
            raise BackendUnavailable(f"aoti backend: {e}") from None
        self.bundle = bundle
        self.device = torch.device(kind, max(index, 0)) if kind == "cuda" else torch.device("cpu")
        self._device_index = index
        self.cache_dir = cache_dir
        self.packages = find_packages(bundle, device, precision, check_graphs(graphs))
        for name, entry in self.packages.values():
            check_runnable(entry, device, name=f"{bundle.root / name}")
        self.ranges = {g: (e["batch"]["min"], e["batch"]["max"]) for g, (_, e) in self.packages.items()}
        top = min(hi for _, hi in self.ranges.values())
        super().__init__(bundle.config, precision, min(max_batch, top) if max_batch else top, graphs)
        # resolve (and hash-check) the packages now: a tampered file fails before any work
        self._paths = {g: bundle.verify_file(name) for g, (name, _) in self.packages.items()}
        self._runners = {g: self._load(g) for g in self._paths}

    def _load(self, graph: str):
        try:
            return load_package(self._paths[graph], device_index=self._device_index if self.device.type == "cuda" else -1,
                                     cache_dir=self.cache_dir)
        except (RuntimeError, OSError) as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise BackendUnavailable(f"aoti backend: cannot load {self._paths[graph]}: {msg}") from None

    def runner(self, graph: str):
        return self._runners[graph]

    @torch.inference_mode()
    def _run(self, graph: str, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.ranges[graph]
        n = int(x.shape[0])
        if n > hi:
            raise InputError(f"{graph}: batch {n} exceeds the package's maximum {hi} (compiled profile {lo}..{hi})")
        if n < lo:
            x = torch.cat([x, x[-1:].expand(lo - n, *x.shape[1:])])
        runner = self.runner(graph)
        with device_scope(self.device), precision_context(self.device, torch.float32):
            x = x.to(device=self.device, dtype=torch.float32)
            if x.stride() != _dense_strides(x.shape):
                # the package checks strides exactly; numpy's x[None] gives a batch stride of 0
                x = torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)
            try:
                y = runner(x)
            except RuntimeError as e:
                raise InputError(f"{graph}: the AOTInductor package refused the input: {str(e).strip()}") from None
        return y[:n]

    def describe(self) -> dict:
        e = self.packages[self.graphs[0]][1]
        target = e.get("cpu_level") if e.get("device") == "cpu" else f"sm{e.get('capability', '').replace('.', '')}"
        return {**super().describe(), "device": str(self.device), "target": target,
                "batch": {g: {"min": lo, "max": hi} for g, (lo, hi) in self.ranges.items()}}

    def close(self) -> None:
        self._runners.clear()
