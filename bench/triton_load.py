"""Load on a real Triton server against the same backend in-process, side by side in one run.

    python -m rpiae.bench.triton_load --out bench/results/triton/<machine>.json

Writes a `--platform python` repository of the bundle (ONNX Runtime backend), starts the
server (`rpiae.engines.triton_server`), and for each model (the ensemble, the encoder) and
each concurrency drives it for `--duration` seconds with that many client threads, each
sending one real photo per request over gRPC and waiting for the answer (closed loop). Per
level: throughput (images/s), p50/p99 request latency, errors, and the batch sizes the
server actually formed (the difference of Triton's statistics endpoint before and after).
Then, with the server stopped, the same backend in-process (same precision and threads)
runs the same graphs at the batch the server formed most often; the ratio is the server's
images/s over that. The client threads run on the same machine, so their cost (gRPC,
copies of 0.75 MiB per image) is inside the server's figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rpiae.export.triton import DEFAULT_PYTHON_BACKEND as BACKEND  # what the served python models run

MODELS = {"ensemble": ("rpiae", ("rpiae_encode", "rpiae_decode")), "encode": ("rpiae_encode", ("rpiae_encode",))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint or export bundle (default: the shipped small checkpoint)")
    p.add_argument("--precision", default="fp32", help="the bundle graphs' precision (default fp32)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load level (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each level is measured")
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client threads (default 1,2,4,8)")
    p.add_argument("--which", default="ensemble,encode", help="models to load: ensemble, encode (default both)")
    p.add_argument("--instances", type=int, default=1, help="instances per model (default 1)")
    p.add_argument("--max-batch", type=int, default=8, help="max_batch_size of the models (default 8)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batcher delay (default 2000)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads per model instance and in-process "
                   "(default: ONNX Runtime's)")
    p.add_argument("--repeats", type=int, default=3, help="in-process timing: best median of this many rounds")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default: bench/results/triton/<machine>.json)")
    return p


def _bundle(model: str | None, precision: str, work: Path):
    from rpiae.export import Bundle, build_bundle
    from rpiae.hub import resolve_model
    from rpiae.samples import sample_photos

    path = resolve_model(model)
    if Bundle.is_bundle(path):
        return Bundle.open(path)
    calib = sample_photos()[1] if precision == "int8" else None
    return build_bundle(str(path), work / "bundle", precisions=precision, calib=calib, progress=False)


def _batch_counts(client, models: tuple[str, ...]) -> dict[str, Counter]:
    """model -> Counter {batch size: executions} from Triton's statistics endpoint."""
    stats = client.get_inference_statistics(as_json=True)["model_stats"]
    out: dict[str, Counter] = {m: Counter() for m in models}
    for s in stats:
        if s["name"] in out:
            for b in s.get("batch_stats", []):
                out[s["name"]][int(b["batch_size"])] += int(b["compute_infer"]["count"])
    return out


def _drive(url: str, model: str, image: np.ndarray, concurrency: int, seconds: float) -> tuple[list[float], int]:
    """Closed loop: `concurrency` threads each send one image and wait, for `seconds`.
    Returns (latencies in seconds, errors)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    start = threading.Barrier(concurrency)

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        request = grpcclient.InferInput("images", list(image.shape), "FP32")
        request.set_data_from_numpy(image)
        mine: list[float] = []
        start.wait()
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                client.infer(model, [request])
                mine.append(time.perf_counter() - t0)
            except InferenceServerException:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _in_process(bundle, precision: str, threads: int | None, which: str, batch: int, image: np.ndarray,
                repeats: int) -> float:
    """images/s of the same backend in this process at `batch` (best of `repeats` medians)."""
    from rpiae.bench.timing import time_loop
    from rpiae.engines import load_backend

    x = np.repeat(image, batch, axis=0)
    with load_backend(bundle.root, backend=BACKEND, precision=precision, threads=threads) as backend:
        def once() -> None:
            z = backend.encode(x)
            if which == "ensemble":
                backend.decode(z)

        # the first round warms up with one call; each round: >= 3 calls and >= 1 s, no cap
        best = min(statistics.median(time_loop(once, warmup=int(r == 0), warmup_time=0.0, min_iters=3, min_time=1.0,
                                               max_iters=10**9, max_time=float("inf"))[0]) for r in range(repeats))
    return batch / best


def run(a: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from rpiae.bench.machine import machine_facts
    from rpiae.engines.triton_server import TritonServer
    from rpiae.export.triton import write_model_repository
    from rpiae.samples import sample_photos

    import tritonclient.grpc as grpcclient

    levels = [int(c) for c in a.concurrency.split(",") if c.strip()]
    which = [w.strip() for w in a.which.split(",") if w.strip()]
    unknown = [w for w in which if w not in MODELS]
    if unknown:
        raise SystemExit(f"--which: unknown {', '.join(unknown)} (ensemble, encode)")
    image = np.ascontiguousarray(sample_photos()[1][:1])
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts = machine_facts("cpu", a.threads)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rpiae-triton-load-") as tmp:
        work = Path(tmp)
        bundle = _bundle(a.model, a.precision, work)
        repo = work / "repo"
        write_model_repository(bundle, repo, precision=a.precision, platform="python", backend=BACKEND,
                               instances=a.instances, max_batch=a.max_batch, max_queue_delay_us=a.max_queue_delay_us,
                               threads=a.threads)
        with TritonServer(repo, extra_args=["--exit-timeout-secs=10"]) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            bar = tqdm(total=len(which) * len(levels), desc="triton load", unit="level")
            for w in which:
                model, members = MODELS[w]
                for c in levels:
                    _drive(server.grpc_url, model, image, c, a.warmup)
                    before = _batch_counts(client, members)
                    t0 = time.perf_counter()
                    lat, errors = _drive(server.grpc_url, model, image, c, a.duration)
                    wall = time.perf_counter() - t0
                    after = _batch_counts(client, members)
                    formed = {m: dict(sorted((after[m] - before[m]).items())) for m in members}
                    first = Counter(formed[members[0]])
                    rows.append({"model": w, "triton_model": model, "concurrency": c, "requests": len(lat),
                                 "errors": errors, "seconds": round(wall, 2), "images_per_s": len(lat) / wall,
                                 "p50_ms": 1000 * _pct(lat, 50), "p99_ms": 1000 * _pct(lat, 99),
                                 "batches_formed": formed,
                                 "mean_batch": (sum(b * n for b, n in first.items()) / max(1, sum(first.values()))),
                                 "common_batch": first.most_common(1)[0][0] if first else 1})
                    bar.update()
            bar.close()
        # the in-process reference, with the server gone: same backend, precision, threads
        cache: dict[tuple[str, int], float] = {}
        for r in tqdm(rows, desc="in-process", unit="row"):
            key = (r["model"], r["common_batch"])
            if key not in cache:
                cache[key] = _in_process(bundle, a.precision, a.threads, r["model"], r["common_batch"], image, a.repeats)
            r["in_process_images_per_s"] = cache[key]
            r["ratio"] = r["images_per_s"] / cache[key]
    return {"format": "rpiae-bench", "kind": "triton-load", "started": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": facts,
            "settings": {"model": bundle.config.name, "precision": a.precision, "backend": BACKEND, "platform": "python",
                         "duration_s": a.duration, "warmup_s": a.warmup, "instances": a.instances,
                         "max_batch": a.max_batch, "max_queue_delay_us": a.max_queue_delay_us, "threads": a.threads,
                         "protocol": "grpc", "request": "1 image (1x3x256x256 float32) per request, closed loop"},
            "command": "python -m rpiae.bench.triton_load " + " ".join(sys.argv[1:]), "rows": rows}


def render(result: dict[str, Any]) -> str:
    """The markdown table of a result."""
    s = result["settings"]
    cpu = result["machine"]["cpu"]
    lines = [f"Model `{s['model']}` {s['precision']}, Triton python models running ONNX Runtime, {s['instances']} "
             f"instance(s) per model, max_batch_size {s['max_batch']}, queue delay {s['max_queue_delay_us']} µs; "
             f"{s['request']}; {cpu['model']} ({cpu['usable_cores']} usable cores), clients on the same machine; "
             f"{s['duration_s']:.0f} s per level.", "",
             "| model | concurrency | img/s | p50 ms | p99 ms | errors | batches formed (size: count) | in-process img/s (batch) | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        formed = "; ".join(f"{m.replace('rpiae_', '')} " + ", ".join(f"{b}: {n}" for b, n in f.items())
                           for m, f in r["batches_formed"].items())
        lines.append(f"| {r['model']} | {r['concurrency']} | {r['images_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['errors']} | {formed} | {r['in_process_images_per_s']:.1f} "
                     f"({r['common_batch']}) | {r['ratio']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rpiae.bench.machine import machine_slug
    from rpiae.bench.results import write_results

    a = _parser().parse_args(argv)
    result = run(a)
    out = a.out or Path("bench/results/triton") / f"{machine_slug(result['machine'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(result, out)
    print(render(result))
    print(f"\nwritten: {out}")
    return result


if __name__ == "__main__":
    main()
