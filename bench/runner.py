"""`run_benchmark`: every backend x precision x graph x batch, side by side, in one run.

Methodology (recorded in the results' `methodology`):

- One row = (backend, precision, graph, batch). By default each row runs in a fresh
  child process (multiprocessing `spawn`): the RSS high-water mark of a process only
  rises, so measuring several rows in one process would charge every row with the largest
  one before it. The child's `ru_maxrss` is the row's peak host RSS; its RSS right before
  the backend is opened (interpreter + torch + runtime libraries) is recorded as the
  baseline, and `peak - baseline` is what the row itself costs.
- Threads are fixed: `OMP_NUM_THREADS`/`MKL_NUM_THREADS` in the child's environment,
  `torch.set_num_threads`, ONNX Runtime `intra_op_num_threads`; all recorded.
- Warm-up: at least `warmup` calls and `warmup_time` seconds (compilation, allocator and
  thread-pool start-up happen there). Then timed calls until at least `min_iters` calls and
  `min_time` seconds, or `max_iters` calls / `max_time` seconds, whichever comes first.
  p50/p90/p99 over the timed calls; throughput = batch / p50.
- End-to-end time = host numpy array in -> host numpy array out (`time.perf_counter`),
  i.e. including host<->device copies on a GPU. On CUDA, compute time is measured apart:
  inputs already on the device (torch tensors; ONNX Runtime binds them, no host copy), CUDA
  events recorded on the backend's execution stream (its `stream` attribute where it has
  one, else torch's current stream of the run's GPU). Every CUDA call names the run's GPU
  (`cuda:N` measures GPU N). The parent process never initialises CUDA on a GPU run: machine
  facts and matmul peaks are taken in child processes (a GPU in exclusive-process mode then
  still gives every row its context).
- Reference: PyTorch eager FP32 (and BF16 on CUDA) rows are always measured, so every row
  has its speed-up over eager at the same batch in the same run.
- Hardware limit: matmul peaks measured before and after the rows (and briefly inside
  each child before it opens the backend, for the row's own dtype only: `local_peak`).
  Fraction of peak =
  `RPiAEConfig.flops()[graph] * batch / p50` over the best of the run's peaks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

FORMAT = "rpiae-bench"
FORMAT_VERSION = 1
GRAPHS = ("encode", "decode")
BENCH_BACKENDS = ("torch", "torch-compile", "ort", "trt", "aoti", "torch-trt")
BENCH_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TORCH_PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class BenchSettings:
    model: str
    backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
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
        bad = [p for p in self.precisions if p not in BENCH_PRECISIONS]
        if bad:
            raise ValueError(f"unknown precision {', '.join(bad)}; choose from: {', '.join(BENCH_PRECISIONS)}")
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
                        add(graph, "torch", precision, batch, reference=True)
            for backend in self.backends:
                for precision in self.precisions:
                    for batch in self.batches:
                        add(graph, backend, precision, batch)
        return specs


# ---------------------------------------------------------------------------------------------
# timing


def time_loop(fn: Callable[[], Any], *, warmup: int, warmup_time: float, min_iters: int, min_time: float,
              max_iters: int, max_time: float, timer: Callable[[Callable[[], Any]], float] | None = None
              ) -> tuple[list[float], dict[str, Any]]:
    """Warm up, then time `fn` until enough calls and seconds (or a cap). Returns (seconds, info)."""

    def wall(f: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    timer = timer or wall
    w_start, w_calls = time.perf_counter(), 0
    first = None
    while w_calls < warmup or (time.perf_counter() - w_start < warmup_time and w_calls < max(warmup, 1) * 50):
        t = timer(fn)
        first = t if first is None else first
        w_calls += 1
        if time.perf_counter() - w_start > max_time and w_calls >= warmup:
            break
    warm_s = time.perf_counter() - w_start
    times: list[float] = []
    start = time.perf_counter()
    capped = None
    while True:
        times.append(timer(fn))
        elapsed = time.perf_counter() - start
        if len(times) >= min_iters and elapsed >= min_time:
            break
        if len(times) >= max_iters:
            capped = "max_iters"
            break
        if elapsed >= max_time and len(times) >= 1:
            capped = "max_time"
            break
    return times, {"warmup_calls": w_calls, "warmup_s": warm_s, "first_call_s": first, "timed_s": time.perf_counter() - start,
                   "capped_by": capped}


def stats(times: list[float], batch: int) -> dict[str, Any]:
    import numpy as np

    t = np.asarray(times, dtype=np.float64) * 1e3
    p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
    return {
        "iterations": int(len(t)),
        "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
        "mean_ms": float(t.mean()), "min_ms": float(t.min()), "max_ms": float(t.max()),
        "std_ms": float(t.std()),
        "throughput_ips": batch / (p50 / 1e3),
    }


# ---------------------------------------------------------------------------------------------
# one row (runs in the child process when isolated)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _open_backend(model: str, backend: str, precision: str, device: str, threads: int, **kwargs):
    from rpiae.engines import load_backend

    if backend == "torch-compile":
        return load_backend(model, "torch", precision, device, compile=True)
    if backend == "ort":
        return load_backend(model, "ort", precision, device, threads=threads, **kwargs)
    return load_backend(model, backend, precision, device)


def graph_weight_bytes(model: str, backend: str, precision: str, graph: str) -> dict[str, Any]:
    """Bytes of the weights of one graph as this backend holds them."""
    from rpiae.export.bundle import Bundle
    from rpiae.export.graphs import GRAPH_MODULES

    path = Path(model)
    if backend == "torch-trt":  # the weights live inside Torch-TensorRT's engines
        return {"weight_bytes": None, "weight_source": None}
    if backend in ("torch", "torch-compile"):
        from safetensors import safe_open

        weights = Bundle.open(path).weights_path() if Bundle.is_bundle(path) else path
        prefixes = tuple(f"{m}." for m in GRAPH_MODULES[graph])
        total = 0
        if str(weights).endswith(".safetensors"):
            with safe_open(str(weights), "pt") as f:
                for k in f.keys():
                    if k.startswith(prefixes):
                        sl = f.get_slice(k)
                        n = 1
                        for d in sl.get_shape():
                            n *= d
                        total += n * 4  # the torch backend keeps fp32 weights (autocast casts on the fly)
        return {"weight_bytes": total or None, "weight_source": "fp32 parameters of the graph's modules"}
    if Bundle.is_bundle(path):
        bundle = Bundle.open(path)
        name = f"{graph}.{precision}.onnx"
        if name in bundle.files:
            files = [name, *bundle.files[name].get("external_data", [])]
            return {"weight_bytes": sum((path / f).stat().st_size for f in files),
                    "weight_source": " + ".join(files)}
    return {"weight_bytes": None, "weight_source": None}


def _device_input(x, dev):
    """The benchmark input as a tensor on the run's GPU."""
    import torch

    return torch.from_numpy(x).to(dev)


def _cuda_compute_times(backend, x_dev, n: int, warm: int, dev) -> list[float]:
    import torch

    stream = getattr(backend, "stream", None)
    if isinstance(stream, int):
        stream = torch.cuda.ExternalStream(stream, device=dev)
    elif stream is None:
        stream = torch.cuda.current_stream(dev)
    fn = backend.encode if x_dev.shape[1] == 3 else backend.decode
    for _ in range(warm):
        fn(x_dev)
    torch.cuda.synchronize(dev)
    out = []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(stream)
        fn(x_dev)
        e1.record(stream)
        e1.synchronize()
        out.append(e0.elapsed_time(e1) / 1e3)
    return out


def measure_row(spec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Measure one row. Never raises: failures come back as status `skipped`/`error`."""
    import traceback

    row = {k: spec[k] for k in ("graph", "backend", "precision", "batch", "reference")}
    row["device"] = settings["device"]
    try:
        return _measure_row(row, settings)
    except Exception as e:  # noqa: BLE001 - one row failing must not end the run
        from rpiae.engines.base import BackendUnavailable

        try:
            from rpiae.export.bundle import BundleError
        except ImportError:  # pragma: no cover
            BundleError = ()  # type: ignore[assignment]
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, (BackendUnavailable, BundleError, ImportError, ModuleNotFoundError)):
            row.update(status="skipped", reason=msg)
        else:
            row.update(status="error", reason=f"{type(e).__name__}: {msg}",
                       traceback=traceback.format_exc(limit=6)[-2000:])
        return row


def _measure_row(row: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    from rpiae.engines.base import device_scope, torch_device

    dev = torch_device(settings["device"])
    with device_scope(dev):  # torch's current GPU is the run's: streams, caches and memory stats are its
        return _measure_row_on(row, settings, dev)


def _measure_row_on(row: dict[str, Any], settings: dict[str, Any], dev) -> dict[str, Any]:
    import numpy as np
    import torch

    from rpiae.bench.peak import measure_peaks, on_cuda, peak_dtype, peak_key

    threads = int(settings["threads"])
    torch.set_num_threads(threads)
    device = settings["device"]
    graph, batch, precision = row["graph"], row["batch"], row["precision"]
    cuda = on_cuda(device)
    if settings["row_peak_time"] > 0:
        # the same matmul as the run's peak, right before this row and for this row's dtype only:
        # the share of the machine this row had (other processes on a shared machine move it by a
        # factor, not by ±20 %)
        local = measure_peaks(device, threads, min_time=settings["row_peak_time"], size=settings.get("peak_size"),
                              dtypes=[peak_dtype(device, precision)])
        key = peak_key(device, precision, local)
        row["local_peak"] = {"dtype": key, "gflops": local[key]["gflops"]} if key else None
    if cuda:
        torch.cuda.empty_cache()  # the local peak's matrices must not count against the row
        torch.cuda.reset_peak_memory_stats(dev)
        free0, total = torch.cuda.mem_get_info(dev)
    isolated = settings["isolate"]
    row["rss_baseline_bytes"] = _rss() if isolated else None
    t0 = time.perf_counter()
    backend = _open_backend(settings["model"], row["backend"], precision, device, threads)
    row["load_s"] = time.perf_counter() - t0
    try:
        x = _input(backend.config, graph, batch)  # timing does not depend on the values (no data-dependent paths)
        fn_graph = backend.encode if graph == "encode" else backend.decode
        t1 = time.perf_counter()
        y = fn_graph(x)  # warm-up call 1: output check (and compilation for torch-compile)
        row["first_call_s"] = time.perf_counter() - t1
        row["output_finite"] = bool(np.isfinite(np.asarray(y)).all())
        del y
        loop = {k: settings[k] for k in ("warmup", "warmup_time", "min_iters", "min_time", "max_iters", "max_time")}
        loop["warmup"] = max(loop["warmup"] - 1, 0)
        loop["warmup_time"] = max(loop["warmup_time"] - row["first_call_s"], 0.0)
        times, info = time_loop(lambda: fn_graph(x), **loop)
        row.update(status="ok", timing=stats(times, batch), loop=info)
        row["threads"] = {"torch": torch.get_num_threads(), "ort_intra_op": threads if row["backend"] == "ort" else None,
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        row["backend_info"] = {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v))
                               for k, v in backend.describe().items()}
        if cuda:
            x_dev = _device_input(x, dev)
            n = max(settings["min_iters"], min(len(times), 200))
            ctimes = _cuda_compute_times(backend, x_dev, n, warm=max(settings["warmup"], 1), dev=dev)
            row["compute"] = {**stats(ctimes, batch), "method": "CUDA events on the execution stream, device-resident input"}
            row["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            free1, _ = torch.cuda.mem_get_info(dev)
            row["cuda_device_used_delta_bytes"] = int(free0 - free1)
            row["cuda_total_bytes"] = int(total)
    finally:
        backend.close()
    row["rss_peak_bytes"] = _peak_rss() if isolated else None
    if isolated and row["rss_baseline_bytes"] is not None:
        row["rss_delta_bytes"] = row["rss_peak_bytes"] - row["rss_baseline_bytes"]
    row.update(graph_weight_bytes(settings["model"], row["backend"], precision, graph))
    return row


def _child_env(threads: int) -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def env():
        keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        old = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: str(threads) for k in keys})
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return env()


def run_in_child(fn: Callable[..., dict[str, Any]], *args: Any, threads: int) -> dict[str, Any]:
    """Run `fn(*args)` in a fresh spawned process (its own RSS high-water mark), threads fixed;
    a child that dies becomes an error row."""
    from rpiae.isolation import ChildProcessDied
    from rpiae.isolation import run_in_child as _run

    with _child_env(threads):
        try:
            return _run(fn, *args, what="the child process")
        except ChildProcessDied:
            return {"status": "error", "reason": "the child process died (killed, e.g. out of memory)"}


# ---------------------------------------------------------------------------------------------
# profiles (optional): where the time of a graph goes, by op type


def profile_graph(spec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Op-type time shares of one (backend, precision, graph) at one batch. Never raises."""
    out = {k: spec[k] for k in ("graph", "backend", "precision", "batch")}
    try:
        out.update(_profile_graph(spec, settings))
        out["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        out.update(status="skipped", reason=" ".join(str(e).split())[:300] or type(e).__name__)
    return out


def _profile_graph(spec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    import tempfile

    import torch

    threads = int(settings["threads"])
    torch.set_num_threads(threads)
    graph, batch, precision = spec["graph"], spec["batch"], spec["precision"]
    runs = 2
    totals: dict[str, float] = {}
    if spec["backend"] == "ort":
        # the row's own backend on the run's device (providers, device id, I/O binding), profiling on
        with tempfile.TemporaryDirectory() as tmp:
            backend = _open_backend(settings["model"], "ort", precision, settings["device"], threads, profile_dir=tmp)
            try:
                x = _input(backend.config, graph, batch)
                fn = backend.encode if graph == "encode" else backend.decode
                for _ in range(runs):
                    fn(x)
                events = json.loads(Path(backend.end_profiling(graph)).read_text())
                providers = backend.describe()["providers"]
            finally:
                backend.close()
        for ev in events:
            if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
                op = ev.get("args", {}).get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + ev.get("dur", 0) / 1e6
        tool = f"onnxruntime profiler (kernel time by op type; {', '.join(providers)})"
    elif spec["backend"] in ("torch", "torch-compile"):
        from torch.profiler import ProfilerActivity, profile

        backend = _open_backend(settings["model"], spec["backend"], precision, settings["device"], threads)
        x = _input(backend.config, graph, batch)
        fn = backend.encode if graph == "encode" else backend.decode
        fn(x)
        from rpiae.bench.peak import on_cuda

        cuda = on_cuda(settings["device"])
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for _ in range(runs):
                fn(x)
        for ev in prof.key_averages():
            t = (ev.self_device_time_total if cuda else ev.self_cpu_time_total) / 1e6
            if t > 0:
                totals[ev.key] = totals.get(ev.key, 0.0) + t
        tool = "torch.profiler (self time by op)"
    else:
        raise RuntimeError(f"no profiler hook for backend {spec['backend']}")
    total = sum(totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
    return {"tool": tool, "runs": runs, "total_s": total,
            "ops": [{"op": k, "seconds": v, "share": v / total} for k, v in top]}


def _input(cfg, graph: str, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = cfg.image_shape if graph == "encode" else cfg.latent_shape
    return (rng.random((batch, *shape), dtype=np.float32) if graph == "encode"
            else rng.standard_normal((batch, *shape), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# the run


def _static_skip(spec: dict[str, Any], is_bundle: bool, bundle_precisions: list[str]) -> str | None:
    b, p = spec["backend"], spec["precision"]
    if b in ("torch", "torch-compile") and p not in TORCH_PRECISIONS:
        return f"{b} runs {', '.join(TORCH_PRECISIONS)} (autocast), not {p}; {p} is an exported-graph precision"
    if b == "torch-trt" and p not in TORCH_PRECISIONS:
        return f"torch-trt compiles {', '.join(TORCH_PRECISIONS)}, not {p}; the bundle's {p} engines run with trt"
    if b in ("ort", "trt", "aoti") and not is_bundle:
        return f"backend {b!r} runs an export bundle; --model is a checkpoint (run `rpiae export` first)"
    if b == "ort" and p not in bundle_precisions:
        have = ", ".join(bundle_precisions) or "none"
        return f"the bundle has no {p} graphs (has: {have}); export them with `rpiae export --precision {p}`"
    return None


def _derive(result: dict[str, Any]) -> None:
    """Fill speed-ups over PyTorch eager and fractions of the measured peak into each row."""
    from rpiae.bench.peak import peak_key

    flops = result["model"]["flops_per_image"]
    peaks = result["peaks"]["used"]
    device = result["settings"]["device"]
    rows = result["rows"]
    ok = [r for r in rows if r.get("status") == "ok"]
    refs = {(r["graph"], r["batch"], r["precision"]): r for r in ok if r["backend"] == "torch"}

    def t(r: dict[str, Any]) -> float:
        return r["timing"]["p50_ms"]

    for r in ok:
        r["speedup_vs_torch"] = {p: refs[(r["graph"], r["batch"], p)]["timing"]["p50_ms"] / t(r)
                                 for p in TORCH_PRECISIONS if (r["graph"], r["batch"], p) in refs}
        measured_ms = r["compute"]["p50_ms"] if "compute" in r else t(r)
        achieved = flops[r["graph"]] * r["batch"] / (measured_ms / 1e3) / 1e9
        r["gflops"] = achieved
        key = peak_key(device, r["precision"], {k: {"gflops": v} for k, v in peaks.items()})
        r["peak_dtype"] = key
        r["fraction_of_peak"] = achieved / peaks[key] if key else None
        lp = r.get("local_peak")
        r["fraction_of_local_peak"] = achieved / lp["gflops"] if lp and lp.get("gflops") else None
        if r.get("weight_bytes"):
            if r.get("rss_peak_bytes"):
                r["rss_over_weights"] = r["rss_peak_bytes"] / r["weight_bytes"]
            if r.get("rss_delta_bytes") is not None:
                r["rss_delta_over_weights"] = r["rss_delta_bytes"] / r["weight_bytes"]


def run_benchmark(settings: BenchSettings, out: str | Path | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every row, derive ratios and fractions, write `out` atomically (JSON), return it."""
    import torch

    from rpiae.engines import resolve_model
    from rpiae.export.bundle import Bundle

    say = progress or (lambda msg: None)
    model_path = resolve_model(settings.model)
    settings.model = str(model_path)
    is_bundle = Bundle.is_bundle(model_path)
    if is_bundle:
        bundle = Bundle.open(model_path)
        config = bundle.config
        bundle_precisions = bundle.precisions()
    else:
        from rpiae.checkpoints import read_config

        config = read_config(model_path)
        if config is None:  # the authors' .pt: the config is matched from the tensor shapes
            from rpiae.model import RPiAE

            config = RPiAE.from_checkpoint(model_path).config
        bundle, bundle_precisions = None, []
    sdict = dataclasses.asdict(settings)
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(settings.threads)
        result = _run(settings, sdict, model_path, is_bundle, bundle, config, bundle_precisions, say)
    finally:
        torch.set_num_threads(threads_before)
    if out is not None:
        write_results(result, out)
    return result


def _run(settings: BenchSettings, sdict: dict[str, Any], model_path: Path, is_bundle: bool, bundle: Any, config: Any,
         bundle_precisions: list[str], say: Callable[[str], None]) -> dict[str, Any]:
    from rpiae.bench.machine import load_average

    started = _dt.datetime.now(_dt.timezone.utc)
    say(f"measuring the {settings.device} matmul peak")
    facts, peaks_before = _facts_and_peaks(settings, with_facts=True)
    rows: list[dict[str, Any]] = []
    unavailable: dict[tuple[str, str], str] = {}
    specs = settings.row_specs()
    for i, spec in enumerate(specs, 1):
        label = f"[{i}/{len(specs)}] {spec['graph']} {spec['backend']} {spec['precision']} batch {spec['batch']}"
        reason = _static_skip(spec, is_bundle, bundle_precisions) or unavailable.get((spec["backend"], spec["precision"]))
        if reason:
            row = {**spec, "device": settings.device, "status": "skipped", "reason": reason}
        else:
            say(label)
            row = (run_in_child(measure_row, spec, sdict, threads=settings.threads) if settings.isolate
                   else measure_row(spec, sdict))
            row = {**spec, "device": settings.device, **row}
            if row.get("status") == "skipped":
                unavailable[(spec["backend"], spec["precision"])] = row["reason"]
        row["load_average"] = load_average()
        if row.get("status") == "ok":
            say(f"{label}: p50 {row['timing']['p50_ms']:.1f} ms ({row['timing']['iterations']} calls)")
        else:
            say(f"{label}: {row.get('status')} - {row.get('reason')}")
        rows.append(row)

    profiles = []
    if settings.profile:
        smallest = min(settings.batches)
        seen = set()
        for r in rows:
            key = (r["graph"], r["backend"], r["precision"])
            if r.get("status") == "ok" and r["backend"] in ("torch", "torch-compile", "ort") and key not in seen:
                seen.add(key)
                spec = {"graph": r["graph"], "backend": r["backend"], "precision": r["precision"], "batch": smallest}
                say(f"profiling {r['graph']} {r['backend']} {r['precision']} batch {smallest}")
                profiles.append(run_in_child(profile_graph, spec, sdict, threads=settings.threads) if settings.isolate
                                else profile_graph(spec, sdict))

    say(f"measuring the {settings.device} matmul peak again")
    _, peaks_after = _facts_and_peaks(settings, with_facts=False)
    used = {}
    for key in set(peaks_before) | set(peaks_after):
        vals = [p[key]["gflops"] for p in (peaks_before, peaks_after) if "gflops" in p.get(key, {})]
        if vals:
            used[key] = max(vals)
    result: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "started": started.isoformat(timespec="seconds"),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": facts,
        "settings": sdict,
        "model": {
            "path": str(model_path),
            "kind": "bundle" if is_bundle else "checkpoint",
            "name": config.name,
            "config": config.to_dict(),
            "flops_per_image": config.flops(),
            "flops_source": "RPiAEConfig.flops() (matmuls, multiply-add = 2 FLOPs)",
        },
        "peaks": {"before": peaks_before, "after": peaks_after, "used": used,
                  "note": "fraction_of_peak uses the best of the before/after medians per dtype"},
        "load_average": {"start": facts.get("load_average"), "end": load_average()},
        "methodology": (__doc__ or "").split("Methodology (recorded in the results' `methodology`):")[-1].strip(),
        "rows": rows,
        "profiles": profiles,
    }
    if bundle is not None:
        result["accuracy"] = bundle.manifest.get("parity", [])
    _derive(result)
    from rpiae.bench.report import evaluate_targets

    result["targets"] = evaluate_targets(result)
    return result


def machine_and_peaks(device: str, threads: int, peak_time: float, peak_size: int | None,
                      with_facts: bool) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """(machine facts or None, matmul peaks) of the run's device, measured in this process."""
    from rpiae.bench.machine import machine_facts
    from rpiae.bench.peak import measure_peaks

    facts = machine_facts(device, threads) if with_facts else None
    return facts, measure_peaks(device, threads, min_time=peak_time, size=peak_size)


def _facts_and_peaks(settings: BenchSettings, with_facts: bool):
    """Machine facts and peaks, with the run's threads. On a GPU run with isolated rows they are
    taken in a child process: the parent never initialises CUDA, so it holds no context and no
    cached peak matrices while the rows run (a GPU in exclusive-process mode gives one
    process a context at a time)."""
    from rpiae.bench.peak import on_cuda

    args = (settings.device, settings.threads, settings.peak_time, settings.peak_size, with_facts)
    if on_cuda(settings.device) and settings.isolate:
        from rpiae.isolation import run_in_child as _run

        with _child_env(settings.threads):
            return tuple(_run(machine_and_peaks, *args, what="the machine facts and peak measurement"))
    with _child_env(settings.threads):
        return machine_and_peaks(*args)


def write_results(result: dict[str, Any], out: str | Path) -> Path:
    from rpiae.fileio import atomic_file

    out = Path(out)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.chmod(0o644)
    return out


def load_results(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ValueError(f"{p}: not an rpiae bench result (format {data.get('format')!r})")
    return data
