"""How a row is timed (see the methodology in rpiae.bench.runner): a warm-up by calls and
seconds, then timed calls until enough calls and seconds or a cap, and per-call percentiles;
on CUDA, compute time with CUDA events on the backend's own stream.

`torch.utils.benchmark` measures the matmul peaks (rpiae.bench.peak); it does not time rows:
a row needs every call's time (p90/p99 and the first call are reported, not a block mean),
a warm-up counted both in calls and in seconds, hard caps that end a slow row and are
recorded, and on CUDA events on the backend's stream rather than a device synchronisation.
"""

from __future__ import annotations

import time
from typing import Any, Callable


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


def cuda_compute_times(backend, x_dev, n: int, warm: int, dev) -> list[float]:
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
