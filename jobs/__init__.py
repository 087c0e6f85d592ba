"""Jobs: the dataset-scale work above the runtimes. Each job opens its engine once
(`open_engine`: a backend of `rpiae.engines` here, or a `RayEngine` on a cluster) and streams
through it with bounded memory.

- `encode.encode_files`: image files -> one `.npy` of latents (`rpiae encode`).
- `extract.extract`: a dataset -> latent shards + exact statistics + manifest, resumable, by
  rank (`rpiae extract`; the shard format is `shards`'s and `rpiae.data.latents`').
- `decode.decode_latents`: latents -> PNGs (+ the ADM `.npz`, `pngs`), streaming, resumable.
- `evaluate.evaluate`: reconstruction quality (PSNR/SSIM/LPIPS/rFID) of several runtimes and
  precisions on real images (`rpiae eval`).
- `ray_engine.RayEngine`: extract and decode spread over a Ray cluster.

The sources they read (folders, ImageFolder trees, lists, WebDataset shards) and the latent
file formats are the core's (`rpiae.data`).
"""

from __future__ import annotations

from pathlib import Path

from rpiae.engines import Backend, load_backend, model_info
from rpiae.engines.base import check_graphs
from rpiae.export.spec import GRAPHS
from rpiae.jobs.ray_engine import RayEngine, import_ray

ENGINES = ("local", "ray")  # where a job runs: this process (and its loader workers), or a Ray cluster


def check_engine(engine: str, address: str | None = None, workers_per_gpu: int | None = None) -> None:
    """Before any work: a known engine, Ray's options only with the Ray engine (ValueError), and
    the Ray engine only with Ray installed (`RayUnavailable`)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "local" and (address is not None or workers_per_gpu is not None):
        raise ValueError("--address and --workers-per-gpu go with --engine ray")
    if engine == "ray":
        import_ray()


def open_engine(model: str | Path | None, backend: str, precision: str = "fp32", device: str | None = "cpu",
                max_batch: int | None = None, latent_stats: str | Path | None = None, engine: str = "local",
                address: str | None = None, workers_per_gpu: int | None = None,
                options: dict | None = None, graphs: tuple[str, ...] = GRAPHS) -> Backend | RayEngine:
    """The engine a job streams through: `load_backend(...)` here, or a `RayEngine` (its actors
    open the same backend; `device=None` lets it pick CUDA when the cluster has GPUs).
    `options`: the backend's keyword options (`rpiae.engines.backend_options`). `graphs`: the
    graphs the job runs; only their files are loaded (an encode job never holds the decoder's
    graph, engine or GPU memory)."""
    check_engine(engine, address, workers_per_gpu)
    graphs = check_graphs(graphs)
    if engine == "local":
        be = load_backend(model, backend=backend, precision=precision, device=device or "cpu", max_batch=max_batch,
                          latent_stats=latent_stats, graphs=graphs, **(options or {}))
        be.job_latent_stats = latent_stats  # what `engine_model` records (the backend keeps only the values)
        return be
    return RayEngine(model, backend, precision, device, max_batch=max_batch, latent_stats=latent_stats, address=address,
                     workers_per_gpu=workers_per_gpu or 1, options=options, graphs=graphs)


def job_model(engine: Backend | RayEngine, model: str | Path | None = None,
              latent_stats: str | Path | None = None) -> dict:
    """{"path", "sha256", "config"[, "latent_stats"]} of what `engine` runs, for a job's records:
    from what a local backend was opened from (no second open), else from `model`."""
    from rpiae.fileio import sha256_file

    opened = engine.opened_from if isinstance(engine, Backend) else None
    info = model_info(opened if opened is not None else model)
    if latent_stats is not None:
        info["latent_stats"] = {"path": str(latent_stats), "sha256": sha256_file(latent_stats)}
    return info


def engine_model(engine: Backend | RayEngine) -> dict:
    """`job_model` of an engine, from what it was opened with: the model a local backend was
    opened from and the latent statistics `open_engine` gave it, or a `RayEngine`'s spec."""
    if isinstance(engine, RayEngine):
        return job_model(engine, engine.spec["model"], engine.spec["latent_stats"])
    if getattr(engine, "opened_from", None) is None:  # a backend made by hand: nothing to say what it runs
        return {"path": None, "sha256": None, "config": None}
    return job_model(engine, None, getattr(engine, "job_latent_stats", None))


__all__ = ["ENGINES", "RayEngine", "check_engine", "engine_model", "job_model", "open_engine"]
