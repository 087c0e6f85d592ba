"""ONNX Runtime's memory pattern on the CPU, on and off, side by side: peak RSS of a run (one
fresh process per graph, precision, batch and setting) and speed (both settings open in one
process, calls alternated, medians).

    python scripts/ort_memory.py --model B                      # B: python scripts/bench_bundle.py --out B
    python scripts/ort_memory.py --model B --graphs encode --precision int8 --batch 8 --calls 10

The ORT backend turns the memory pattern off on CPUs (`mem_pattern=True` turns it on); this is
the measurement behind that default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SETTINGS = {"on": True, "off": False}


def _feed(backend, graph: str, batch: int):
    """(the graph's ONNX Runtime session, a feed of `batch` seeded inputs for it)."""
    sess = backend.session(graph)
    x = np.random.default_rng(0).random((batch, *backend.specs[graph].input_shape), dtype=np.float32)
    return sess, {sess.get_inputs()[0].name: x}


def _peak(model: str, graph: str, precision: str, batch: int, threads: int, mem_pattern: bool,
          calls: int) -> tuple[float, float, float]:
    """(MiB above the process baseline after opening, MiB above it at the peak, weight MiB);
    run in a fresh process (`peak_in_child`)."""
    import psutil

    from rpiae.bench.row import graph_weight_bytes
    from rpiae.engines import load_backend
    from rpiae.host import peak_rss

    base = psutil.Process().memory_info().rss
    be = load_backend(model, "ort", precision, "cpu", graphs=(graph,), threads=threads, mem_pattern=mem_pattern)
    opened = psutil.Process().memory_info().rss
    sess, feed = _feed(be, graph, batch)
    for _ in range(calls):
        sess.run(None, feed)
    peak = peak_rss()
    weights = graph_weight_bytes(model, "ort", precision, graph)["weight_bytes"]
    return (opened - base) / 2**20, (peak - base) / 2**20, weights / 2**20


def peak_in_child(*args) -> tuple[float, float, float]:
    """`_peak` in a fresh spawned process (its own high-water mark)."""
    from rpiae.isolation import run_in_child

    return run_in_child(_peak, *args, what="the measuring process")


def speeds(model: str, graph: str, precision: str, batch: int, threads: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each setting, both open in this process, calls alternated."""
    from rpiae.engines import load_backend

    backends = {k: load_backend(model, "ort", precision, "cpu", graphs=(graph,), threads=threads, mem_pattern=v)
                for k, v in SETTINGS.items()}
    feeds = {k: _feed(be, graph, batch) for k, be in backends.items()}
    for sess, feed in feeds.values():
        sess.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for _ in range(calls):
        for k, (sess, feed) in feeds.items():
            t = time.perf_counter()
            sess.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a bundle with fp32 (and int8) ONNX graphs")
    ap.add_argument("--graphs", default="encode,decode")
    ap.add_argument("--precision", default="fp32,int8")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=4, help="calls per setting (speed: alternated)")
    args = ap.parse_args()
    from rpiae.host import cpu_info

    print(f"CPU: {cpu_info()['model']}, {args.threads} threads")
    print("| graph | precision | batch | weights MiB | after opening, on / off (MiB above baseline) "
          "| peak, on / off | peak / weights, on / off | ms per call, on / off | off / on speed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for graph in args.graphs.split(","):
        for precision in args.precision.split(","):
            for batch in (int(b) for b in args.batch.split(",")):
                on = peak_in_child(args.model, graph, precision, batch, args.threads, True, 2)
                off = peak_in_child(args.model, graph, precision, batch, args.threads, False, 2)
                s = speeds(args.model, graph, precision, batch, args.threads, args.calls)
                w = on[2]
                print(f"| {graph} | {precision} | {batch} | {w:.0f} | {on[0]:.0f} / {off[0]:.0f} | {on[1]:.0f} / {off[1]:.0f} "
                      f"| {on[1] / w:.2f}x / {off[1] / w:.2f}x | {s['on'] * 1e3:.0f} / {s['off'] * 1e3:.0f} "
                      f"| {s['on'] / s['off']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
