"""Throughput of `--engine ray` against the local engine, side by side in one run.

    python -m rpiae.bench.ray_engine --out bench/results/ray/<machine>.json

Builds a dataset of JPEGs (the shipped sample photos at assorted sizes), then runs, in
alternation and each in a fresh process with the same model threads (`--threads`), `rpiae extract` over it and `rpiae decode` of part
of its latents with `--engine local` and `--engine ray` (a local Ray instance: on one node
this measures what Ray itself costs). Per run it records the command's wall time (Ray's
start-up and shut-down included) and the rate the command reports for its pipeline
(extract: from the first batch to the last shard; decode: the whole loop), then the median
ratio ray / local of both, and the time each spends outside its pipeline (start-up and
shut-down). Every engine produces the same files, which the script checks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


def make_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEGs of the sample photos, each resized to a random size between 300 and 640 pixels."""
    import numpy as np
    from PIL import Image

    from rpiae.samples import sample_photos_uint8

    photos = list(sample_photos_uint8().values())
    rng = np.random.default_rng(seed)
    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)]).resize((int(rng.integers(300, 641)), int(rng.integers(300, 641))))
        img.save(d / f"{i:06d}.jpg", quality=90)
    return d


def run_cli(args: list[str], env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "rpiae.cli", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"rpiae {' '.join(args[:2])} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return wall, r.stdout


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=800, help="images to extract")
    ap.add_argument("--decode", type=int, default=320, help="latents to decode (the first ones of the extract)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2, help="runs per engine and command, alternating")
    ap.add_argument("--threads", type=int, default=1,
                    help="model threads in both engines (OMP_NUM_THREADS of the commands; 0: leave it unset)")
    ap.add_argument("--model", default=None, help="checkpoint or bundle (default: the shipped tiny checkpoint)")
    ap.add_argument("--notes", default="", help="free text stored with the result (e.g. what else ran on the machine)")
    ap.add_argument("--out", type=Path, required=True, help="result JSON")
    return ap


def _alternate(command: str, args_of, images: int, rate_of, repeats: int, env: dict, runs: list[dict]) -> dict[str, Path]:
    """`repeats` runs of `command` per engine, alternating local and ray; appends one record per
    run to `runs` and returns each engine's first output folder. `args_of(engine, rep)`: the
    command's arguments and output folder; `rate_of(stdout)`: the pipeline's images per second."""
    outs: dict[str, Path] = {}
    for rep in range(repeats):
        for engine in ("local", "ray"):
            args, out = args_of(engine, rep)
            wall, stdout = run_cli([command, *args, "--engine", engine], env)
            runs.append({"command": command, "engine": engine, "repeat": rep, "images": images,
                         "wall_s": round(wall, 2), "img_per_s_wall": round(images / wall, 2),
                         "img_per_s_pipeline": rate_of(stdout)})
            outs.setdefault(engine, out)
            print(json.dumps(runs[-1]), flush=True)
    return outs


def _measure(a: argparse.Namespace, env: dict) -> tuple[list[dict], dict[str, bool]]:
    """(every run's record, {command: whether both engines wrote the same files})."""
    import numpy as np

    from rpiae.data.latents import LatentFile

    common = ["--batch-size", str(a.batch_size), "--quiet", *(["--model", a.model] if a.model else [])]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rpiae-bench-ray-") as tmp:
        root = Path(tmp)
        data = make_dataset(root, a.images)
        extracts = _alternate(
            "extract", lambda e, rep: ([str(data), "--out", str(root / f"extract-{e}-{rep}"), "--shard-size",
                                        str(a.shard_size), *common], root / f"extract-{e}-{rep}"),
            a.images, lambda out: float(re.search(r"([\d.]+) img/s", out).group(1)), a.repeats, env, runs)
        identical = {"extract": same_files(extracts["local"], extracts["ray"])}
        z = np.concatenate([b for _, b in LatentFile(extracts["local"]).batches(a.decode)])[: a.decode]
        np.save(root / "z.npy", z)
        decodes = _alternate(
            "decode", lambda e, rep: ([str(root / "z.npy"), "-o", str(root / f"decode-{e}-{rep}"), *common],
                                      root / f"decode-{e}-{rep}"),
            a.decode, lambda out: round(a.decode / float(re.search(r"in ([\d.]+) s", out).group(1)), 2),
            a.repeats, env, runs)
        identical["decode"] = same_files(decodes["local"], decodes["ray"])
    return runs, identical


def _summary(runs: list[dict], identical: dict[str, bool]) -> dict:
    """Per command, the medians of each engine and the ratios ray / local."""
    summary = {}
    for command in ("extract", "decode"):
        for r in runs:  # the time outside the pipeline: start-up (Ray's included) and shut-down
            r["outside_pipeline_s"] = round(r["wall_s"] - r["images"] / r["img_per_s_pipeline"], 2)
        med = {(e, k): round(statistics.median(r[k] for r in runs if r["command"] == command and r["engine"] == e), 2)
               for e in ("local", "ray") for k in ("img_per_s_wall", "img_per_s_pipeline", "outside_pipeline_s")}
        summary[command] = {
            "local_img_per_s_wall": med["local", "img_per_s_wall"], "ray_img_per_s_wall": med["ray", "img_per_s_wall"],
            "ratio_wall": round(med["ray", "img_per_s_wall"] / med["local", "img_per_s_wall"], 3),
            "local_img_per_s_pipeline": med["local", "img_per_s_pipeline"],
            "ray_img_per_s_pipeline": med["ray", "img_per_s_pipeline"],
            "ratio_pipeline": round(med["ray", "img_per_s_pipeline"] / med["local", "img_per_s_pipeline"], 3),
            "local_outside_pipeline_s": med["local", "outside_pipeline_s"],
            "ray_outside_pipeline_s": med["ray", "outside_pipeline_s"],
            "identical_files": identical[command],
        }
    return summary


def main(argv: list[str] | None = None) -> dict:
    a = _parser().parse_args(argv)

    from rpiae.bench.machine import load_average, machine_facts
    from rpiae.fileio import atomic_file

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_start = load_average()
    runs, identical = _measure(a, env)
    summary = _summary(runs, identical)
    result = {
        "format": "rpiae-bench-ray",
        "command": shlex.join(["python", "-m", "rpiae.bench.ray_engine", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "machine": machine_facts("cpu"),
        "run": {"start": started, "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "load_average_start": load_start, "load_average_end": load_average()},
        "summary": summary,
        "runs": runs,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(a.out) as t:
        t.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
