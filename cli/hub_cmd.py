"""`rpiae push`: publish a model to the Hugging Face Hub (diffusers layout + model card)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from rpiae.cli.common import friendly_errors, latent_stats_option, model_option


@click.command()
@click.argument("repo_id")
@model_option
@latent_stats_option
@click.option("--per", type=click.Choice(["channel", "element"]), default="channel", show_default=True,
              help="With --latent-stats: write latents_mean/latents_std per channel (64 values) or per element.")
@click.option("--eval", "eval_json", type=click.Path(path_type=Path), default=None,
              help="`rpiae eval --json` report whose rows go into the model card.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None,
              help="Export bundle whose parity results go into the model card.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--revision", default=None, help="Branch to upload to (default: main).")
@click.option("--dry-run", is_flag=True, help="Write the repository's files (to --out) without uploading.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for the repository's files (default: a temporary folder; required with --dry-run).")
@friendly_errors
def push(repo_id, model, latent_stats, per, eval_json, bundle, private, revision, dry_run, out):
    """Upload MODEL to the Hugging Face Hub as REPO_ID (owner/name).

    The repository holds config.json + diffusion_pytorch_model.safetensors (loadable with
    `AutoencoderRPiAE.from_pretrained` and `RPiAE.from_pretrained`) and a model card with the
    measured quality (--eval) and the exported graphs' parity (--bundle). Needs the
    `diffusers` extra and a Hub login (`huggingface-cli login`).
    """
    from rpiae.export.bundle import Bundle
    from rpiae.hub import parse_reference, resolve_model
    from rpiae.model import RPiAE
    from rpiae.publish import push as upload
    from rpiae.publish import read_eval_report, write_hub_folder

    repo_id, _ = parse_reference(repo_id)
    if dry_run and out is None:
        raise click.BadParameter("--dry-run needs --out FOLDER", param_hint="--out")
    path = resolve_model(model)
    weights = Bundle.open(path).weights_path() if Bundle.is_bundle(path) else path
    report = read_eval_report(eval_json) if eval_json else None
    manifest = Bundle.open(bundle).manifest if bundle else (Bundle.open(path).manifest if Bundle.is_bundle(path) else None)
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise click.ClickException('rpiae push needs diffusers: pip install "rpiae[diffusers]"') from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_hub_folder(RPiAE.from_checkpoint(weights), out or Path(tmp) / "repo", repo_id, report, manifest,
                                  latent_stats, per)
        if dry_run:
            click.echo(f"wrote {', '.join(sorted(p.name for p in folder.iterdir()))} to {folder}/ (not uploaded)")
            return
        url = upload(repo_id, folder, private=private, revision=revision)
    click.echo(f"uploaded {repo_id}: {url}")
