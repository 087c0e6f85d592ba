"""ONNX Runtime on the CPU, two settings side by side: peak RSS of a run (one fresh process per
graph, precision, batch and setting) and speed (both settings open in one process, calls
alternated, medians), with whether their outputs are identical.

    python scripts/ort_memory.py --model B                      # B: python scripts/bench_bundle.py --out B
    python scripts/ort_memory.py --model B --graphs encode --precision int8 --batch 8 --calls 10
    python scripts/ort_memory.py --model B --compare external-data --graphs encode --precision int8

--compare mem-pattern (default): ONNX Runtime's memory pattern on / off (the ORT backend turns it
off on CPUs; `mem_pattern=True` turns it on). --compare external-data: the bundle's graph as one
file (a copy written to a temporary directory) / with its weights in `<graph>.onnx.data` as the
export saves graphs over `EXTERNAL_DATA_BYTES`; the memory pattern off in both. --compare arena:
ONNX Runtime's CPU memory arena on (its default, kept) / off. These are the measurements behind
those defaults. Sessions get the ORT backend's own options
(`rpiae.engines.ort_backend.session_options`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# per comparison: the two settings' names and how each opens a graph (graph file, memory pattern, CPU arena)
COMPARISONS = {
    "mem-pattern": (("on", "off"), {"on": ("bundle", True, True), "off": ("bundle", False, True)}),
    "external-data": (("one file", "external"), {"one file": ("one-file copy", False, True),
                                                 "external": ("bundle", False, True)}),
    "arena": (("arena", "no arena"), {"arena": ("bundle", False, True), "no arena": ("bundle", False, False)}),
}


def _session(path: str, threads: int, mem_pattern: bool, arena: bool = True):
    import onnxruntime as ort

    from rpiae.engines.ort_backend import session_options

    opts = session_options(threads=threads, mem_pattern=mem_pattern)
    opts.enable_cpu_mem_arena = arena
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _feed(sess, batch: int) -> dict[str, np.ndarray]:
    """`batch` seeded inputs for the graph's session (its input's shape past the batch axis)."""
    shape = tuple(int(d) for d in sess.get_inputs()[0].shape[1:])
    x = np.random.default_rng(0).random((batch, *shape), dtype=np.float32)
    return {sess.get_inputs()[0].name: x}


def _peak(path: str, batch: int, threads: int, mem_pattern: bool, arena: bool, calls: int) -> tuple[float, float]:
    """(MiB above the process baseline after opening, MiB above it at the peak); run in a fresh
    process (`peak_in_child`)."""
    import onnxruntime  # noqa: F401  (the baseline holds the runtime's libraries: the figures are the session's)
    import psutil

    from rpiae.host import peak_rss, start_rss_measure

    start_rss_measure()  # the peak from here, as the benchmark's rows measure theirs
    base = psutil.Process().memory_info().rss
    sess = _session(path, threads, mem_pattern, arena)
    opened = psutil.Process().memory_info().rss
    feed = _feed(sess, batch)
    for _ in range(calls):
        sess.run(None, feed)
    return (opened - base) / 2**20, (peak_rss() - base) / 2**20


def peak_in_child(*args) -> tuple[float, float]:
    """`_peak` in a fresh spawned process (its own high-water mark)."""
    from rpiae.isolation import run_in_child

    return run_in_child(_peak, *args, what="the measuring process")


def speeds(paths: dict[str, tuple[str, bool, bool]], batch: int, threads: int, calls: int) -> tuple[dict[str, float], bool]:
    """(median seconds per call of each setting, both open in this process, calls alternated;
    whether their outputs are identical)."""
    sessions = {k: _session(p, threads, mp, arena) for k, (p, mp, arena) in paths.items()}
    feeds = {k: _feed(s, batch) for k, s in sessions.items()}
    outs = [s.run(None, feeds[k])[0] for k, s in sessions.items()]
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(calls):
        for k, sess in sessions.items():
            t = time.perf_counter()
            sess.run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, bool(np.array_equal(*outs))


def one_file_copy(path: Path, out_dir: str) -> str:
    """The graph at `path` saved as one file (its external data inlined) in `out_dir`."""
    import onnx

    dest = Path(out_dir) / path.name
    onnx.save_model(onnx.load(str(path)), str(dest))
    return str(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a bundle with fp32 (and int8) ONNX graphs")
    ap.add_argument("--compare", default="mem-pattern", choices=sorted(COMPARISONS),
                    help="which two settings to put side by side (see above)")
    ap.add_argument("--graphs", default="encode,decode")
    ap.add_argument("--precision", default="fp32,int8")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=4, help="calls per setting (speed: alternated)")
    args = ap.parse_args()
    from rpiae.bench.row import graph_weight_bytes
    from rpiae.export.bundle import Bundle
    from rpiae.host import cpu_info

    bundle = Bundle.open(args.model)
    names, how = COMPARISONS[args.compare]
    a, b = names
    print(f"CPU: {cpu_info()['model']}, {args.threads} threads; {args.compare}: {a} / {b}")
    print(f"| graph | precision | batch | weights MiB | after opening, {a} / {b} (MiB above baseline) "
          f"| peak, {a} / {b} | peak / weights, {a} / {b} | ms per call, {a} / {b} | {b} / {a} speed | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ort-memory-") as tmp:
        for graph in args.graphs.split(","):
            for precision in args.precision.split(","):
                graph_path = bundle.graph_path(graph, precision)  # checks its hashes
                files = {"bundle": str(graph_path)}
                if any(src == "one-file copy" for src, *_ in how.values()):
                    files["one-file copy"] = one_file_copy(graph_path, tmp)
                paths = {k: (files[src], mp, arena) for k, (src, mp, arena) in how.items()}
                w = graph_weight_bytes(args.model, "ort", precision, graph)["weight_bytes"] / 2**20
                for batch in (int(x) for x in args.batch.split(",")):
                    pa, pb = (peak_in_child(*paths[k][:1], batch, args.threads, *paths[k][1:], 2) for k in names)
                    s, same = speeds(paths, batch, args.threads, args.calls)
                    print(f"| {graph} | {precision} | {batch} | {w:.0f} | {pa[0]:.0f} / {pb[0]:.0f} | {pa[1]:.0f} / {pb[1]:.0f} "
                          f"| {pa[1] / w:.2f}x / {pb[1] / w:.2f}x | {s[a] * 1e3:.0f} / {s[b] * 1e3:.0f} "
                          f"| {s[a] / s[b]:.3f} | {same} |", flush=True)
                if "one-file copy" in files:
                    Path(files["one-file copy"]).unlink()


if __name__ == "__main__":
    main()
