"""How a stage's steps are counted and paced: micro-batches per rank, optimiser steps per epoch,
and the learning-rate factors (linear warm-up, cosine decay to a floor) of the generator and
the discriminator."""

from __future__ import annotations

import math

from rpiae.training.config import TrainConfig


def micro_batch_size(cfg: TrainConfig, world: int = 1) -> int:
    micro, rest = divmod(cfg.batch_size, world * cfg.grad_accum)
    if micro < 1 or rest:
        raise ValueError(
            f"batch_size {cfg.batch_size} is not divisible by ranks x grad_accum = {world} x {cfg.grad_accum}"
        )
    return micro


def steps_per_epoch(cfg: TrainConfig, num_samples: int, world: int = 1) -> int:
    micro = micro_batch_size(cfg, world)
    return num_samples // (micro * world) // cfg.grad_accum


def cosine_schedule(warmup_steps: float, decay_steps: float, floor: float):
    """LR factor per step: linear warm-up from 0 over `warmup_steps`, cosine from 1 down to
    `floor` at `decay_steps`, flat after (the authors' `build_scheduler`, `warmup_from_zero`)."""
    warm = int(warmup_steps)
    end = max(int(decay_steps), warm)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if step >= end:
            return floor
        t = (step - warm) / max(end - warm, 1)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """The generator's LR factor by optimiser step."""
    decay = cfg.decay_epochs or cfg.epochs
    return cosine_schedule(cfg.warmup_epochs * steps_per_epoch, decay * steps_per_epoch, cfg.min_lr / cfg.lr)


def disc_lr_lambda(cfg: TrainConfig, steps_per_epoch: int):
    """The discriminator's LR factor by *discriminator* update (its schedule starts with it)."""
    return cosine_schedule(
        cfg.disc_warmup_epochs * steps_per_epoch, cfg.disc_decay_epochs * steps_per_epoch, cfg.disc_min_lr / cfg.disc_lr
    )
