"""Benchmarks of the dataset jobs (`rpiae extract`, `rpiae decode --npz`), side by side in one run.

    python -m rpiae.bench.dataset --out bench/results/dataset-cpu-2c.json
    python -m rpiae.bench.dataset --models tiny,rpiae-b --sizes 100,1000 --out FILE

Two questions, each answered by ratios measured in the same run:

1. Memory is flat as the input grows: peak RSS of the command (the main process and its
   DataLoader workers, summed, sampled every 20 ms; and the main process's alone)
   on N and on 10 N images. Target: the larger run uses at most 10 % more.
2. Loading is hidden behind compute: extraction throughput of the full pipeline (JPEG files
   read, decoded and cropped in DataLoader workers, shards written) over the throughput of
   the same backend on the same images already in memory, in batches of the same size.
   Target: at least 90 %. Each row also gives what one photo costs to load (read, decode,
   crop; one core) and to encode (the model's threads): where loading has no core of its own,
   the pipeline can reach at most encode x threads / (encode x threads + load) of the rate.

The images are JPEGs of the sample photos at ImageNet-like sizes (random crops and scales,
about 500x375). `rpiae-b` uses seeded random weights (no checkpoint is downloadable here);
its speed does not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rpiae.bench.machine import machine_facts


def make_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from PIL import Image

    from rpiae.samples import sample_photos_uint8

    photos = list(sample_photos_uint8().values())
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        a = photos[i % len(photos)]
        h, w = a.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = Image.fromarray(np.ascontiguousarray(a[top : top + ch, left : left + cw]))
        scale = 375 / min(img.size) * float(rng.uniform(0.8, 1.3))
        img = img.resize((max(64, round(img.width * scale)), max(64, round(img.height * scale))), Image.BICUBIC)
        p = folder / f"{i:06d}.jpg"
        img.save(p, quality=90)
        files.append(p)
    return files


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; peak RSS of its process tree (sum, sampled) and of the main process."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    ps = psutil.Process(proc.pid)
    tree_peak = main_peak = 0
    while proc.poll() is None:
        try:
            procs = [ps] + ps.children(recursive=True)
            rss = [p.memory_info().rss for p in procs]
            tree_peak, main_peak = max(tree_peak, sum(rss)), max(main_peak, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return {"seconds": round(time.perf_counter() - t0, 2), "peak_rss_tree_mib": round(tree_peak / 2**20, 1),
            "peak_rss_main_mib": round(main_peak / 2**20, 1), "stdout": out.strip()}


SHARD = 50  # latents per shard in the memory rows


def fresh(*paths: Path) -> None:
    """Remove earlier outputs, so that every run computes (extract and decode resume)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def rpiae_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "rpiae.cli", *map(str, args)]


def memory_rows(work: Path, model: str, sizes: list[int], batch: int, workers: int) -> list[dict]:
    rows = []
    for n in sizes:
        data = work / f"jpeg{n}"
        if not data.exists():
            make_jpegs(data, n)
        fresh(work / f"lat{n}", work / f"png{n}", work / f"s{n}.npz")  # a re-run must not resume
        # shards of 50, so that both sizes write full shards: what one shard holds while it is
        # assembled is bounded by --shard-size, whatever N is, and is not what this row asks
        ext = run_measured(rpiae_cmd("extract", data, "--out", work / f"lat{n}", "--model", model, "--batch-size", batch,
                                     "--workers", workers, "--shard-size", SHARD, "--quiet"))
        dec = run_measured(rpiae_cmd("decode", work / f"lat{n}", "-o", work / f"png{n}", "--npz", work / f"s{n}.npz",
                                     "--model", model, "--batch-size", batch, "--quiet"))
        for job, r in (("extract", ext), ("decode --npz", dec)):
            rows.append({"job": job, "images": n, "shard_size": SHARD, **{k: v for k, v in r.items() if k != "stdout"}})
    return rows


def throughput_rows(work: Path, model: str, n: int, batch: int, workers: int, threads: int) -> dict:
    """Pipeline (files -> workers -> backend -> shards) vs in-memory batches, same backend."""
    import torch

    from rpiae.engines import load_backend
    from rpiae.imageio import load_images

    data = work / f"tp{n}"
    if not data.exists():
        make_jpegs(data, n, seed=1)
    env = {"OMP_NUM_THREADS": str(threads)}
    fresh(work / "tp_warm", work / "tp_run")  # a re-run must not resume
    warm = run_measured(rpiae_cmd("extract", data, "--out", work / "tp_warm", "--model", model, "--batch-size", batch,
                                  "--workers", workers, "--shard-size", n, "--quiet"), env)
    pipe = run_measured(rpiae_cmd("extract", data, "--out", work / "tp_run", "--model", model, "--batch-size", batch,
                                  "--workers", workers, "--shard-size", n, "--quiet"), env)
    del warm
    # the same backend on the same images, already decoded and cropped, in memory
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    x = load_images(sorted(data.glob("*.jpg")))  # what a worker does per photo: read, decode, crop
    load_s = time.perf_counter() - t0
    with load_backend(model, "torch") as be:
        be.encode(x[:batch])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            be.encode(x[i : i + batch])
        mem_s = time.perf_counter() - t0
    # the pipeline's own rate, from its summary line ("...; X img/s ...")
    pipe_rate = float(pipe["stdout"].split(" img/s")[0].rsplit("; ", 1)[-1])
    mem_rate = n / mem_s
    return {"images": n, "batch": batch, "workers": workers, "threads": threads,
            "pipeline_img_per_s": round(pipe_rate, 2), "in_memory_img_per_s": round(mem_rate, 2),
            "ratio": round(pipe_rate / mem_rate, 3), "pipeline_process_seconds": pipe["seconds"],
            "load_ms_per_image": round(1000 * load_s / n, 2), "encode_ms_per_image": round(1000 * mem_s / n, 2)}


def seeded_checkpoint(preset: str, path: Path) -> Path:
    import torch

    from rpiae import RPiAE

    if not path.exists():
        torch.manual_seed(0)
        RPiAE.from_preset(preset).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,rpiae-b", help="tiny = the shipped checkpoint; rpiae-b = seeded random weights")
    ap.add_argument("--sizes", default="100,1000", help="image counts of the memory rows (shipped model)")
    ap.add_argument("--batch", type=int, default=16, help="batch of the memory rows and of the tiny throughput rows")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--throughput", default="tiny:256:16,rpiae-b:48:8", help="model:images:batch of the throughput rows")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from rpiae.assets import DEFAULT_CHECKPOINT
    from rpiae.fileio import atomic_file

    results = {"format": "rpiae-bench-dataset", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine_facts(), "python": platform.python_version(), "command": " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        models = {"tiny": str(DEFAULT_CHECKPOINT)}
        rows = memory_rows(work / "memory", models["tiny"], [int(s) for s in args.sizes.split(",")], args.batch, args.workers)
        results["memory"] = rows
        results["memory_ratio"] = {}
        for job in ("extract", "decode --npz"):
            small, large = (r for r in rows if r["job"] == job)
            results["memory_ratio"][job] = round(large["peak_rss_tree_mib"] / small["peak_rss_tree_mib"], 3)
        print(json.dumps(rows, indent=1), flush=True)
        results["throughput"] = {}
        for item in args.throughput.split(","):
            name, n, batch = item.split(":")
            if name not in args.models.split(","):
                continue
            model = models.get(name) or str(seeded_checkpoint(name, work / f"{name}.safetensors"))
            row = throughput_rows(work / name, model, int(n), int(batch), args.workers, args.threads)
            results["throughput"][name] = row
            print(name, json.dumps(row), flush=True)
    with atomic_file(args.out) as f:
        f.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({"memory_ratio": results["memory_ratio"],
                      "throughput_ratio": {k: v["ratio"] for k, v in results["throughput"].items()}}, indent=1))


if __name__ == "__main__":
    main()
