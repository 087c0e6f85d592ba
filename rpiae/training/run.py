"""One training stage from the command line's point of view: check the inputs, build the
model, losses and data, resume or start, fit. `rpiae train` is a thin wrapper around it."""

from __future__ import annotations

import dataclasses
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
from rpiae.fileio import recover_replaced
from rpiae.training.config import RESUME_MAY_CHANGE, TrainConfig, check_field, config_file_values, load_train_config
from rpiae.training.data import ImageFolderDataset, load_eval_images
from rpiae.training.discriminator import Discriminator, load_dino_features
from rpiae.training.fit import fit, setup_distributed
from rpiae.training.lpips import load_lpips
from rpiae.training.schedule import steps_per_epoch
from rpiae.training.stages import FROZEN_COPY_STAGE
from rpiae.training.checkpoint import CHECKPOINT_NAME, checkpoint_file, read_training_checkpoint
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
    cfg = _cli_config(stage, config_path, overrides, recipe)
    _loss_toggles(cfg, no_lpips, no_gan)
    _need_loss_networks(cfg, lpips_weights, disc_weights)
    return cfg


def _cli_config(stage: int, config_path, overrides, recipe: str) -> TrainConfig:
    try:
        return load_train_config(stage, config_path, overrides, recipe)
    except (ValueError, TypeError) as e:
        raise TrainingError(str(e)) from None


def _loss_toggles(cfg: TrainConfig, no_lpips: bool, no_gan: bool) -> None:
    """--no-lpips / --no-gan: the weight of that term set to 0 (stages that train D)."""
    if cfg.decoder_stage:
        if no_lpips:
            cfg.lpips_weight = 0.0
        if no_gan:
            cfg.gan_weight = 0.0


def _need_loss_networks(cfg: TrainConfig, lpips_weights, disc_weights, resumed: bool = False) -> None:
    what = "the run being resumed" if resumed else f"stage {cfg.stage}"
    if cfg.decoder_stage:
        if cfg.lpips_weight > 0 and not lpips_weights:
            raise TrainingError(
                f"{what} uses LPIPS: give --lpips-weights FILE (torchvision VGG16 features.N.* "
                "and the LPIPS heads lin{0..4}.model.1.weight, one file or two)" + ("" if resumed else ", or --no-lpips")
            )
        if cfg.gan_weight > 0 and not disc_weights:
            raise TrainingError(
                f"{what} uses the GAN loss: give --disc-weights FILE (DINO ViT-S/8, "
                "dino_deitsmall8_pretrain.pth)" + ("" if resumed else ", or --no-gan")
            )
    for p in lpips_weights if cfg.decoder_stage and cfg.lpips_weight > 0 else ():
        _need_file(p, "LPIPS weights")
    if disc_weights and cfg.decoder_stage and cfg.gan_weight > 0:
        _need_file(disc_weights, "discriminator weights")


def _requested_values(stage: int, config_path, overrides, no_lpips: bool, no_gan: bool,
                      cfg: TrainConfig) -> dict[str, Any]:
    """The training config fields this command sets explicitly (--config, --set, --no-lpips,
    --no-gan), checked: what a resumed run compares with the values it was started with."""
    values: dict[str, Any] = {}
    try:
        if config_path is not None:
            values.update(config_file_values(config_path, stage))
        values.update({k: check_field(k, v) for k, v in (overrides or {}).items()})
    except ValueError as e:
        raise TrainingError(str(e)) from None
    values.pop("stage", None)
    values.pop("recipe", None)
    if cfg.decoder_stage:
        if no_lpips:
            values["lpips_weight"] = 0.0
        if no_gan:
            values["gan_weight"] = 0.0
    return values


def _resumed_config(ckpt: dict, requested: dict[str, Any], cli_cfg: TrainConfig, resume, no_lpips: bool,
                    no_gan: bool) -> TrainConfig:
    """Continuing a stage: the training config it was started with (saved in its checkpoint),
    with only the fields that do not change what is computed (`RESUME_MAY_CHANGE`) taken from
    this command; any other field this command sets to another value is refused."""
    saved = ckpt.get("train_config")
    if not isinstance(saved, dict):  # a checkpoint from before the config was saved
        return cli_cfg
    try:
        base = TrainConfig.from_dict({**saved, "stage": cli_cfg.stage, "recipe": cli_cfg.recipe})
    except (ValueError, TypeError) as e:
        raise TrainingError(f"cannot resume from {resume}: its saved training config: {e}") from None
    changed = {k: v for k, v in requested.items() if getattr(base, k) != v}
    refused = sorted(k for k in changed if k not in RESUME_MAY_CHANGE)
    if refused:
        flags = {"lpips_weight": no_lpips and "--no-lpips", "gan_weight": no_gan and "--no-gan"}
        parts = [f"{k} ({getattr(base, k)!r} -> {changed[k]!r}"
                 + (f", from {flags[k]})" if flags.get(k) and changed[k] == 0 else ")") for k in refused]
        restart = "" if cli_cfg.stage == FROZEN_COPY_STAGE[cli_cfg.recipe] else \
            ", or start the stage anew from it with --restart and a new --out"
        raise TrainingError(
            f"resuming {resume} continues its run with the training config it was started with; this command "
            f"changes {', '.join(parts)}: drop those settings{restart} (on resume only "
            f"{', '.join(RESUME_MAY_CHANGE)} may change)"
        )
    try:
        return dataclasses.replace(base, **changed) if changed else base
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _continues(out, resume) -> bool:
    """Whether `resume` is `out`'s own checkpoint (`OUT/last` or `OUT/last/checkpoint.pt`)."""
    if resume is None:
        return False
    last = (Path(out) / "last").resolve()
    return Path(resume).resolve() in (last, last / CHECKPOINT_NAME)


def _check_device(device: str | None) -> torch.device | None:
    """--device as a torch device, refused in one line (before anything is written) when this
    machine does not have it; the same words as the torch backend's (`rpiae encode -d cuda`)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise TrainingError(f"--device: unknown device {device!r} (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("train: CUDA was asked for but torch.cuda.is_available() is False")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainingError(f"train: {device} does not exist ({torch.cuda.device_count()} GPU(s))")
    elif dev.type != "cpu":
        raise TrainingError(f"--device: unknown device {device!r} (cpu, cuda, cuda:N)")
    return dev


def _check_inputs(stage: int, data, resume, val_data, out, restart: bool, recipe: str) -> None:
    if stage > 1 and resume is None:
        raise TrainingError(f"stage {stage} starts from stage {stage - 1}: give --resume runs/s{stage - 1}/last")
    if resume is not None:
        checkpoint_file(resume)  # puts back a `last` that a killed checkpoint write left moved aside
        if not Path(resume).exists():
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
    last = Path(out) / "last"
    recover_replaced(last)
    if restart and last.exists():
        raise TrainingError(f"{out} already holds a run: continue it with --resume {last} (no --restart)")
    if last.exists() and not _continues(out, resume):
        raise TrainingError(
            f"{out} already holds a run ({last}): give a new --out, continue that run with --resume {last}, "
            f"or remove {out} to start over"
        )
    if Path(out).exists() and not Path(out).is_dir():
        raise TrainingError(f"--out {out} is a file, not a run folder")


def _check_stage_order(ckpt_stage: int, stage: int, resume, out, restart: bool) -> None:
    """A stage continues (or with --restart re-runs) its own checkpoint, or starts from the
    previous stage's; and a new stage never writes into the run folder it starts from."""
    if ckpt_stage not in (stage, stage - 1):
        first = "" if stage == 1 else f"starts from a stage {stage - 1} checkpoint (runs/s{stage - 1}/last) or "
        raise TrainingError(
            f"{resume} is a stage {ckpt_stage} checkpoint; stage {stage} {first}continues its own"
        )
    if ckpt_stage != stage and _continues(out, resume):
        raise TrainingError(
            f"{out} holds the stage {ckpt_stage} run that stage {stage} starts from: give stage {stage} "
            f"a new --out (e.g. runs/s{stage})"
        )


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


def _read_checkpoint(resume) -> dict:
    try:
        ckpt = read_training_checkpoint(resume)
        RPiAEConfig.from_dict(ckpt["config"])
        int(ckpt["stage"])
    except (FileNotFoundError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise TrainingError(f"cannot resume from {resume}: {e}") from None
    return ckpt


def _resumed_model(
    cfg: TrainConfig, stage: int, ckpt: dict, preset, model_overrides, restart: bool = False
) -> tuple[RPiAE, dict | None]:
    """(model, the stage's own state to continue, or None when a new stage starts from the
    previous stage's weights, or with `restart` from the same stage's)."""
    model = RPiAE(RPiAEConfig.from_dict(ckpt["config"]))
    if preset is not None and preset != model.config.name:
        warnings.warn(f"--preset {preset} ignored: the checkpoint's model is {model.config.name!r}", stacklevel=3)
    if model_overrides:
        warnings.warn("model config overrides ignored: the checkpoint carries its model config", stacklevel=3)
    if ckpt["stage"] == stage and not restart:
        return model, ckpt  # continue this stage exactly where it stopped
    # the previous stage's weights (or EMA); with `restart`, this stage's, under a new schedule
    model.load_state_dict(ckpt["ema" if cfg.start_from_ema else "model"])
    return model, None


def _new_config(recipe: str, preset, model_overrides) -> RPiAEConfig:
    """The model config of a new run: `preset` (default: the recipe's) with `model_overrides`."""
    name = preset or DEFAULT_PRESETS[recipe]
    try:
        config = get_preset(name)
        if model_overrides:
            config = RPiAEConfig.from_dict({**config.to_dict(), "name": f"{name}-custom", **model_overrides})
    except (ValueError, TypeError) as e:
        raise TrainingError(str(e)) from None
    return config


def _new_model(recipe: str, preset, model_overrides, decoder_init: str = "torch") -> RPiAE:
    """A randomly initialised model of `preset` (default: the recipe's), with `model_overrides`;
    D's Linear layers initialised per `decoder_init` (`TrainConfig.decoder_init`; weights given
    with --init-decoder replace them afterwards)."""
    model = RPiAE(_new_config(recipe, preset, model_overrides))
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
    cfg = _cli_config(stage, config_path, overrides, recipe)
    _loss_toggles(cfg, no_lpips, no_gan)
    requested = _requested_values(stage, config_path, overrides, no_lpips, no_gan, cfg)
    _check_inputs(stage, data, resume, val_data, out, restart, recipe)
    asked_device = _check_device(device)
    ckpt = None
    if resume is not None:
        ckpt = _read_checkpoint(resume)
        _check_stage_order(int(ckpt["stage"]), stage, resume, out, restart)
        if int(ckpt["stage"]) == stage and not restart:
            cfg = _resumed_config(ckpt, requested, cfg, resume, no_lpips, no_gan)
        model_config = RPiAEConfig.from_dict(ckpt["config"])
    else:
        model_config = _new_config(recipe, preset, model_overrides)
    _need_loss_networks(cfg, lpips_weights, disc_weights,
                        resumed=ckpt is not None and int(ckpt["stage"]) == stage and not restart)
    if model_config.family != recipe:
        what = f"{resume}" if resume is not None else f"preset {model_config.name!r}"
        raise TrainingError(
            f"{what} is a {model_config.family} model; the {recipe} recipe trains {recipe} models "
            f"(presets: {', '.join(k for k, c in PRESETS.items() if c.family == recipe)})"
        )
    if cfg.crop != model_config.image_size:
        raise TrainingError(
            f"crop: the training crop must be the model's image_size ({model_config.image_size}), got {cfg.crop}"
        )
    rank, world, dev = setup_distributed()
    dataset, val_images, spe = _data(cfg, data, val_data, world)
    if asked_device is not None:
        dev = asked_device
    torch.manual_seed(cfg.seed)  # the same initial weights (and pivot, EMA, heads) on every rank
    if ckpt is not None:
        model, state = _resumed_model(cfg, stage, ckpt, preset, model_overrides, restart)
        del ckpt
    else:
        model, state = _new_model(recipe, preset, model_overrides, cfg.decoder_init), None
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
