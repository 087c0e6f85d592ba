"""AOTInductor backend: runs a bundle's `.pt2` packages (rpiae.export.aoti) in-process.

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

from rpiae.engines.base import Backend, BackendUnavailable, InputError, device_scope, precision_context
from rpiae.export.bundle import Bundle


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
        cache_dir: str | None = None,
    ) -> None:
        from rpiae.export import aoti

        if precision != aoti.PRECISION:
            raise BackendUnavailable(f"aoti backend runs fp32 packages only, not {precision}")
        try:
            kind, index = aoti._device_type(device)
        except ValueError as e:
            raise BackendUnavailable(f"aoti backend: {e}") from None
        self.bundle = bundle
        self.device = torch.device(kind, max(index, 0)) if kind == "cuda" else torch.device("cpu")
        self._device_index = index
        self.cache_dir = cache_dir
        self.packages = aoti.find_packages(bundle, device, precision)
        for name, entry in self.packages.values():
            aoti.check_runnable(entry, device, name=f"{bundle.root / name}")
        self.ranges = {g: (e["batch"]["min"], e["batch"]["max"]) for g, (_, e) in self.packages.items()}
        top = min(hi for _, hi in self.ranges.values())
        super().__init__(bundle.config, precision, min(max_batch, top) if max_batch else top)
        # resolve (and hash-check) both packages now: a tampered file fails before any work
        self._paths = {g: bundle.verify_file(name) for g, (name, _) in self.packages.items()}
        self._runners = {g: self._load(g) for g in self._paths}

    def _load(self, graph: str):
        from rpiae.export import aoti

        try:
            return aoti.load_package(self._paths[graph], device_index=self._device_index if self.device.type == "cuda" else -1,
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
        e = self.packages["encode"][1]
        target = e.get("cpu_level") if e.get("device") == "cpu" else f"sm{e.get('capability', '').replace('.', '')}"
        return {**super().describe(), "device": str(self.device), "target": target,
                "batch": {g: {"min": lo, "max": hi} for g, (lo, hi) in self.ranges.items()}}

    def close(self) -> None:
        self._runners.clear()
