"""The pieces every extraction engine shares (the local one in `rpiae.jobs.extract`, the Ray one
in `rpiae.jobs.ray_engine`): the folder's run and options (`ExtractOptions`, `run_settings`,
`claim_folder`), `ShardPlan` (which samples, batches and records make shard k),
`encode_batch` (one batch through a backend) and `ShardWriter` (encoded batches, in any order
-> shard files, statistics, records)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from rpiae.data import STREAM_BATCH, image_size
from rpiae.data.heap import TRIM_EVERY_S, release_free_memory
from rpiae.data.latents import (
    AUTHORS_STATS_FILE, DTYPES, OLD_STATS_FILE, STATS_FILE, TRAINER_STATS_FILE, Moments, shard_name, to_storage,
    write_shard,
)
from rpiae.data.sources import Source
from rpiae.fileio import atomic_file, remove_stale_temps, sha256_file
from rpiae.imageio import CROPS, DEFAULT_CROP

MANIFEST = "manifest.json"
FORMAT = "rpiae-latents"
PARTS = "parts"
RUN_FILE = "run.json"  # in PARTS: the settings of the run this folder holds
LATENT_DTYPES = tuple(DTYPES)  # how latents may be stored in shards


class ExtractError(RuntimeError):
    """A sample or setting that stops the run (one line; finished shards stay valid)."""


@dataclass(frozen=True)
class ExtractOptions:
    shard_size: int = 10000
    batch_size: int = STREAM_BATCH
    flip: bool = False
    dtype: str = "fp32"  # how latents are stored: fp32 | fp16 | bf16
    workers: int = 4
    skip_bad: bool = False
    crop: str = DEFAULT_CROP
    size: int | None = None  # None: the model config's image_size

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 0:
            raise ValueError("shard size and batch size must be >= 1, workers >= 0")
        if self.dtype not in LATENT_DTYPES:
            raise ValueError(f"unknown latent dtype {self.dtype!r} ({', '.join(LATENT_DTYPES)})")
        if self.crop not in CROPS:
            raise ValueError(f"unknown crop policy {self.crop!r} ({', '.join(CROPS)})")


def json_dump(obj: object, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


class ShardPlan:
    """Which samples each shard holds and what identifies a finished shard."""

    def __init__(self, source: Source, out: Path, opts: ExtractOptions, model: dict, backend: dict) -> None:
        if opts.size is None:
            opts = replace(opts, size=image_size(model))
        self.source, self.out, self.opts = source, out, opts
        self.n = len(source)
        self.num_shards = math.ceil(self.n / opts.shard_size)
        self.run = run_settings(opts, model, backend)
        # skip_bad does not change a shard (a shard that skipped is checked in `record`); it stays
        # in the hash as False so that records written before keep their keys
        self.settings = hashlib.sha256(json.dumps({**self.run, "skip_bad": False}, sort_keys=True).encode()).hexdigest()
        self._checked: dict[int, dict] = {}  # records verified (or written) by this process

    def samples(self, k: int) -> range:
        s = self.opts.shard_size
        return range(k * s, min((k + 1) * s, self.n))

    def key(self, k: int) -> str:
        r = self.samples(k)
        return hashlib.sha256(f"{self.settings}:{self.source.fingerprint(r.start, r.stop)}".encode()).hexdigest()

    def record_path(self, k: int) -> Path:
        return self.out / PARTS / f"shard-{k:05d}.json"

    def stats_path(self, k: int) -> Path:
        return self.out / PARTS / f"shard-{k:05d}.stats.safetensors"

    def batches(self, shards: list[int]) -> list[range]:
        """The batches that encode `shards`: `batch_size` samples from each shard's start, never
        crossing its end. Latents depend on the batch composition (float rounding of batched
        kernels), so every engine encodes exactly these batches."""
        b = self.opts.batch_size
        out = []
        for k in shards:
            r = self.samples(k)
            out.extend(range(i, min(i + b, r.stop)) for i in range(r.start, r.stop, b))
        return out

    def record(self, k: int) -> dict | None:
        """The shard's record if the shard is done and intact, else None."""
        if k in self._checked:
            return self._checked[k]
        p = self.record_path(k)
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if rec.get("key") != self.key(k):
            return None
        if rec.get("skipped") and not self.opts.skip_bad:
            return None  # made with --skip-bad: without it, the unreadable images stop the run again
        for name, digest in rec["sha256"].items():
            f = self.out / name
            if not f.is_file() or sha256_file(f) != digest:
                return None
        self._checked[k] = rec
        return rec


def run_settings(opts: ExtractOptions, model: dict, backend: dict) -> dict:
    """What makes two extractions into one folder the same run (the latents they store)."""
    return {"model_sha256": model["sha256"], "latent_stats": model.get("latent_stats"),
            "backend": backend.get("backend"), "precision": backend.get("precision"), "crop": opts.crop,
            "size": opts.size, "dtype": opts.dtype, "flip": opts.flip, "shard_size": opts.shard_size}


def _recorded_run(out: Path) -> dict | None:
    """The settings of the run `out` holds: parts/run.json, else (folders written before it)
    the finished manifest's."""
    try:
        return json.loads((out / PARTS / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        pass
    try:
        m = json.loads((out / MANIFEST).read_text())
        return run_settings(ExtractOptions(**m["options"]), m["model"], m["backend"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def _clear(out: Path) -> None:
    """Remove what an extraction writes into `out` (and nothing else)."""
    import shutil

    for f in [*out.glob("shard-*.safetensors"), out / MANIFEST, out / STATS_FILE, out / OLD_STATS_FILE,
              out / AUTHORS_STATS_FILE, out / TRAINER_STATS_FILE]:
        f.unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)


def claim_folder(out: Path, run: dict, overwrite: bool = False, rank: int = 0) -> None:
    """Make `out` this run's: refuse a folder holding another run (one line naming the settings
    that differ), or with `overwrite` clear it first (rank 0); record the run; remove the
    temporary files a killed run left."""
    held = _recorded_run(out)
    if held is not None and held != run:
        if not overwrite:
            diff = [f"{k} {held.get(k)!r} there, {run.get(k)!r} now" for k in run if held.get(k) != run.get(k)]
            raise ExtractError(f"{out} holds another extraction ({'; '.join(diff)}): use --overwrite to start over, "
                               f"or another --out")
        if rank == 0:
            _clear(out)
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for folder in (out, out / PARTS):
            remove_stale_temps(folder)
        if held != run:
            json_dump(run, out / PARTS / RUN_FILE)


def _encode(backend, images: torch.Tensor) -> np.ndarray:
    z = backend.encode(images)
    return z.detach().float().cpu().numpy() if isinstance(z, torch.Tensor) else np.asarray(z, np.float32)


@dataclass
class EncodedBatch:
    """One batch as the shard writer needs it: sample numbers, read errors ("" where the image
    was read) and the latents of the readable images, in order (None when there are none)."""

    ids: list[int]
    errors: list[str]
    z: np.ndarray | None
    zf: np.ndarray | None = None


def encode_batch(backend, ids: list[int], images: torch.Tensor, errors: list[str], flip: bool) -> EncodedBatch:
    """Encode the readable images of one batch (and their mirror images with `flip`)."""
    good = [j for j, e in enumerate(errors) if not e]
    z = zf = None
    if good:
        x = images if len(good) == len(errors) else images[good]  # no copy when all are readable
        z = _encode(backend, x)
        if flip:
            zf = _encode(backend, x.flip(-1))
    return EncodedBatch(list(ids), list(errors), z, zf)


class ShardWriter:
    """Takes the encoded batches of the shards being computed, in any order, and writes each
    shard (file, statistics, record) as soon as all its batches are in; the rows of a shard are
    always in sample order. A batch seen twice (a retried task) is taken once."""

    def __init__(self, plan: ShardPlan, shards: list[int]) -> None:
        self.plan = plan
        self.expected = {k: len(plan.batches([k])) for k in shards}
        self.pending: dict[int, dict[int, EncodedBatch]] = {k: {} for k in shards}

    def add(self, batch: EncodedBatch) -> bool:
        """Keep `batch`; False when it was already taken. A read error stops the run unless
        the options skip bad images."""
        plan = self.plan
        if not plan.opts.skip_bad:
            bad = next((e for e in batch.errors if e), None)
            if bad:
                raise ExtractError(f"{bad} (finished shards are kept; fix or remove the file, or use --skip-bad)")
        k = batch.ids[0] // plan.opts.shard_size
        got = self.pending.get(k)
        if got is None or batch.ids[0] in got:
            return False
        got[batch.ids[0]] = batch
        if len(got) == self.expected[k]:
            self._write(k, [got[i] for i in sorted(got)])
            del self.pending[k]
        release_free_memory(every_s=TRIM_EVERY_S)  # the batch's images are freed: keep the resident size flat
        return True

    def _write(self, k: int, batches: list[EncodedBatch]) -> None:
        parts = {"z": [], "zf": [], "index": [], "skipped": []}
        for b in batches:
            for i, e in zip(b.ids, b.errors):
                if e:
                    parts["skipped"].append({"sample": i, "ref": self.plan.source.refs[i], "error": e})
                else:
                    parts["index"].append(i)
            if b.z is not None:
                parts["z"].append(b.z)
                if b.zf is not None:
                    parts["zf"].append(b.zf)
        _write_shard(self.plan, k, parts)


def _write_shard(plan: ShardPlan, k: int, parts: dict) -> None:
    opts = plan.opts
    index = np.asarray(parts["index"], np.int64)
    if len(index):
        z = to_storage(np.concatenate(parts["z"]), opts.dtype)
        tensors = {"latents": z, "labels": torch.from_numpy(plan.source.labels[index]), "index": torch.from_numpy(index)}
        moments = Moments.of(z.float().numpy())  # the statistics of the stored values
        if opts.flip:
            zf = to_storage(np.concatenate(parts["zf"]), opts.dtype)
            tensors["latents_flip"] = zf
            moments = moments.merge(Moments.of(zf.float().numpy()))
    else:  # every sample of the shard was skipped
        tensors, moments = None, None
    name = shard_name(k)
    files = {}
    if tensors is not None:
        write_shard(plan.out / name, tensors)
        files[name] = sha256_file(plan.out / name)
        stats = plan.stats_path(k)
        with atomic_file(stats) as tmp:
            save_file(moments.to_tensors(), str(tmp))
        files[f"{PARTS}/{stats.name}"] = sha256_file(stats)
    r = plan.samples(k)
    record = {"shard": k, "key": plan.key(k), "samples": [r.start, r.stop], "rows": int(len(index)),
              "sha256": files, "skipped": parts["skipped"]}
    json_dump(record, plan.record_path(k))
    plan._checked[k] = record


