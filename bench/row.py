"""One benchmark row (backend, precision, graph, batch), measured in the process it runs in:
open the backend, warm up, time, record peak RSS, weight bytes and, on CUDA, compute time and
device memory; and the op-type profile of a graph. A row in its own process is
`run_in_child`."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable

from rpiae.bench.timing import cuda_compute_times, stats, time_loop
from rpiae.devices import BackendUnavailable, device_scope, torch_device
from rpiae.export.backends import REFERENCE, backend_info, variant
from rpiae.export.bundle import Bundle, BundleError
from rpiae.export.spec import GRAPH_MODULES, graph_spec
from rpiae.host import environ, peak_rss, start_rss_measure


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _open_backend(model: str, backend: str, precision: str, device: str, threads: int, graph: str, **kwargs):
    """A row's backend (a bench variant: its backend with the variant's options) opened for the
    row's graph only (its peak RSS and weight bytes are that graph's), with the run's thread
    count where the runtime takes one."""
    from rpiae.engines import load_backend

    name, options, _ = variant(backend)
    if "threads" in backend_info(name).options:
        options = {**options, "threads": threads}
    return load_backend(model, name, precision, device, graphs=(graph,), **options, **kwargs)


def graph_weight_bytes(model: str, backend: str, precision: str, graph: str) -> dict[str, Any]:
    """Bytes of the weights of one graph as this backend holds them."""
    path = Path(model)
    info = backend_info(variant(backend)[0])
    if info.from_weights and info.name != REFERENCE:  # compiled from the weights (Torch-TensorRT: inside its engines)
        return {"weight_bytes": None, "weight_source": None}
    if info.from_weights:
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
        name = bundle.find(graph, info.file_precision(precision), info.runs)
        if name is not None:
            files = [name, *bundle.files[name].get("external_data", [])]
            return {"weight_bytes": sum((path / f).stat().st_size for f in files),
                    "weight_source": " + ".join(files)}
    return {"weight_bytes": None, "weight_source": None}


def _device_input(x, dev):
    """The benchmark input as a tensor on the run's GPU."""
    import torch

    return torch.from_numpy(x).to(dev)


def measure_row(spec: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Measure one row. Never raises: failures come back as status `skipped`/`error`."""
    import traceback

    row = {k: spec[k] for k in ("graph", "backend", "precision", "batch", "reference")}
    row["device"] = settings["device"]
    try:
        return _measure_row(row, settings)
    except Exception as e:  # noqa: BLE001 - one row failing must not end the run
        msg = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, (BackendUnavailable, BundleError, ImportError, ModuleNotFoundError)):
            row.update(status="skipped", reason=msg)
        else:
            row.update(status="error", reason=f"{type(e).__name__}: {msg}",
                       traceback=traceback.format_exc(limit=6)[-2000:])
        return row


def _measure_row(row: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    dev = torch_device(settings["device"])
    with device_scope(dev):  # torch's current GPU is the run's: streams, caches and memory stats are its
        return _measure_row_on(row, settings, dev)


def _local_peak(settings: dict[str, Any], precision: str, threads: int) -> dict[str, Any] | None:
    """The same matmul as the run's peak, right before this row and for this row's dtype only:
    the share of the machine this row had (other processes on a shared machine move it by a
    factor, not by ±20 %)."""
    from rpiae.bench.peak import measure_peaks, peak_key

    device = settings["device"]
    local = measure_peaks(device, threads, min_time=settings["row_peak_time"], size=settings.get("peak_size"),
                          dtypes=[precision])
    key = peak_key(device, precision, local)
    return {"dtype": key, "gflops": local[key]["gflops"]} if key else None


def _cuda_measures(backend, x, batch: int, n_timed: int, settings: dict[str, Any], dev, free0: int, total: int) -> dict[str, Any]:
    """GPU compute time (CUDA events, device-resident input) and device memory of a row."""
    import torch

    n = max(settings["min_iters"], min(n_timed, 200))
    ctimes = cuda_compute_times(backend, _device_input(x, dev), n, warm=max(settings["warmup"], 1), dev=dev)
    free1, _ = torch.cuda.mem_get_info(dev)
    return {"compute": {**stats(ctimes, batch), "method": "CUDA events on the execution stream, device-resident input"},
            "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated(dev),
            "cuda_device_used_delta_bytes": int(free0 - free1), "cuda_total_bytes": int(total)}


def _measure_row_on(row: dict[str, Any], settings: dict[str, Any], dev) -> dict[str, Any]:
    import numpy as np
    import torch

    from rpiae.bench.peak import on_cuda

    threads = int(settings["threads"])
    torch.set_num_threads(threads)
    device = settings["device"]
    graph, batch, precision = row["graph"], row["batch"], row["precision"]
    cuda = on_cuda(device)
    if settings["row_peak_time"] > 0:
        row["local_peak"] = _local_peak(settings, precision, threads)
    if cuda:
        torch.cuda.empty_cache()  # the local peak's matrices must not count against the row
        torch.cuda.reset_peak_memory_stats(dev)
        free0, total = torch.cuda.mem_get_info(dev)
    isolated = settings["isolate"]
    if isolated:  # the row's own memory from here: its runtime's libraries loaded, not what the local peak's matmuls freed
        from rpiae.engines import backend_class

        with contextlib.suppress(BackendUnavailable):  # a missing runtime: opening it below says so
            backend_class(variant(row["backend"])[0]).require()
        row["rss_peak_reset"] = start_rss_measure()
    row["rss_baseline_bytes"] = _rss() if isolated else None
    t0 = time.perf_counter()
    backend = _open_backend(settings["model"], row["backend"], precision, device, threads, graph)
    row["load_s"] = time.perf_counter() - t0
    try:
        x = _input(backend.config, graph, batch)  # timing does not depend on the values (no data-dependent paths)
        fn_graph = backend.graph_call(graph)
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
        takes = "threads" in backend_info(variant(row["backend"])[0]).options
        row["threads"] = {"torch": torch.get_num_threads(), "backend": threads if takes else None,
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        row["backend_info"] = {k: (v if isinstance(v, (str, int, float, bool, type(None), list)) else str(v))
                               for k, v in backend.describe().items()}
        if cuda:
            row.update(_cuda_measures(backend, x, batch, len(times), settings, dev, free0, total))
    finally:
        backend.close()
    row["rss_peak_bytes"] = peak_rss() if isolated else None
    if isolated and row["rss_baseline_bytes"] is not None:
        row["rss_delta_bytes"] = row["rss_peak_bytes"] - row["rss_baseline_bytes"]
    row.update(graph_weight_bytes(settings["model"], row["backend"], precision, graph))
    return row


def child_env(threads: int) -> contextlib.AbstractContextManager:
    """The thread counts a row's process (and its libraries) start with."""
    return environ(**{k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})


@contextlib.contextmanager
def children_quiet_on_interrupt():
    """Ctrl-C while a row's child process runs: the child stays quiet, this process stops it.

    A terminal's Ctrl-C (or `timeout -s INT`) signals the whole process group, so a child
    would raise KeyboardInterrupt wherever it is (importing torch, waiting for work) and print
    a traceback. Inside the block SIGINT is blocked in this thread, and a process started here
    inherits the mask: it never sees SIGINT. This process still does (another of its threads
    takes it); a watcher thread, woken by the signal (`signal.set_wakeup_fd`), stops the
    children (SIGTERM: no output), and KeyboardInterrupt reaches the caller, whose clean
    `Interrupted: ...` follows. Off the main thread, or without POSIX signal masks, it does
    nothing."""
    import select
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    import multiprocessing
    from multiprocessing import resource_tracker

    # started first: starting it later unblocks SIGINT in this thread (multiprocessing's own dance)
    resource_tracker.ensure_running()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    interrupted, done = threading.Event(), threading.Event()

    def watch() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # this thread may take it
        while not done.is_set():
            if select.select([read_fd], [], [], 0.1)[0] and signal.SIGINT in os.read(read_fd, 64):
                interrupted.set()
                for child in multiprocessing.active_children():
                    child.terminate()
                return

    try:
        old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter
        os.close(read_fd)
        os.close(write_fd)
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    watcher = threading.Thread(target=watch, name="rpiae-bench-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    except Exception:
        if not interrupted.is_set():  # else: the child was stopped because of the interrupt
            raise
    finally:
        done.set()
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        signal.set_wakeup_fd(old_fd)
        os.close(read_fd)
        os.close(write_fd)
    if interrupted.is_set():
        raise KeyboardInterrupt


def run_in_child(fn: Callable[..., dict[str, Any]], *args: Any, threads: int) -> dict[str, Any]:
    """Run `fn(*args)` in a fresh spawned process (its own RSS high-water mark), threads fixed;
    a child that dies becomes an error row."""
    from rpiae.isolation import ChildProcessDied
    from rpiae.isolation import run_in_child as _run

    with child_env(threads), children_quiet_on_interrupt():
        try:
            return _run(fn, *args, what="the child process")
        except ChildProcessDied:
            return {"status": "error", "reason": "the child process died (killed, e.g. out of memory)"}


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
    """The row's own backend (device, providers, options) opened with its runtime's profiler
    on where it has one (`op_profiling`), and `Backend.op_profile` (torch.profiler by default)."""
    import torch

    from rpiae.bench.peak import on_cuda

    threads = int(settings["threads"])
    torch.set_num_threads(threads)
    graph, batch, runs = spec["graph"], spec["batch"], 2
    name = variant(spec["backend"])[0]
    extra = {"op_profiling": True} if "op_profiling" in backend_info(name).options else {}
    backend = _open_backend(settings["model"], spec["backend"], spec["precision"], settings["device"], threads, graph, **extra)
    try:
        totals, tool = backend.op_profile(graph, _input(backend.config, graph, batch), runs, on_cuda(settings["device"]))
    finally:
        backend.close()
    total = sum(totals.values()) or 1.0
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
    return {"tool": tool, "runs": runs, "total_s": total,
            "ops": [{"op": k, "seconds": v, "share": v / total} for k, v in top]}


def _input(cfg, graph: str, batch: int):
    """The row's input: seeded, host float32 (timing does not depend on the values)."""
    return graph_spec(cfg, graph).sample(batch).numpy()
