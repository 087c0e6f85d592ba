"""`rpiae encode`, `rpiae decode` and `rpiae extract`: thin commands over `rpiae.jobs`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rpiae.cli.common import (
    STREAM_BATCH, crop_option, friendly_errors, parse_backend_options, runtime_options, workers_option,
)
from rpiae.jobs import ENGINES
from rpiae.jobs.shards import LATENT_DTYPES

engine_option = click.option(
    "--engine", type=click.Choice(ENGINES), default=ENGINES[0], show_default=True,
    help="local: this process (and its loader workers); ray: a Ray cluster with Ray Data (pip install -e '.[ray]').",
)
address_option = click.option(
    "--address", default=None,
    help="Ray cluster to run on: HEAD:6379, or auto on a node of a running cluster (default RAY_ADDRESS, "
    "else a local Ray instance started and stopped by the command). With --engine ray.",
)
workers_per_gpu_option = click.option(
    "--workers-per-gpu", type=click.IntRange(1), default=None,
    help="Backend actors per GPU of the Ray cluster (default 1). With --engine ray; without GPUs, one CPU actor per node.",
)


def engine_options(fn):
    for option in reversed((engine_option, address_option, workers_per_gpu_option)):
        fn = option(fn)
    return fn


def _check_engine(engine, address, workers_per_gpu) -> None:
    """`rpiae.jobs.check_engine` before any work, its option errors as usage errors."""
    from rpiae.jobs import check_engine

    try:
        check_engine(engine, address, workers_per_gpu)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _engine(engine, address, workers_per_gpu, model, backend, precision, device, batch_size, latent_stats, options, graph):
    """The job's engine for its one `graph`: the local backend, or a `RayEngine` (device: the
    --device given, else what the cluster has), opened with `options` (`parse_backend_options`
    of --backend-option)."""
    from click.core import ParameterSource

    from rpiae.jobs import open_engine

    if engine == "ray" and click.get_current_context().get_parameter_source("device") == ParameterSource.DEFAULT:
        device = None
    return open_engine(model, backend, precision, device, max_batch=batch_size, latent_stats=latent_stats, engine=engine,
                       address=address, workers_per_gpu=workers_per_gpu, options=options, graphs=(graph,))


@click.command()
@runtime_options
@crop_option
@workers_option
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Where to write the latents: one float32 .npy array of shape (N, C, H, W) (the model's latent shape: "
                   "64x16x16 for RPiAE, 96x16x16 for PS-VAE), in input order.")
@friendly_errors
def encode(model, backend, backend_option, precision, device, batch_size, latent_stats, crop, workers, images, output):
    """Encode IMAGES (files, or folders searched recursively) into one .npy of latents.

    Images stream through the backend batch by batch; the array is written into a temporary
    file and renamed when complete. One bad image is named and nothing is written. For whole
    datasets (shards, labels, statistics, resume, many GPUs) use `rpiae extract`.
    """
    from rpiae.jobs.encode import encode_files

    if output.suffix != ".npy":
        raise click.BadParameter("the output must be a .npy file", param_hint="--output")
    options = parse_backend_options(backend, backend_option)
    with _engine("local", None, None, model, backend, precision, device, batch_size, latent_stats, options, "encode") as be:
        s = encode_files(images, output, be, crop, workers, batch_size)
    n, shape = s["images"], s["shape"][1:]
    click.echo(f"encoded {n} image(s) with {backend}/{precision} ({crop} crop) -> {output} ({n}, "
               f"{', '.join(map(str, shape))})")


@click.command()
@runtime_options
@click.argument("latents", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder for the decoded images: one 8-bit PNG per latent, named by sample number (000000.png, ...).")
@click.option("--npz", type=click.Path(path_type=Path), default=None,
              help="Also pack the PNGs into FILE.npz for the ADM evaluation suite (uint8 arr_0, (N, 256, 256, 3)).")
@click.option("--key", default=None,
              help="Array to read from a .npz (default arr_0), a .safetensors (default latents) or an `rpiae extract` "
                   "directory (latents, or latents_flip of an extract with --flip); not for .npy.")
@click.option("--overwrite", is_flag=True,
              help="Decode again even where the PNG already exists, and replace the PNGs of another decode (other "
                   "latents, model, statistics, backend or precision) the output folder holds; without it a re-run "
                   "of the same decode skips finished PNGs and another decode is refused.")
@click.option("--any-model", is_flag=True,
              help="Decode an `rpiae extract` directory with another model or other --latent-stats than its manifest "
                   "records (default: refused, since the images would be wrong), e.g. a decoder fine-tuned on the "
                   "same encoder's latents.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@engine_options
@friendly_errors
def decode(model, backend, backend_option, precision, device, batch_size, latent_stats, latents, output, npz, key, overwrite,
           any_model, quiet, engine, address, workers_per_gpu):
    """Decode LATENTS into PNG images, batch by batch.

    LATENTS: a .npy (memory-mapped), a .npz (arr_0 or --key), a .safetensors (`latents` or
    --key) or an `rpiae extract` directory; shape (N, C, H, W), the model's latent shape. Memory does not grow
    with N; each PNG is written atomically and a re-run resumes where it stopped. OUTPUT/.rpiae-decode.json
    records what made the PNGs (latents, model, statistics, backend, precision): a re-run resumes only
    when they match. An extract directory is decoded with the model and --latent-stats its manifest
    records (--any-model: another).

    With --engine ray, Ray tasks stream the latents and write the PNGs and a pool of actors
    decodes: LATENTS and the output folder must be at the same path on every node.
    """
    from rpiae.data.latents import LatentFile
    from rpiae.jobs.decode import decode_latents

    _check_engine(engine, address, workers_per_gpu)
    options = parse_backend_options(backend, backend_option)
    src = LatentFile(latents, key)
    with _engine(engine, address, workers_per_gpu, model, backend, precision, device, batch_size, latent_stats,
                 options, "decode") as be:
        s = decode_latents(src, output, be, batch_size or STREAM_BATCH, npz=npz, overwrite=overwrite, progress=not quiet,
                           check_model=not any_model)
        where = f" ({be.summary()})" if engine == "ray" else ""
    kept = f", {s['kept']} already there" if s["kept"] else ""
    packed = f", packed into {npz}" if npz else ""
    click.echo(f"decoded {s['decoded']} latent(s) with {backend}/{precision}{where}{kept} -> {output}/{packed} "
               f"in {s['seconds']:.1f} s")


def _distributed() -> tuple[int, int, int, object]:
    """(rank, world, local rank, barrier) under torchrun (a gloo group for coordination); (0, 1, 0, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.barrier


@click.command()
@runtime_options
@crop_option
@workers_option
@click.argument("data", type=str)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output directory: shard-*.safetensors (the only *.safetensors at its top level, for DiT trainers "
                   "that glob them), stats/latents_stats.safetensors, latents_stats.pt, normalization_stats.pt, "
                   "manifest.json.")
@click.option("--shard-size", type=click.IntRange(1), default=10000, show_default=True, help="Latents per shard file.")
@click.option("--flip", is_flag=True, help="Also store the latents of the horizontally flipped images (latents_flip); they enter the statistics.")
@click.option("--dtype", type=click.Choice(LATENT_DTYPES), default="fp32", show_default=True, help="Storage type of the latents.")
@click.option("--skip-bad", is_flag=True,
              help="Skip samples that cannot be used (unreadable or missing image file, a WebDataset sample without an "
                   "image), listed in the manifest, instead of stopping at the first. Shards finished before are kept.")
@click.option("--no-labels", is_flag=True, help="Read an ImageFolder tree as plain images, recursively (labels -1).")
@click.option("--overwrite", is_flag=True,
              help="Start over when --out holds an extraction with other settings (model, backend, precision, crop, "
                   "dtype, flip, shard size); without it such a run is refused.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@engine_options
@friendly_errors
def extract(model, backend, backend_option, precision, device, batch_size, latent_stats, crop, workers, data, out, shard_size, flip,
            dtype, skip_bad, no_labels, overwrite, quiet, engine, address, workers_per_gpu):
    """Encode a whole dataset into latent shards, with exact statistics, resumably.

    DATA: a folder of images, an ImageFolder tree (class sub-folders -> integer labels by
    sorted name), a .txt list (`path` or `path label` per line), or WebDataset .tar shards
    (a path, glob or brace pattern such as 'train-{000..099}.tar'; label from `cls`).

    Re-running the same command keeps every finished shard and computes the rest. Under
    `torchrun --nproc-per-node N -m rpiae.cli extract ...` the ranks split the shards (one
    GPU each with --device cuda) and produce the same files as one process.

    With --engine ray the dataset is read and cropped by Ray tasks and encoded by a pool of
    actors (one per GPU of the cluster, or per node without GPUs), and this process writes the
    same files as the local engine; DATA and the model must be at the same path on every node.
    """
    from rpiae.data.sources import open_source
    from rpiae.jobs import job_model
    from rpiae.jobs.extract import extract as run
    from rpiae.jobs.shards import ExtractOptions

    _check_engine(engine, address, workers_per_gpu)
    options = parse_backend_options(backend, backend_option)
    rank, world, local_rank, barrier = _distributed()
    if world > 1 and engine == "ray":
        raise click.UsageError("--engine ray runs from one process, not under torchrun")
    if world > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
    opts = ExtractOptions(shard_size=shard_size, batch_size=batch_size or STREAM_BATCH, flip=flip, dtype=dtype,
                          workers=workers, skip_bad=skip_bad, crop=crop)
    source = open_source(data, no_labels=no_labels)
    with _engine(engine, address, workers_per_gpu, model, backend, precision, device, batch_size, latent_stats,
                 options, "encode") as be:
        s = run(source, out, be, job_model(be, model, latent_stats), opts, rank=rank, world=world, barrier=barrier,
                progress=not quiet, overwrite=overwrite)
        where = f"; {be.summary()}" if engine == "ray" else ""
    if rank == 0:
        rate = f"; {s['images'] / s['seconds']:.1f} img/s" if s["images"] and s["seconds"] else ""
        skipped = f", {s['skipped']} skipped (listed in the manifest)" if s["skipped"] else ""
        click.echo(
            f"extracted {s['rows']} latent(s) of {s['samples']} image(s) into {s['shards']} shard(s) -> {out} "
            f"(rank 0: {s['shards_computed']} computed, {s['shards_kept']} already done{rate}{skipped}{where})"
        )
