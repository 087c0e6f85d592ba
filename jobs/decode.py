"""Streaming decode: latents -> one 8-bit PNG per latent, and optionally an ADM `.npz`.

Latents are read batch by batch (`LatentFile`), decoded, and written as they come; each PNG
is written atomically, so PNGs already present are complete and a re-run skips them. The
`.npz` of the ADM evaluation suite (uint8 `arr_0`, shape (N, 256, 256, 3)) is packed from the
PNGs afterwards, one image at a time, into a temporary file renamed when complete: it holds
exactly the PNGs' pixels and memory does not grow with N. `rpiae.jobs.ray_engine` runs the
same batches on a Ray cluster.

One folder, one run: `.rpiae-decode.json` in the output folder records what makes its PNGs (the
latents' content: sha256 and array; the model's sha256, its latent statistics, the backend,
its precision and options). A re-run resumes only when they match; a run with other latents or
settings into a folder that holds PNGs is refused with one line naming what differs (numbered
PNGs without a record too: nothing says what made them), unless `overwrite`, which removes the
numbered PNGs first. An `rpiae extract` directory is decoded only with the model that made it
(same sha256, or a bundle exported from that checkpoint) and the same latent statistics, both
read from its manifest.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from rpiae.data import STREAM_BATCH
from rpiae.data.heap import release_free_memory
from rpiae.data.latents import LatentFile
from rpiae.fileio import remove_stale_temps, sha256_file
from rpiae.jobs.pngs import pack_npz, pending, png_names, write_pngs
from rpiae.jobs.ray_engine import RayEngine
from rpiae.jobs.shards import json_dump


def sample_ids(latents: LatentFile) -> np.ndarray:
    """The sample number of every latent, in order (an extract directory's `index`, else the row)."""
    if latents.kind != "dir":
        return np.arange(len(latents))
    from safetensors import safe_open

    out = []
    for path, _ in latents.parts:
        with safe_open(str(path), framework="np") as f:
            out.append(f.get_tensor("index"))
    return np.concatenate(out)


RUN_FILE = ".rpiae-decode.json"  # in the output folder (hidden: the folder lists its PNGs): what made them
_PNG = re.compile(r"^[0-9]+\.png$")  # the PNGs a decode writes (png_names)


class DecodeError(ValueError):
    """A decode that would mix runs or models (one line; nothing was written)."""


def decode_latents(
    latents: LatentFile,
    out_dir: str | Path,
    backend,
    batch_size: int = STREAM_BATCH,
    npz: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    model: dict | None = None,
    check_model: bool = True,
) -> dict:
    """Decode every latent of `latents` with `backend`: an `rpiae.engines` Backend (here) or a
    `RayEngine` (its actors decode, its tasks write the PNGs). `model`: `rpiae.jobs.job_model`
    of what the backend runs (default: read from the engine `rpiae.jobs.open_engine` opened).
    `check_model`: refuse an extract directory made by another model or other statistics."""
    from rpiae.jobs import engine_model

    out_dir = Path(out_dir)
    if npz is not None and Path(npz).suffix != ".npz":  # before anything is decoded
        raise ValueError(f"{npz}: the ADM sample file must end in .npz")
    latents.check(tuple(backend.config.latent_shape))
    model = engine_model(backend) if model is None else model
    if check_model and latents.kind == "dir":
        check_recorded_model(latents, model)
    record = claim_folder(out_dir, run_record(latents, model, backend.describe()), overwrite)
    remove_stale_temps(out_dir)  # PNGs (and .npz parts) a killed run left half-written
    if npz is not None:
        remove_stale_temps(Path(npz).resolve().parent, name=Path(npz).name)
    width = max(6, len(str(max(len(latents), _last_index(latents)))))
    t0 = time.time()
    with tqdm(total=len(latents), unit="img", desc="decode", disable=not progress, dynamic_ncols=True) as bar:
        if isinstance(backend, RayEngine):
            record()  # its tasks write the PNGs
            decoded = backend.decode_pngs(latents, out_dir, width, batch_size, overwrite, bar)
            bar.update(len(latents) - decoded)
        else:
            decoded = _decode_pngs(backend, latents, out_dir, width, batch_size, overwrite, bar, record)
    summary = {"latents": len(latents), "decoded": decoded, "kept": len(latents) - decoded, "out": str(out_dir),
               "seconds": round(time.time() - t0, 2)}
    if npz is not None:
        pack_npz([out_dir / n for n in png_names(sample_ids(latents), width)], npz, progress=progress)
        summary["npz"] = str(npz)
    return summary


# -- what made the PNGs ------------------------------------------------------------------------------


def latents_identity(latents: LatentFile) -> dict:
    """What the latents are, by content: the sha256 of the file (of an extract directory: of its
    manifest, which lists every shard's sha256), and which array of it."""
    path = latents.path / "manifest.json" if latents.kind == "dir" else latents.path
    key = latents.parts[0][1] if latents.kind in ("dir", "safetensors") else (
        latents.parts[0][:-4] if latents.kind == "npz" else None)
    return {"path": str(latents.path.resolve()), "sha256": sha256_file(path), "key": key,
            "shape": list(latents.shape), "dtype": latents.dtype}


def run_record(latents: LatentFile, model: dict, backend: dict) -> dict:
    """What makes a decode's PNGs: compared key by key when a run resumes (the latents' path is
    kept for the reader, not compared: moved latents are the same latents)."""
    stats = model.get("latent_stats") or {}
    return {"format": "rpiae-decode", "latents": latents_identity(latents), "model": model.get("path"),
            "model_sha256": model["sha256"], "latent_stats": stats.get("sha256"), "backend": backend.get("backend"),
            "precision": backend.get("precision"), "backend_options": backend.get("options") or {},
            "png": "8-bit RGB, clamped to [0, 1]"}


_COMPARED = ("latents", "model_sha256", "latent_stats", "backend", "precision", "backend_options", "png")


def _differences(held: dict, run: dict) -> list[str]:
    out = []
    for k in _COMPARED:
        a, b = held.get(k), run.get(k)
        if k == "latents":
            a = {x: y for x, y in (a or {}).items() if x != "path"}
            b = {x: y for x, y in b.items() if x != "path"}
            if a != b:
                out.append(f"latents {(held.get(k) or {}).get('path')!r} there, {run[k]['path']!r} now (other content)"
                           if a.get("sha256") != b.get("sha256") else f"latents array {a} there, {b} now")
        elif a != b:
            out.append(f"{k} {_short(a)!r} there, {_short(b)!r} now")
    return out


def _short(v):
    return v[:12] if isinstance(v, str) and len(v) == 64 else v


def claim_folder(out_dir: Path, run: dict, overwrite: bool) -> Callable[[], None]:
    """Make `out_dir` this run's: a folder whose record matches resumes; one holding PNGs of
    another run (or numbered PNGs without a record) is refused, or with `overwrite` its
    numbered PNGs are removed. Returns the call that records the run, made before the first PNG
    is written (latents refused on their first batch leave no folder behind)."""
    record = out_dir / RUN_FILE
    held = None
    if record.is_file():
        try:
            held = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            held = {}
    pngs = _numbered_pngs(out_dir)
    if held is not None:
        diff = _differences(held, run)
    else:
        diff = [f"{len(pngs)} PNG(s) that no {RUN_FILE} describes"] if pngs else []
    if diff and pngs:
        if not overwrite:
            raise DecodeError(f"{out_dir} holds the PNGs of another decode ({'; '.join(diff)}): use --overwrite to "
                              f"replace them, or another --output")
        for f in pngs:
            f.unlink(missing_ok=True)
    if held is None or diff or held != run:
        return lambda: json_dump(run, record)
    return lambda: None


def _numbered_pngs(out_dir: Path) -> list[Path]:
    import os

    try:
        return [Path(e.path) for e in os.scandir(out_dir) if _PNG.match(e.name)]
    except FileNotFoundError:
        return []


def _bundle_facts(model: dict) -> tuple[str, str | None] | None:
    """(checkpoint sha256, latent statistics sha256) of a bundle recorded by `model` ({"path",
    "sha256"}), when the path still holds that bundle; else None."""
    man = Path(str(model.get("path"))) / "manifest.json"
    try:
        if not man.is_file() or sha256_file(man) != model.get("sha256"):
            return None
        m = json.loads(man.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return (m.get("source") or {}).get("sha256") or model["sha256"], (m.get("latent_stats") or {}).get("sha256")


def _identity(model: dict) -> tuple[set[str], str | None]:
    """The model shas that stand for the same weights (a bundle's own and its checkpoint's) and
    the sha256 of the latent statistics it runs with (a bundle's baked ones, else the file given)."""
    shas = {model["sha256"]}
    stats = (model.get("latent_stats") or {}).get("sha256")
    facts = _bundle_facts(model)
    if facts is not None:
        shas.add(facts[0])
        stats = facts[1] or stats
    return shas, stats


def _same_stats(a: dict | None, b: dict | None) -> bool:
    """Two statistics files ({"path", "sha256"}) with the same values (an extract folder's
    safetensors and its authors'-format .pt), when both can still be read as recorded."""
    if not a or not b:
        return False
    from rpiae.checkpoints import read_latent_stats

    try:
        if sha256_file(a["path"]) != a["sha256"]:
            return False
        (m1, v1), (m2, v2) = read_latent_stats(a["path"]), read_latent_stats(b["path"])
    except Exception:  # noqa: BLE001 - unreadable or moved: not known to be the same
        return False
    return bool(m1.shape == m2.shape and (m1 == m2).all() and (v1 == v2).all())


def check_recorded_model(latents: LatentFile, model: dict) -> None:
    """Refuse to decode an extract directory with another model or other latent statistics than
    its manifest records (one line naming both)."""
    recorded = (latents.manifest or {}).get("model") or {}
    if not recorded.get("sha256") or not model.get("sha256"):
        return  # a manifest without a model record, or a backend that does not say what it runs
    rec_shas, rec_stats = _identity(recorded)
    shas, stats = _identity(model)
    if not rec_shas & shas:
        raise DecodeError(f"{latents.path} was extracted with model {recorded.get('path')} (sha256 "
                          f"{recorded['sha256'][:12]}), not {model.get('path')} (sha256 {model['sha256'][:12]}): decode "
                          f"with the model that made the latents")
    if rec_stats != stats and not _same_stats(recorded.get("latent_stats"), model.get("latent_stats")):
        given = (recorded.get("latent_stats") or {}).get("path")
        if rec_stats is None:
            raise DecodeError(f"{latents.path} holds latents extracted without latent statistics: decode without "
                              f"--latent-stats")
        if stats is None:
            raise DecodeError(f"{latents.path} holds latents normalised at extraction with --latent-stats {given} "
                              f"(sha256 {rec_stats[:12]}): decode with the same --latent-stats")
        raise DecodeError(f"{latents.path} holds latents normalised with other statistics ({given}, sha256 "
                          f"{rec_stats[:12]}) than the ones given (sha256 {stats[:12]}): decode with the same "
                          f"--latent-stats")


def _decode_pngs(backend, latents: LatentFile, out_dir: Path, width: int, batch_size: int, overwrite: bool, bar,
                 record: Callable[[], None]) -> int:
    decoded = 0
    for ids, z in latents.batches(batch_size):
        names = png_names(ids, width)
        if pending(out_dir, names, overwrite):
            images = backend.decode(z)  # checked first: NaN/Inf stop the run before this batch is written
            if not decoded:
                record()
            write_pngs(out_dir, names, images)
            decoded += len(ids)
            release_free_memory()  # every batch: a trim is cheap next to decoding a batch
        bar.update(len(ids))
    return decoded


def _last_index(latents: LatentFile) -> int:
    if latents.kind == "dir":
        return int(json.loads((latents.path / "manifest.json").read_text())["samples"]) - 1
    return len(latents) - 1
