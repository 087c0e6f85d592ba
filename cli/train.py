"""`rpiae train`: one stage of a recipe (docs/TRAINING.md): RPiAE's three stages (the
default) or PS-VAE's two (`--recipe ps-vae`).

    rpiae train --stage 1 --data DIR --preset rpiae-b --init-encoder dinov2.pth \
        --lpips-weights vgg16.pth --lpips-weights lpips_vgg.pth --disc-weights dino_s8.pth --out runs/s1
    rpiae train --stage 2 --data DIR --resume runs/s1/last --out runs/s2
    rpiae train --stage 3 --data DIR --resume runs/s2/last --lpips-weights ... --disc-weights ... --out runs/s3
    rpiae train --recipe ps-vae --stage 1 --data DIR --init-encoder dinov2.pth --lpips-weights ... --out runs/ps1
    rpiae train --recipe ps-vae --stage 2 --data DIR --resume runs/ps1/last --lpips-weights ... \
        --disc-weights ... --out runs/ps2
    torchrun --nproc-per-node 8 -m rpiae.cli train ...     # DDP
"""

from __future__ import annotations

from pathlib import Path

import click

from rpiae.cli.common import echo_json, friendly_errors


@click.command()
@click.option("--recipe", type=click.Choice(["rpiae", "ps-vae"]), default="rpiae", show_default=True,
              help="rpiae: the three-stage RPiAE recipe; ps-vae: S-VAE then PS-VAE (a ps-vae family model).")
@click.option("--stage", type=click.IntRange(1, 3), required=True,
              help="rpiae 1: E + D; 2: the Variational Bridge; 3: D on the latent. "
                   "ps-vae 1: S-VAE (E frozen); 2: PS-VAE (everything).")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="Training images: a folder, searched recursively (jpg/png/webp).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run folder: last/ (resume checkpoint), samples/, log.jsonl, metrics.json, model.safetensors. "
                   "A folder that holds a run (OUT/last) is never overwritten: continue that run with "
                   "--resume OUT/last, or give a new --out (remove the old folder yourself to start over).")
@click.option("--val-data", type=click.Path(path_type=Path), default=None, help="Held-out images for PSNR/SSIM (short side 256, centre crop).")
@click.option("--preset", default=None,
              help="Model size for a new stage-1 run (default rpiae-b, with --recipe ps-vae: ps-vae); ignored with --resume.")
@click.option("--init-encoder", type=click.Path(path_type=Path), default=None, help="Weights for E: DINOv2-with-registers (HF, Meta or timm layout) or, for a siglip2 encoder, SigLIP2 (HF layout).")
@click.option("--init-decoder", type=click.Path(path_type=Path), default=None, help="RAE's ViT-XL decoder weights for D.")
@click.option("--resume", type=click.Path(path_type=Path), default=None,
              help="A run's last/ (or its checkpoint.pt): the same stage continues exactly, with the training config "
                   "saved in the checkpoint (--set/--config may change only max_steps, num_workers, log_every, "
                   "sample_every, save_every, val_every, val_images and deterministic; other values that differ "
                   "are refused); the previous stage's (stage N from stage N-1) starts this one, into a new "
                   "--out, from its raw weights (--set start_from_ema=true: its EMA).")
@click.option("--restart", is_flag=True,
              help="With --resume of the same stage: start that stage anew from its weights (new optimiser, schedule and step count), e.g. a longer or re-weighted fine-tune, into a new --out.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Recipe overrides (JSON, or YAML with PyYAML): shared keys, and stage1/stage2/stage3 sections. Defaults: docs/TRAINING.md.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one recipe field, e.g. --set batch_size=64 (repeatable).")
@click.option("--model-set", "model_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one model config field of a new stage-1 run's preset, e.g. --model-set latent_channels=112 (repeatable).")
@click.option("--lpips-weights", multiple=True, type=click.Path(path_type=Path),
              help="Local LPIPS weights: torchvision VGG16 (features.N.*) and the LPIPS heads (lin{0..4}.model.1.weight); one file or two.")
@click.option("--disc-weights", type=click.Path(path_type=Path), default=None, help="Local DINO ViT-S/8 weights for the discriminator's feature network.")
@click.option("--no-lpips", is_flag=True, help="Train without the LPIPS term (required when no --lpips-weights are given).")
@click.option("--no-gan", is_flag=True, help="Train without the GAN term (required when no --disc-weights are given).")
@click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda when available; under torchrun the local rank's GPU).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def train(recipe, stage, data, out, val_data, preset, init_encoder, init_decoder, resume, restart, config_path, overrides,
          model_overrides, lpips_weights, disc_weights, no_lpips, no_gan, device, quiet):
    """Train one stage of RPiAE (or, with --recipe ps-vae, of PS-VAE) on an image folder."""
    from rpiae.config import RPiAEConfig
    from rpiae.training.config import parse_override

    try:
        values = dict(parse_override(item) for item in overrides)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--set") from None
    try:
        model_values = dict(parse_override(item, RPiAEConfig, "model config") for item in model_overrides)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--model-set") from None
    from rpiae.training.run import run_training

    metrics = run_training(
        stage, data, out,
        preset=preset, init_encoder=init_encoder, init_decoder=init_decoder, resume=resume,
        config_path=config_path, overrides=values, lpips_weights=lpips_weights, disc_weights=disc_weights,
        no_lpips=no_lpips, no_gan=no_gan, val_data=val_data, progress=not quiet, device=device, recipe=recipe,
        model_overrides=model_values, restart=restart,
    )
    if metrics:
        echo_json(metrics)
        click.echo(f"stage {stage} done: resume/next stage from {Path(out) / 'last'}", err=True)
