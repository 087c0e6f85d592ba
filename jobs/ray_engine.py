"""`rpiae extract` and `rpiae decode` on a Ray cluster, with Ray Data.

The pipelines (Ray Data streams them with back-pressure):

- extract: the batches of `ShardPlan.batches` (one row each) -> CPU tasks read, decode and
  crop the batch's images (`image_loader`, as the local engine) -> a pool of actors, each
  with the backend opened once, encodes the batch (`encode_batch`) -> the driver hands the
  results to `ShardWriter`, which writes each shard atomically once all its batches are in.
- decode: one CPU task streams the latents batch by batch (`LatentFile.batches`, skipping
  batches whose PNGs all exist) -> the actor pool decodes -> CPU tasks write the PNGs.

The unit of work is the batch the local engine forms, never a Ray block, so both engines
run the backend on the same batches and write the same files; the driver orders results by
sample number, not by arrival.

Actors: `workers_per_gpu` per GPU of the cluster (each with 1/K of a GPU), or, on a cluster
without GPUs, one CPU actor per node that runs the backend with as many threads as the
node has CPUs (or `OMP_NUM_THREADS` when the driver sets it). Every actor requests only
`ACTOR_CPUS` logical CPUs, so the reading and writing tasks always find CPU: a pool that
takes every CPU stalls the pipeline. Ray restarts an actor whose process dies and retries
its batch (Ray Data's defaults `max_restarts=-1`, `max_task_retries=-1`); a batch that comes
back twice is taken once.

Paths (data, model, latent statistics, latents, decode's output folder) must be readable at
the same place on every node, e.g. a shared filesystem; `extract` writes its output from the
driver only.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from rpiae.export.backends import REFERENCE
from rpiae.jobs.shards import EncodedBatch, ExtractError, ShardPlan, ShardWriter, encode_batch

RAY_MISSING = "the Ray engine needs Ray Data: pip install -e '.[ray]' (or pip install 'ray[data]')"
ACTOR_CPUS = 0.5  # logical CPUs per actor: the rest of a node reads and writes
READ_CPUS = 1.0  # per task that reads and crops images, or writes PNGs
LATENT_READ_CPUS = 0.25  # the one task that streams latents from a file (I/O bound)


class RayUnavailable(ImportError):
    """Ray (with Ray Data) is not installed (one line: what to install)."""


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayUnavailable(RAY_MISSING) from None
    return ray


def _user_error(e: BaseException) -> BaseException:
    """The exception a task or actor raised, without Ray's wrappers (for a one-line message)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None) or e.__cause__
        if cause is None or not isinstance(cause, BaseException):
            break
        e = cause
    return e


def _set_threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def _open_backend(spec: dict, threads: int | None):
    """`rpiae.engines.load_backend(**spec)` on a worker."""
    from rpiae.engines import load_backend

    if spec["device"] == "cpu":
        _set_threads(threads)
    return load_backend(**spec)


def _probe(spec: dict, threads: int | None) -> tuple[dict, object]:
    """Open the backend on a worker once: what it is (`describe()`) and its model config."""
    with _open_backend(spec, threads) as be:
        return be.describe(), be.config


def _pad(a: np.ndarray | None, rows: int, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """`a` in the first rows of a (rows, *shape) array: every row of a column has one shape."""
    out = np.zeros((rows, *shape), dtype)
    if a is not None and len(a):
        out[: len(a)] = a
    return out


# -- extract ----------------------------------------------------------------------------------------

_SOURCES: dict = {}  # per worker process: the source, fetched from the object store once


def _read_images(row: dict, source_ref, crop: str, size: int, rows: int) -> dict:
    """Ray task: read, decode and crop the images of one batch (errors are returned, not raised)."""
    import ray

    from rpiae.data.sources import image_loader

    key = source_ref.hex()
    if key not in _SOURCES:
        _SOURCES.clear()
        _SOURCES[key] = ray.get(source_ref)
    start, stop = int(row["start"]), int(row["stop"])
    _, images, errors = next(iter(image_loader(_SOURCES[key], [list(range(start, stop))], crop, size, workers=0)))
    return {"start": start, "stop": stop, "errors": json.dumps(errors), "images": _pad(images.numpy(), rows, images.shape[1:])}


class _Encoder:
    """Ray actor: the backend, opened once, encodes one batch per call."""

    def __init__(self, spec: dict, threads: int | None, flip: bool, rows: int) -> None:
        self.backend = _open_backend(spec, threads)
        self.flip, self.rows = flip, rows
        self.shape = tuple(self.backend.config.latent_shape)

    def __call__(self, row: dict) -> dict:
        import torch

        start, stop = int(row["start"]), int(row["stop"])
        errors = json.loads(row["errors"])
        images = torch.from_numpy(np.array(row["images"][: stop - start]))  # a writable copy of the block's view
        b = encode_batch(self.backend, list(range(start, stop)), images, errors, self.flip)
        out = {"start": start, "stop": stop, "errors": row["errors"], "z": _pad(b.z, self.rows, self.shape)}
        if self.flip:
            out["zf"] = _pad(b.zf, self.rows, self.shape)
        return out


def _encoded(row: dict) -> EncodedBatch:
    start, stop = int(row["start"]), int(row["stop"])
    errors = json.loads(row["errors"])
    good = sum(1 for e in errors if not e)
    z = np.array(row["z"][:good]) if good else None
    zf = np.array(row["zf"][:good]) if good and "zf" in row else None
    return EncodedBatch(list(range(start, stop)), errors, z, zf)


# -- decode -------------------------------------------------------------------------------------------


def _read_latents(batch: dict, path: str, key: str | None, size: int, out_dir: str, width: int, overwrite: bool):
    """Ray task (a generator): the batches of a latent file that still need decoding, one per
    output row, as `decode_latents` forms them."""
    from rpiae.jobs.pngs import pending, png_names
    from rpiae.data.latents import LatentFile

    for ids, z in LatentFile(path, key).batches(size):
        if pending(Path(out_dir), png_names(ids, width), overwrite):
            padded = np.full(size, -1, np.int64)
            padded[: len(ids)] = ids
            yield {"ids": padded[None], "n": np.asarray([len(ids)]), "z": _pad(z, size, z.shape[1:])[None]}


class _Decoder:
    """Ray actor: the backend, opened once, decodes one batch per call."""

    def __init__(self, spec: dict, threads: int | None, rows: int) -> None:
        self.backend = _open_backend(spec, threads)
        self.rows = rows

    def __call__(self, row: dict) -> dict:
        n = int(row["n"])
        images = self.backend.decode(np.array(row["z"][:n]))  # NaN/Inf stop the run before this batch is written
        return {"ids": row["ids"], "n": n, "images": _pad(images, self.rows, images.shape[1:])}


def _write_pngs(row: dict, out_dir: str, width: int) -> dict:
    """Ray task: write one decoded batch as PNGs (each atomically)."""
    from rpiae.jobs.pngs import png_names, write_pngs

    n = int(row["n"])
    write_pngs(Path(out_dir), png_names(row["ids"][:n], width), row["images"][:n])
    return {"n": n}


# -- the engine ----------------------------------------------------------------------------------------


class RayEngine:
    """A backend spread over a Ray cluster, for `extract(...)` and `decode_latents(...)`.

    Connects to `address` (or `RAY_ADDRESS`); with neither, starts a local Ray instance and
    shuts it down on close. `device=None` picks CUDA when the cluster has GPUs, else the CPU.
    Each actor opens its backend with `rpiae.engines.load_backend(model=..., backend=..., ...)`.
    """

    def __init__(self, model: str | None = None, backend: str = REFERENCE,
                 precision: str = "fp32", device: str | None = None, max_batch: int | None = None,
                 latent_stats: str | None = None, address: str | None = None, workers_per_gpu: int = 1,
                 options: dict | None = None, graphs: tuple[str, ...] | None = None) -> None:
        if workers_per_gpu < 1:
            raise ValueError("workers per GPU must be >= 1")
        from rpiae.hub import resolve_model

        self.ray = import_ray()
        if model is not None:
            model = resolve_model(model)  # a missing file is named before the cluster is touched
        if latent_stats is not None and not Path(latent_stats).is_file():
            raise FileNotFoundError(f"{latent_stats}: no such latent statistics file")
        self.spec = {  # what each actor opens; paths absolute: workers do not share our cwd
            "model": str(Path(model).resolve()) if model is not None else None, "backend": backend,
            "precision": precision, "device": device, "max_batch": max_batch,
            "latent_stats": str(Path(latent_stats).resolve()) if latent_stats is not None else None,
            **(options or {}),  # the backend's own keyword options
            **({"graphs": tuple(graphs)} if graphs else {}),  # only the graphs the job runs
        }
        self.address, self.workers_per_gpu = address, workers_per_gpu
        threads = os.environ.get("OMP_NUM_THREADS", "")
        self.threads = int(threads) if threads.isdigit() and int(threads) > 0 else None
        self._started = False

    # -- cluster --------------------------------------------------------------------------------------

    def __enter__(self) -> "RayEngine":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        import logging

        ray = self.ray
        address = self.address or os.environ.get("RAY_ADDRESS")
        # Ray's notice that token authentication is on (how to opt out) is not for our users: the
        # cluster's settings are its operator's; real warnings of Ray still show
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:  # "local": a new instance of our own, even where another one runs on this machine
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
        self._started = True
        # a failed task's error reaches the command as an exception, said in one line; Ray Data
        # would log its traceback too (it stays in the session's log files)
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the command shows one bar of its own
        ctx.print_on_execution_start = False
        ctx.raise_original_map_exception = True
        try:
            self._size_actors()
            self.info, self.config = self._call(ray.remote(_probe).options(**self.actor_resources).remote(self.spec, self.threads))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._started:
            self._started = False
            self.ray.shutdown()

    def _size_actors(self) -> None:
        ray = self.ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.nodes = len([n for n in ray.nodes() if n.get("Alive")])
        device = self.spec["device"]
        if device is None:
            device = "cuda" if gpus else "cpu"
        elif device.startswith("cuda:"):
            device = "cuda"  # each actor sees only its own GPU
        self.spec["device"] = device
        if device == "cpu":
            nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
            self.actors = max(1, len(nodes))
            self.actor_resources = {"num_cpus": ACTOR_CPUS}  # Ray Data spreads actors over the nodes
        else:
            if not gpus:
                raise ExtractError(f"--device {device}: the Ray cluster has no GPUs (use --device cpu)")
            self.actors = gpus * self.workers_per_gpu
            self.actor_resources = {"num_cpus": ACTOR_CPUS, "num_gpus": 1 / self.workers_per_gpu}

    def _call(self, ref):
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            raise _one_line(e) from None

    def _rows(self, ds):
        """The dataset's rows, with a task's or actor's error raised as itself, in one line."""
        try:
            yield from ds.iter_rows()
        except self.ray.exceptions.RayError as e:
            raise _one_line(e) from None

    def describe(self) -> dict:
        return self.info

    def summary(self) -> str:
        return f"{self.actors} {'CPU' if self.spec['device'] == 'cpu' else 'GPU'} actor(s) on {self.nodes} Ray node(s)"

    # -- extract ----------------------------------------------------------------------------------------

    def run_shards(self, plan: ShardPlan, shards: list[int], total: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        ray, opts = self.ray, plan.opts
        source = replace(plan.source, root=os.path.abspath(plan.source.root))  # workers do not share our cwd
        items = [{"start": r.start, "stop": r.stop} for r in plan.batches(shards)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(_read_images, fn_kwargs={"source_ref": ray.put(source), "crop": opts.crop, "size": opts.size,
                                             "rows": opts.batch_size}, num_cpus=READ_CPUS)
        ds = ds.map(_Encoder, fn_constructor_kwargs={"spec": self.spec, "threads": self.threads, "flip": opts.flip,
                                                     "rows": opts.batch_size},
                    compute=ray.data.ActorPoolStrategy(size=self.actors), **self.actor_resources)
        writer = ShardWriter(plan, shards)
        with tqdm(total=total, unit="img", desc="extract (ray)", disable=not progress, dynamic_ncols=True, smoothing=0.05) as bar:
            for row in self._rows(ds):
                batch = _encoded(row)
                if writer.add(batch):
                    bar.update(len(batch.ids))
        if writer.pending:
            raise ExtractError(f"shard(s) {sorted(writer.pending)} incomplete after the run; run the same command again")

    # -- decode -----------------------------------------------------------------------------------------

    def decode_pngs(self, latents, out_dir: Path, width: int, batch_size: int, overwrite: bool, bar) -> int:
        ray = self.ray
        out_dir = Path(out_dir).resolve()
        ds = ray.data.from_items([{"file": 0}])
        ds = ds.map_batches(_read_latents, batch_size=1, num_cpus=LATENT_READ_CPUS, fn_kwargs={
            "path": str(latents.path.resolve()), "key": latents.key, "size": batch_size, "out_dir": str(out_dir),
            "width": width, "overwrite": overwrite})
        ds = ds.repartition(target_num_rows_per_block=1)  # one batch per block: one actor call each
        ds = ds.map(_Decoder, fn_constructor_kwargs={"spec": self.spec, "threads": self.threads, "rows": batch_size},
                    compute=ray.data.ActorPoolStrategy(size=self.actors), **self.actor_resources)
        ds = ds.map(_write_pngs, fn_kwargs={"out_dir": str(out_dir), "width": width}, num_cpus=READ_CPUS)
        decoded = 0
        for row in self._rows(ds):
            decoded += int(row["n"])
            bar.update(int(row["n"]))
        return decoded


def _one_line(e: BaseException) -> BaseException:
    """A Ray error as the error its task raised (same type where possible), with the task's own
    message: its first line (Ray Data appends retry advice on the next ones)."""
    cause = _user_error(e)
    text = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if cause is e or not isinstance(cause, Exception):
        return ExtractError(f"Ray: {' '.join(str(e).split())[:500]}")
    try:
        return type(cause)(text)
    except Exception:
        return ExtractError(text)
