"""What a benchmark run measures: `BenchSettings` and the rows it expands to."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rpiae.export.backends import BUNDLE_DEFAULT, REFERENCE, RUNTIMES
from rpiae.export.spec import GRAPHS, PRECISIONS

DEFAULT_BACKENDS = (REFERENCE, BUNDLE_DEFAULT)  # the rows of a plain `rpiae bench`
BENCH_BACKENDS = RUNTIMES  # the backends and their named variants (`rpiae.export.backends.variant`)


@dataclass
class BenchSettings:
    model: str
    backends: list[str] = field(default_factory=lambda: list(DEFAULT_BACKENDS))
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    graphs: list[str] = field(default_factory=lambda: list(GRAPHS))
    device: str = "cpu"
    threads: int | None = None  # None: the cores this process may use
    warmup: int = 2
    warmup_time: float = 1.0
    min_iters: int = 5
    min_time: float = 3.0
    max_iters: int = 1000
    max_time: float = 60.0
    isolate: bool = True  # one fresh child process per row (true peak RSS per row)
    reference: bool = True  # always add the PyTorch eager rows the ratios are taken against
    peak_time: float = 1.0  # seconds per dtype for the run's matmul peaks
    peak_size: int | None = None  # matmul side for the peaks (default: 2048 CPU, 8192 CUDA)
    row_peak_time: float = 0.5  # seconds for the peak re-measured inside each child before the row (0: off)
    profile: bool = False  # op-type profile of each (backend, precision, graph) at the smallest batch
    notes: str = ""

    def __post_init__(self) -> None:
        if self.threads is None:
            self.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        bad = [b for b in self.backends if b not in BENCH_BACKENDS]
        if bad:
            raise ValueError(f"unknown backend {', '.join(bad)}; choose from: {', '.join(BENCH_BACKENDS)}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precision {', '.join(bad)}; choose from: {', '.join(PRECISIONS)}")
        bad = [g for g in self.graphs if g not in GRAPHS]
        if bad:
            raise ValueError(f"unknown graph {', '.join(bad)}; choose from: {', '.join(GRAPHS)}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError("batches must be positive integers")
        if self.warmup < 0 or self.min_iters < 1 or self.max_iters < self.min_iters:
            raise ValueError("need warmup >= 0 and 1 <= min_iters <= max_iters")

    def reference_precisions(self) -> list[str]:
        from rpiae.bench.peak import on_cuda

        return ["fp32", "bf16"] if on_cuda(self.device) else ["fp32"]

    def row_specs(self) -> list[dict[str, Any]]:
        """Rows in run order: per graph, the eager reference first, then the requested ones."""
        specs, seen = [], set()

        def add(graph: str, backend: str, precision: str, batch: int, reference: bool = False) -> None:
            key = (graph, backend, precision, batch)
            if key not in seen:
                seen.add(key)
                specs.append({"graph": graph, "backend": backend, "precision": precision, "batch": batch,
                              "reference": reference})

        for graph in self.graphs:
            if self.reference:
                for precision in self.reference_precisions():
                    for batch in self.batches:
                        add(graph, REFERENCE, precision, batch, reference=True)
            for backend in self.backends:
                for precision in self.precisions:
                    for batch in self.batches:
                        add(graph, backend, precision, batch)
        return specs
