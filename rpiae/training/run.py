"""One training stage from the command line's point of view: check the inputs, build the
model, losses and data, resume or start, fit. `rpiae train` is a thin wrapper around it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rpiae.checkpoints import CheckpointError, load_encoder_weights, load_pixel_decoder_weights
from rpiae.config import PRESETS, RPiAEConfig, get_preset
from rpiae.imageio import ImageError
from rpiae.model import RPiAE
from rpiae.modules.pixel_decoder import init_linears
from rpiae.training.config import TrainConfig, load_train_config
from rpiae.training.data import ImageFolderDataset, load_eval_images
from rpiae.training.discriminator import Discriminator, load_dino_features
from rpiae.training.fit import fit, setup_distributed
from rpiae.training.lpips import load_lpips
from rpiae.training.schedule import steps_per_epoch
from rpiae.training.stages import FROZEN_COPY_STAGE
from rpiae.training.checkpoint import read_training_checkpoint
from rpiae.training.trainer import Trainer


# the model a new stage-1 run builds when no --preset is given
DEFAULT_PRESETS = {"rpiae": "rpiae-b", "ps-vae": "ps-vae"}


class TrainingError(ValueError):
    """Bad input to a training run (reported as one line, no traceback)."""


def _need_file(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"{what} not found: {p}")
    return p


def prepare_config(
    stage: int,
    config_path: str | Path | None,
    overrides: dict[str, Any] | None,
    lpips_weights: Sequence[str | Path],
    disc_weights: str | Path | None,
    no_lpips: bool,
    no_gan: bool,
    recipe: str = "rpiae",
) -> TrainConfig:
    """The stage's config, refusing to start without the loss networks it needs."""
    try:
        cfg = load_train_config(stage, config_path, overrides, recipe)
    except (ValueError, TypeError) as e:
        raise TrainingError(str(e)) from None
    if cfg.decoder_stage:
        if no_lpips:
            cfg.lpips_weight = 0.0
        elif cfg.lpips_weight > 0 and not lpips_weights:
            raise TrainingError(
                f"stage {stage} uses LPIPS: give --lpips-weights FILE (torchvision VGG16 features.N.* "
                "and the LPIPS heads lin{0..4}.model.1.weight, one file or two), or --no-lpips"
            )
        if no_gan:
            cfg.gan_weight = 0.0
        elif cfg.gan_weight > 0 and not disc_weights:
            raise TrainingError(
                f"stage {stage} uses the GAN loss: give --disc-weights FILE (DINO ViT-S/8, "
                "dino_deitsmall8_pretrain.pth), or --no-gan"
            )
    for p in lpips_weights if cfg.lpips_weight > 0 else ():
        _need_file(p, "LPIPS weights")
    if disc_weights and cfg.gan_weight > 0:
        _need_file(disc_weights, "discriminator weights")
    return cfg


def _check_inputs(stage: int, data, resume, val_data, out, restart: bool, recipe: str) -> None:
    if stage > 1 and resume is None:
        raise TrainingError(f"stage {stage} starts from stage {stage - 1}: give --resume runs/s{stage - 1}/last")
    if resume is not None and not Path(resume).exists():
        raise TrainingError(f"cannot resume: {resume} does not exist")
    if not Path(data).is_dir():
        raise TrainingError(f"training data folder not found: {data}")
    if val_data is not None and not Path(val_data).is_dir():
        raise TrainingError(f"held-out data folder not found: {val_data}")
    if restart and resume is None:
        raise TrainingError("--restart starts a stage anew from a checkpoint: give --resume RUN/last")
    if restart and stage == FROZEN_COPY_STAGE[recipe]:
        raise TrainingError(f"--restart: stage {stage} keeps a frozen copy of the encoder taken at its start; "
                            "a restart would take it from the trained encoder instead")
    if restart and Path(out).resolve() in Path(resume).resolve().parents:
        raise TrainingError(f"--restart writes a new run: --out must not be the run of --resume ({out})")
    if restart and (Path(out) / "last").exists():
        raise TrainingError(f"{out} already holds a run: continue it with --resume {Path(out) / 'last'} (no --restart)")


def _data(cfg: TrainConfig, data, val_data, world: int) -> tuple[ImageFolderDataset, torch.Tensor | None, int]:
    """(training set, held-out images or None, optimiser steps per epoch), checked before anything is built."""
    try:
        dataset = ImageFolderDataset(
            data, cfg.crop, cfg.resize_min, cfg.resize_max, cfg.hflip, cfg.seed, cfg.epoch_size, cfg.color_jitter,
            cfg.image_pipeline,
        )
        val_images = load_eval_images(val_data, cfg.val_images)[0] if val_data is not None else None
        spe = steps_per_epoch(cfg, len(dataset), world)
    except (ImageError, ValueError) as e:
        raise TrainingError(str(e)) from None
    if spe < 1:
        raise TrainingError(
            f"{len(dataset)} samples per epoch is less than one batch of {cfg.batch_size}: "
            "lower batch_size or raise epoch_size"
        )
    return dataset, val_images, spe


def _resumed_model(
    cfg: TrainConfig, stage: int, resume, preset, model_overrides, restart: bool = False
) -> tuple[RPiAE, dict | None]:
    """(model, the stage's own state to continue, or None when a new stage starts from the
    previous stage's weights, or with `restart` from the same stage's)."""
    try:
        ckpt = read_training_checkpoint(resume)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise TrainingError(f"cannot resume from {resume}: {e}") from None
    model = RPiAE(RPiAEConfig.from_dict(ckpt["config"]))
    if preset is not None and preset != model.config.name:
        warnings.warn(f"--preset {preset} ignored: the checkpoint's model is {model.config.name!r}", stacklevel=3)
    if model_overrides:
        warnings.warn("model config overrides ignored: the checkpoint carries its model config", stacklevel=3)
    if ckpt["stage"] > stage:
        raise TrainingError(f"{resume} is a stage {ckpt['stage']} checkpoint; it cannot start stage {stage}")
    if ckpt["stage"] == stage and not restart:
        return model, ckpt  # continue this stage exactly where it stopped
    # the previous stage's weights (or EMA); with `restart`, this stage's, under a new schedule
    model.load_state_dict(ckpt["ema" if cfg.start_from_ema else "model"])
    return model, None


def _new_model(recipe: str, preset, model_overrides, decoder_init: str = "torch") -> RPiAE:
    """A randomly initialised model of `preset` (default: the recipe's), with `model_overrides`;
    D's Linear layers initialised per `decoder_init` (`TrainConfig.decoder_init`; weights given
    with --init-decoder replace them afterwards)."""
    name = preset or DEFAULT_PRESETS[recipe]
    try:
        config = get_preset(name)
        if model_overrides:
            config = RPiAEConfig.from_dict({**config.to_dict(), "name": f"{name}-custom", **model_overrides})
    except (ValueError, TypeError) as e:
        raise TrainingError(str(e)) from None
    model = RPiAE(config)
    if decoder_init != "normal":  # the constructor's own init is "normal"
        init_linears(model.decoder, decoder_init)
    return model


def _initial_weights(model: RPiAE, init_encoder, init_decoder, stage: int, rank: int) -> None:
    try:
        if init_encoder:
            load_encoder_weights(model, _need_file(init_encoder, "encoder weights"))
        if init_decoder:
            load_pixel_decoder_weights(model, _need_file(init_decoder, "pixel decoder weights"))
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    if stage == 1 and not init_encoder and rank == 0:
        warnings.warn("stage I without --init-encoder: E (and its frozen copy) start from random weights", stacklevel=3)


def _loss_networks(cfg: TrainConfig, lpips_weights, disc_weights):
    """(LPIPS or None, discriminator or None) from local weight files."""
    try:
        lpips = load_lpips(lpips_weights) if cfg.decoder_stage and cfg.lpips_weight > 0 else None
        disc = None
        if cfg.decoder_stage and cfg.gan_weight > 0:
            disc = Discriminator(
                cfg.disc_width, cfg.disc_depth, cfg.disc_heads, cfg.disc_patch, cfg.disc_diffaug,
                cfg.disc_norm_group, cfg.disc_norm_eps, cfg.disc_sn_warmup,
            )
            load_dino_features(disc, disc_weights)
    except CheckpointError as e:
        raise TrainingError(str(e)) from None
    return lpips, disc


def run_training(
    stage: int,
    data: str | Path,
    out: str | Path,
    *,
    preset: str | None = None,
    init_encoder: str | Path | None = None,
    init_decoder: str | Path | None = None,
    resume: str | Path | None = None,
    config_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    lpips_weights: Sequence[str | Path] = (),
    disc_weights: str | Path | None = None,
    no_lpips: bool = False,
    no_gan: bool = False,
    val_data: str | Path | None = None,
    progress: bool = True,
    device: str | None = None,
    recipe: str = "rpiae",
    model_overrides: dict[str, Any] | None = None,
    restart: bool = False,
) -> dict[str, float]:
    """Train one stage of `recipe` ("rpiae": stages 1-3, "ps-vae": stages 1-2) on a model of
    the family of the same name. `model_overrides` changes model config fields of the preset
    a new run starts from (its name becomes "<preset>-custom" unless one is given).
    `restart` with a `resume` checkpoint of the same stage starts the stage anew from its
    weights (new optimiser, schedule and step count: a fine-tune) instead of continuing it."""
    cfg = prepare_config(stage, config_path, overrides, lpips_weights, disc_weights, no_lpips, no_gan, recipe)
    _check_inputs(stage, data, resume, val_data, out, restart, recipe)
    rank, world, dev = setup_distributed()
    dataset, val_images, spe = _data(cfg, data, val_data, world)
    if device is not None:
        dev = torch.device(device)
    torch.manual_seed(cfg.seed)  # the same initial weights (and pivot, EMA, heads) on every rank
    if resume is not None:
        model, state = _resumed_model(cfg, stage, resume, preset, model_overrides, restart)
    else:
        model, state = _new_model(recipe, preset, model_overrides, cfg.decoder_init), None
    if model.config.family != recipe:
        what = f"{resume}" if resume is not None else f"preset {model.config.name!r}"
        raise TrainingError(
            f"{what} is a {model.config.family} model; the {recipe} recipe trains {recipe} models "
            f"(presets: {', '.join(k for k, c in PRESETS.items() if c.family == recipe)})"
        )
    if state is None:
        _initial_weights(model, init_encoder, init_decoder, stage, rank)
    lpips, disc = _loss_networks(cfg, lpips_weights, disc_weights)
    trainer = Trainer(model, cfg, out, lpips=lpips, disc=disc, device=dev, rank=rank, world=world, steps_per_epoch=spe)
    if world > 1:
        torch.manual_seed(cfg.seed + 1 + rank)  # distinct noise and augmentation streams per rank
    if state is not None:
        try:
            trainer.load_state_dict(state)
        except (ValueError, RuntimeError, KeyError) as e:
            raise TrainingError(f"cannot resume from {resume}: {e}") from None
        del state
    try:
        return fit(trainer, dataset, val_images, progress=progress)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
