"""The training recipe (DESIGN.md §2) as one dataclass; defaults are the paper's.

A config file (JSON, or YAML when PyYAML is installed) overrides any field. Top-level keys
apply to every stage; a `stage1` / `stage2` / `stage3` section applies to that stage only:

    {"batch_size": 64, "stage2": {"epochs": 8}}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    stage: int = 1

    # schedule (an "epoch" is `epoch_size` samples; 0 = one pass over the data folder)
    epochs: int = 16
    batch_size: int = 256  # global batch (all ranks, all accumulation micro-steps)
    grad_accum: int = 1
    epoch_size: int = 0

    # optimiser: AdamW, cosine with linear warm-up from 0, EMA, no grad clipping
    lr: float = 2e-4
    min_lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_epochs: float = 1.0
    decay_epochs: float = 0.0  # epoch at which the cosine reaches min_lr; 0 = `epochs`
    ema_decay: float = 0.9978

    # data: short side to a random size in [resize_min, resize_max] (bicubic), random crop
    resize_min: int = 384
    resize_max: int = 384
    crop: int = 256
    hflip: bool = False

    # token noise sigma = tau * U(0, 1) on E's tokens (stages I and II)
    noise_tau: float = 0.8

    # losses
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    pivot_weight: float = 0.75  # stage I: w_piv = 0.75 (warm-up), then 0.75 * grad-norm ratio
    pivot_warmup_steps: int = 1000
    pivot_max: float = 1e5
    pivot_eps: float = 1e-4
    gan_weight: float = 0.75  # term = gan_weight * w_gan * G
    gan_max: float = 1e4
    gan_eps: float = 1e-6
    gan_start_epoch: float = 8.0
    disc_start_epoch: float = 6.0
    disc_lr: float = 2e-4
    feature_weight: float = 1.0  # stage II: MSE(VB-dec(sample), clean tokens)
    kl_weight: float = 1e-3

    # discriminator feature network (DINO v1 ViT-S/8); smaller only for tests
    disc_width: int = 384
    disc_depth: int = 12
    disc_heads: int = 6
    disc_patch: int = 8
    disc_diffaug: bool = True

    # bookkeeping
    seed: int = 0
    num_workers: int = 4
    log_every: int = 10
    sample_every: int = 1000  # steps; 0 = never (a grid is always written at the end)
    save_every: int = 1000  # steps; `last` is always written at the end
    val_every: int = 0  # steps; 0 = at the end of every epoch
    val_images: int = 64  # at most this many held-out images are evaluated
    max_steps: int = 0  # stop early after this many optimiser steps (0 = full schedule)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.epochs < 1:
            raise ValueError("batch_size, grad_accum and epochs must be >= 1")
        if self.resize_min < self.crop or self.resize_max < self.resize_min:
            raise ValueError("need crop <= resize_min <= resize_max")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config fields: {', '.join(unknown)}")
        return cls(**d)


# The paper's per-stage values (DESIGN.md §2); everything else is shared.
PAPER_STAGES: dict[int, dict[str, Any]] = {
    1: dict(epochs=16, batch_size=256, noise_tau=0.8, l1_weight=1.0, lpips_weight=1.0),
    2: dict(epochs=32, batch_size=512, noise_tau=0.8, l1_weight=0.05, lpips_weight=0.0, gan_weight=0.0),
    3: dict(epochs=16, batch_size=256, noise_tau=0.0, l1_weight=1.0, lpips_weight=1.0),
}


def _field_type(name: str) -> type:
    t = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[name]
    return {"int": int, "float": float, "bool": bool}.get(str(t), str)


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` from the command line, typed after the field."""
    if "=" not in item:
        raise ValueError(f"expected key=value, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip().replace("-", "_")
    if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise ValueError(f"unknown training config field {key!r}")
    if key == "betas":
        return key, tuple(float(v) for v in value.split(","))
    kind = _field_type(key)
    if kind is bool:
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ValueError(f"{key}: expected a boolean, got {value!r}")
        return key, value.lower() in ("1", "true", "yes")
    return key, kind(value)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training config not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML configs need PyYAML (pip install pyyaml); or use JSON") from None
        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    return data


def load_train_config(
    stage: int, path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """Paper defaults for `stage` <- file (shared keys, then its `stageN` section) <- overrides."""
    values: dict[str, Any] = dict(PAPER_STAGES[stage])
    if path is not None:
        data = read_config_file(path)
        sections = {f"stage{i}" for i in (1, 2, 3)}
        values.update({k: v for k, v in data.items() if k not in sections})
        values.update(data.get(f"stage{stage}") or {})
    values.update(overrides or {})
    values["stage"] = stage
    return TrainConfig.from_dict(values)
