"""`rpiae encode` and `rpiae decode`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from tqdm.auto import tqdm

from rpiae.cli.common import friendly_errors, runtime_options
from rpiae.fileio import atomic_file


def _open(model, backend, precision, device, batch_size):
    from rpiae.engines import load_backend

    return load_backend(model, backend=backend, precision=precision, device=device, max_batch=batch_size)


@click.command()
@runtime_options
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Where to write the latents: one float32 .npy array of shape (N, 64, 16, 16), in input order.")
@friendly_errors
def encode(model, backend, precision, device, batch_size, images, output):
    """Encode IMAGES (files or folders of images) into latents.

    Every image goes through the same input policy (rpiae.imageio): EXIF rotation,
    gray/alpha/16-bit handling, short side to 256 and centre crop. All images are read
    before anything is computed; one bad image is named and nothing is written.
    """
    from rpiae.imageio import find_images, load_images

    files: list[Path] = []
    for p in images:
        files.extend(find_images(p) if p.is_dir() else [p])
    if output.suffix != ".npy":
        raise click.BadParameter("the output must be a .npy file", param_hint="--output")
    x = load_images(files)
    with _open(model, backend, precision, device, batch_size) as be:
        z = be.encode(x)
    with atomic_file(output) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, z.astype(np.float32))
    click.echo(f"encoded {len(files)} image(s) with {backend}/{precision} -> {output} {tuple(z.shape)}")


@click.command()
@runtime_options
@click.argument("latents", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="Folder for the decoded images: one 8-bit PNG per latent, 000000.png, 000001.png, ...")
@friendly_errors
def decode(model, backend, precision, device, batch_size, latents, output):
    """Decode LATENTS (a .npy array of shape (N, 64, 16, 16)) into PNG images.

    The latents are checked (shape, float dtype, no NaN/Inf) before anything is decoded;
    all images are decoded before any file is written; each PNG is written atomically.
    """
    from rpiae.imageio import save_image

    if not latents.is_file():
        raise click.ClickException(f"{latents}: no such file")
    try:
        z = np.load(latents, allow_pickle=False)
    except Exception as e:  # numpy raises several types for corrupt files
        raise click.ClickException(f"{latents}: not a readable .npy array ({type(e).__name__})") from None
    with _open(model, backend, precision, device, batch_size) as be:
        y = be.decode(z)
    output.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(tqdm(y, desc="write", unit="img", leave=False, disable=len(y) < 16)):
        save_image(img, output / f"{i:06d}.png")
    click.echo(f"decoded {len(y)} latent(s) with {backend}/{precision} -> {output}/")
