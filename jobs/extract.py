"""`rpiae extract`: stream a dataset through a backend into latent shards, resumably.

Sample i of the source belongs to shard i // shard_size. Shard k is computed in batches
that never cross its boundary, written atomically as `shard-%05d.safetensors`, and then
recorded in `parts/shard-%05d.json` (its sha256, what it was made from, skipped files) with
its exact statistics in `parts/shard-%05d.stats.safetensors`. A shard counts as done when
its record exists, describes the same model/backend/preprocessing/samples, and the files
still hash as recorded; a shard that skipped unreadable images counts as done only for a run
with `skip_bad` (a shard finished without skipping is the same either way).

`parts/run.json` names the run a folder holds (model, backend, precision, preprocessing,
storage dtype, flip, shard size). A run with other settings into the same folder is refused
with the setting that differs, before anything is touched, unless `overwrite` starts over.
Temporary files that a killed write left (`.NAME.XXXXXXXX.tmp`) are removed when a run starts. So a re-run after a kill (SIGKILL included) recomputes only the
missing shards and ends with byte-identical files, and ranks (`torchrun`) split the shards
by `k % world` and produce the same files as one process. When every shard is done, rank 0
merges the statistics in shard order and writes `stats/latents_stats.safetensors`,
`normalization_stats.pt`, `latents_stats.pt` and `manifest.json` (only shards match
`*.safetensors` at the top level: what latent-caching DiT trainers glob).

The pieces every engine shares are `rpiae.jobs.shards`'s. Here (an `rpiae.engines` Backend)
images are read, decoded and cropped in DataLoader worker processes; with a
`rpiae.jobs.ray_engine.RayEngine` the same happens on a Ray cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from safetensors.numpy import load_file
from tqdm.auto import tqdm

from rpiae.data.heap import reuse_heap_blocks
from rpiae.data.latents import AUTHORS_STATS_FILE, STATS_FILE, TRAINER_STATS_FILE, Moments, shard_name, write_stats
from rpiae.data.sources import Source, image_loader
from rpiae.fileio import sha256_file
from rpiae.jobs.ray_engine import RayEngine
from rpiae.jobs.shards import (
    FORMAT, MANIFEST, ExtractError, ExtractOptions, ShardPlan, ShardWriter, claim_folder, encode_batch, json_dump,
)


def extract(
    source: Source,
    out: str | Path,
    backend,
    model: dict,
    opts: ExtractOptions = ExtractOptions(),
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run (or resume) an extraction; returns a summary. `backend` is an `rpiae.engines`
    Backend (run here, images loaded by worker processes) or a `RayEngine` (run on its
    cluster); `model` is {"path", "sha256", "config"} of what it runs (`rpiae.jobs.job_model`). With several ranks, `barrier` waits for all. A folder holding another run is refused
    unless `overwrite`, which starts over."""
    out = Path(out)
    info = backend.describe()
    plan = ShardPlan(source, out, opts, model, info)
    claim_folder(out, plan.run, overwrite, rank)
    if barrier is not None and overwrite:
        barrier()  # rank 0 has cleared the folder before any rank writes
    mine = [k for k in range(plan.num_shards) if k % world == rank]
    todo = [k for k in mine if plan.record(k) is None]
    kept = len(mine) - len(todo)
    total = sum(len(plan.samples(k)) for k in todo)
    t0 = time.time()
    if todo:
        if isinstance(backend, RayEngine):
            backend.run_shards(plan, todo, total, progress and rank == 0)
        else:
            _run_shards(plan, backend, todo, total, progress and rank == 0)
    if barrier is not None:
        barrier()
    summary = {"shards_computed": len(todo), "shards_kept": kept, "images": total, "seconds": round(time.time() - t0, 2)}
    if rank == 0:
        summary.update(_finalize(plan, model, info))
    return summary


def _run_shards(plan: ShardPlan, backend, todo: list[int], total: int, progress: bool) -> None:
    opts = plan.opts
    loader = image_loader(plan.source, [list(b) for b in plan.batches(todo)], opts.crop, opts.size, opts.workers)
    writer = ShardWriter(plan, todo)
    reuse_heap_blocks()  # activations reuse the last batch's pages (stays set for the process)
    with tqdm(total=total, unit="img", desc="extract", disable=not progress, dynamic_ncols=True, smoothing=0.05) as bar:
        for ids, images, errors in loader:
            writer.add(encode_batch(backend, ids, images, errors, opts.flip))
            bar.update(len(ids))


def _finalize(plan: ShardPlan, model: dict, backend: dict) -> dict:
    """Merge the statistics in shard order and write the manifest (rank 0, all shards done)."""
    records = []
    for k in range(plan.num_shards):
        rec = plan.record(k)
        if rec is None:
            raise ExtractError(f"shard {k} is missing or damaged after the run; run the same command again")
        records.append(rec)
    moments = None
    for k, rec in enumerate(records):
        if rec["rows"]:
            m = Moments.from_tensors(load_file(str(plan.stats_path(k))))
            moments = m if moments is None else moments.merge(m)
    if moments is None:
        raise ExtractError("every sample was skipped: no latents, no statistics")
    stats_files = write_stats(moments, plan.out)
    # files of an earlier run over a larger dataset are not part of this one
    for stale in sorted(plan.out.glob("shard-*.safetensors")):
        k = int(stale.stem.split("-")[1])
        if k >= plan.num_shards or not records[k]["rows"]:
            stale.unlink()
    src = plan.source
    manifest = {
        "format": FORMAT,
        "version": 1,
        "model": model,
        "backend": backend,
        "preprocessing": {"crop": plan.opts.crop, "size": plan.opts.size},
        "options": asdict(plan.opts),
        "latent_shape": list(moments.mean.shape),
        "samples": plan.n,
        "rows": int(sum(r["rows"] for r in records)),
        "source": {**src.describe(), "refs": src.refs},
        "shards": [
            {"file": shard_name(k), "sha256": r["sha256"][shard_name(k)], "samples": r["samples"], "rows": r["rows"]}
            for k, r in enumerate(records) if r["rows"]
        ],
        "skipped": [s for r in records for s in r["skipped"]],
        "stats": {"file": STATS_FILE, "sha256": sha256_file(stats_files[0]), "authors_file": AUTHORS_STATS_FILE,
                  "authors_sha256": sha256_file(stats_files[1]), "trainer_file": TRAINER_STATS_FILE,
                  "trainer_sha256": sha256_file(stats_files[2]), "count": moments.count,
                  "definition": "every latent written (flipped ones included), population variance"},
    }
    json_dump(manifest, plan.out / MANIFEST)
    return {"samples": plan.n, "rows": manifest["rows"], "shards": len(manifest["shards"]), "skipped": len(manifest["skipped"])}
