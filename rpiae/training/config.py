"""The training recipes as one dataclass.

Two recipes, one per model family:

- `rpiae` (stages 1-3): defaults follow the RPiAE authors' training code (360CVGroup/RPiAE:
  `src/train_stage1_rpiae_s1.py`, `src/train_stage1_rpiae_s23.py` and the stage 1/2/3 yaml
  configs), which produced the released weights; where the paper (arXiv 2603.19206)
  describes something else, a named field switches to the paper's version, and where this
  project did something else before, a named field keeps that as an option.
- `ps-vae` (stages 1-2): S-VAE, then PS-VAE (arXiv 2512.17909). No code is public; the
  values the paper leaves open are this project's choices, each a field.

The tables are in `docs/TRAINING.md`. A config file (JSON, or YAML when PyYAML is
installed) overrides any field. Top-level keys apply to every stage; a `stage1` / `stage2` /
`stage3` section applies to that stage only:

    {"batch_size": 64, "stage2": {"epochs": 8}}
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


# the stages of each recipe; a recipe trains the model family of the same name
RECIPES: dict[str, tuple[int, ...]] = {"rpiae": (1, 2, 3), "ps-vae": (1, 2)}
IMAGE_PIPELINES = ("pil", "torch")  # `image_pipeline`: the authors', ours before
DECODER_INITS = ("torch", "normal")  # `decoder_init`: the authors', ours before


@dataclass
class TrainConfig:
    stage: int = 1
    recipe: str = "rpiae"

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
    # epoch at which the cosine reaches min_lr, flat after; the authors' configs use 16 for
    # every stage (stage II, 32 epochs, spends its second half at the floor); 0 = `epochs`
    decay_epochs: float = 16.0
    ema_decay: float = 0.9978
    # a new stage starts from the previous stage's raw weights (the authors' `ckpt["model"]`);
    # True starts it from the previous stage's EMA weights instead
    start_from_ema: bool = False

    # data: short side to a random size in [resize_min, resize_max] (bicubic), random crop
    # "pil" (the authors' ImageFolder + torchvision Resize on PIL images): the file as 8-bit RGB
    # without EXIF rotation, PIL's bicubic, the long side truncated (int(size * long / short));
    # "torch" (ours before): EXIF rotation, float pixels, torch's bicubic, the long side rounded
    image_pipeline: str = "pil"
    resize_min: int = 384
    resize_max: int = 384
    crop: int = 256
    hflip: bool = False
    color_jitter: float = 0.0  # brightness/contrast/saturation factors in [1 - s, 1 + s]; 0 = off

    # token noise sigma = tau * U(0, 1) on E's tokens (stages I and II)
    noise_tau: float = 0.8
    # stage III with noise_tau > 0: the noise goes on E's tokens before the bridge (False, the
    # authors' `RPiAE_VB.encode`, which noises E's tokens in every training stage); True puts it
    # on the bridge-decoded tokens D reads (ours before)
    noise_after_bridge: bool = False
    # D's layers when a new run starts without --init-decoder: "torch" keeps PyTorch's default
    # Linear init (kaiming-uniform weights, uniform biases; the authors' `GeneralDecoder` applies
    # no init of its own); "normal" draws normal(0.02) weights and zero biases (HF ViT-MAE; ours before)
    decoder_init: str = "torch"

    # losses
    l1_weight: float = 1.0
    lpips_weight: float = 1.0
    # not in the authors' recipe (0 = off): L1 between the image gradients (neighbouring-pixel
    # differences) of reconstruction and input, stages I and III; a stand-in that penalises
    # patch seams and blur where no LPIPS weights are available
    grad_weight: float = 0.0
    # not in the authors' recipe (0 = off): the squared difference between the signed steps of
    # reconstruction and input within 3 pixels of the decoder's patch borders
    # (`losses.patch_seam_loss`): a seam spread over the band costs less than a sharp one
    seam_weight: float = 0.0
    pivot_weight: float = 0.75  # stage I: w_piv = 0.75 (warm-up), then 0.75 * grad-norm ratio
    pivot_warmup_steps: int = 1000
    pivot_max: float = 1e5
    pivot_eps: float = 1e-4
    gan_weight: float = 0.75  # term = gan_weight * w_gan * G
    gan_max: float = 1e4
    gan_eps: float = 1e-6
    gan_start_epoch: float = 8.0
    disc_start_epoch: float = 6.0
    # the discriminator's own schedule, stepped only on discriminator updates: linear warm-up
    # from 0 over `disc_warmup_epochs` epochs' worth of its updates, cosine to `disc_min_lr`
    # after `disc_decay_epochs` epochs' worth (so it starts at `disc_start_epoch` and, with the
    # default 16-epoch stages, ends near 8.2e-5)
    disc_lr: float = 2e-4
    disc_min_lr: float = 2e-5
    disc_warmup_epochs: float = 1.0
    disc_decay_epochs: float = 16.0
    # the discriminator's AdamW: its own betas and weight decay (the authors' `gan.disc.optimizer`,
    # equal to the generator's values in their configs); `disc_optim_tied` uses the generator's
    # `betas` and `weight_decay` instead (ours before)
    disc_betas: tuple[float, float] = (0.9, 0.95)
    disc_weight_decay: float = 0.0
    disc_optim_tied: bool = False
    # discriminator step: fakes from a fresh no-noise forward of the *updated* model in eval
    # mode (the authors); False reuses the generator step's reconstruction of noised tokens
    disc_fresh_fakes: bool = True
    # discriminator step: DiffAug draws for the fake batch, then the real one, and the heads see
    # fake then real (the authors' `discriminator(fake_input, real_input)`); False: real batch
    # first, augmented and classified, then the fake (ours before)
    disc_fake_first: bool = True
    # generator step: the discriminator sees the raw reconstruction (the authors); True clamps
    # and rounds it to 8 bits first (straight-through)
    gen_fake_quantize: bool = False
    feature_weight: float = 1.0  # stage II: MSE(VB-dec(z), clean tokens); PS-VAE: of its target tokens
    # PS-VAE: weight of 1 - cosine(VB-dec(z), target) per token, averaged (0 = off; RPiAE has none)
    feature_cos_weight: float = 0.0
    kl_weight: float = 1e-3
    # PS-VAE stage 1 (S-VAE) also trains D, on the semantic decoder's output with its gradient
    # stopped (pixel losses never reach the semantic autoencoder); False leaves D untouched
    svae_pixel_decoder: bool = True
    # stage II decodes the posterior mean (the authors' training step); True samples it (the paper)
    sample_posterior: bool = False
    # D's sin-cos pos-embed trains in stages I and III (the authors' `decoder.requires_grad_(True)`);
    # False keeps it fixed, as the paper describes it
    train_decoder_pos_embed: bool = True

    # discriminator feature network (DINO v1 ViT-S/8); smaller only for tests
    disc_width: int = 384
    disc_depth: int = 12
    disc_heads: int = 6
    disc_patch: int = 8
    disc_diffaug: bool = True
    disc_norm_group: int = 1  # heads' BatchNormLocal: statistics per group of this many samples
    disc_norm_eps: float = 1e-6
    # heads' spectral norm: u and v drawn at random, no warm-up, each training forward updates v
    # then u (the authors' `SpectralNorm.apply`); True: torch.nn.utils.parametrizations.spectral_norm,
    # 15 warm-up iterations at construction, u then v (ours before)
    disc_sn_warmup: bool = False

    # PS-VAE stage 2 only (on in that stage's defaults, ignored elsewhere): E unfreezes
    # progressively, from its last block down (our reading of a summary of the PS-VAE paper,
    # which says "progressively unfrozen"; the schedule is ours): E's blocks are split into
    # `unfreeze_groups` equal groups from the top; the top group (and anything after the blocks,
    # such as a final norm) trains from the first step, one more group joins every
    # `unfreeze_every_epochs` epochs, the embeddings with the bottom group. False: all of E
    # trains from the first step (ours before)
    progressive_unfreeze: bool = False
    unfreeze_groups: int = 4
    unfreeze_every_epochs: float = 2.0

    # bookkeeping
    seed: int = 0
    # deterministic CUDA kernels (torch.use_deterministic_algorithms, cuDNN deterministic, a fixed
    # cuBLAS workspace; no cuDNN autotuning): repeatable GPU runs at some speed cost. The backward
    # of F.interpolate (stage I pos-embed resize, the discriminator's input resize) has no
    # deterministic CUDA kernel and stays atomic (PyTorch warns once). CPU runs are repeatable
    # without it.
    deterministic: bool = False
    num_workers: int = 4
    log_every: int = 10
    sample_every: int = 1000  # steps; 0 = never (a grid is always written at the end)
    save_every: int = 1000  # steps; `last` is always written at the end
    val_every: int = 0  # steps; 0 = at the end of every epoch
    val_images: int = 64  # at most this many held-out images are evaluated
    max_steps: int = 0  # stop early after this many optimiser steps (0 = full schedule)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of: {', '.join(RECIPES)}")
        stages = RECIPES[self.recipe]
        if self.stage not in stages:
            raise ValueError(f"the {self.recipe} recipe has stages {', '.join(map(str, stages))}, got {self.stage}")
        if self.resize_min < self.crop or self.resize_max < self.resize_min:
            raise ValueError(f"need crop <= resize_min <= resize_max, got crop {self.crop}, "
                             f"resize_min {self.resize_min}, resize_max {self.resize_max}")
        if self.disc_width % self.disc_heads:
            raise ValueError(f"disc_width ({self.disc_width}) must be a multiple of disc_heads ({self.disc_heads})")

    @property
    def decoder_stage(self) -> bool:
        """Whether this stage trains the pixel decoder D on pixel losses, which is where the
        LPIPS and GAN terms apply: RPiAE I and III, PS-VAE II (and I, with `svae_pixel_decoder`)."""
        if self.recipe == "ps-vae":
            return self.stage == 2 or self.svae_pixel_decoder
        return self.stage in (1, 3)

    @property
    def unfreezes_progressively(self) -> bool:
        """Whether E unfreezes block group by block group: PS-VAE stage 2 with `progressive_unfreeze`."""
        return self.recipe == "ps-vae" and self.stage == 2 and self.progressive_unfreeze

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["disc_betas"] = list(self.betas), list(self.disc_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config fields: {', '.join(unknown)}")
        return cls(**d)


# fields a resumed run may take from the command line instead of its checkpoint: they change
# when it stops, what it logs or writes and how it loads data, not what it computes
RESUME_MAY_CHANGE = (
    "max_steps", "num_workers", "log_every", "sample_every", "save_every", "val_every", "val_images", "deterministic",
)


def _kind(name: str) -> str:
    return str(_FIELD_TYPES[name])


# the range of each numeric field: (lowest, highest, whether the lowest itself is allowed)
_AT_LEAST_1 = (1, None, True)
_AT_LEAST_0 = (0, None, True)
_POSITIVE = (0, None, False)
_RANGES: dict[str, tuple[float, float | None, bool]] = {
    "epochs": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "grad_accum": _AT_LEAST_1, "epoch_size": _AT_LEAST_0,
    "lr": _POSITIVE, "min_lr": _AT_LEAST_0, "weight_decay": _AT_LEAST_0,
    "warmup_epochs": _AT_LEAST_0, "decay_epochs": _AT_LEAST_0, "ema_decay": (0, 1, True),
    "resize_min": _AT_LEAST_1, "resize_max": _AT_LEAST_1, "crop": _AT_LEAST_1, "color_jitter": (0, 1, True),
    "noise_tau": _AT_LEAST_0,
    "l1_weight": _AT_LEAST_0, "lpips_weight": _AT_LEAST_0, "grad_weight": _AT_LEAST_0, "seam_weight": _AT_LEAST_0,
    "pivot_weight": _AT_LEAST_0, "pivot_warmup_steps": _AT_LEAST_0, "pivot_max": _POSITIVE, "pivot_eps": _POSITIVE,
    "gan_weight": _AT_LEAST_0, "gan_max": _POSITIVE, "gan_eps": _POSITIVE,
    "gan_start_epoch": _AT_LEAST_0, "disc_start_epoch": _AT_LEAST_0,
    "disc_lr": _POSITIVE, "disc_min_lr": _AT_LEAST_0, "disc_warmup_epochs": _AT_LEAST_0,
    "disc_decay_epochs": _AT_LEAST_0, "disc_weight_decay": _AT_LEAST_0,
    "feature_weight": _AT_LEAST_0, "feature_cos_weight": _AT_LEAST_0, "kl_weight": _AT_LEAST_0,
    "disc_width": _AT_LEAST_1, "disc_depth": _AT_LEAST_1, "disc_heads": _AT_LEAST_1, "disc_patch": _AT_LEAST_1,
    "disc_norm_group": _AT_LEAST_1, "disc_norm_eps": _POSITIVE,
    "unfreeze_groups": _AT_LEAST_1, "unfreeze_every_epochs": _POSITIVE,
    "seed": _AT_LEAST_0, "num_workers": _AT_LEAST_0, "log_every": _AT_LEAST_1, "sample_every": _AT_LEAST_0,
    "save_every": _AT_LEAST_0, "val_every": _AT_LEAST_0, "val_images": _AT_LEAST_0, "max_steps": _AT_LEAST_0,
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": tuple(RECIPES), "image_pipeline": IMAGE_PIPELINES, "decoder_init": DECODER_INITS,
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_field(name: str, value: Any) -> Any:
    """`value` for training config field `name`, type- and range-checked (ints stay ints, a
    whole float such as 2.0 for an int field is taken, an int for a float field becomes a
    float, `betas` becomes a tuple of two floats); a one-line ValueError naming the field."""
    kind = _kind(name)
    if kind.startswith("tuple"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != 2 \
                or not all(_is_number(v) for v in value):
            raise ValueError(f"{name}: expected two numbers (e.g. 0.9,0.95), got {value!r}")
        value = tuple(float(v) for v in value)
        if not all(0.0 <= v < 1.0 for v in value):
            raise ValueError(f"{name}: each must be in [0, 1), got {', '.join(map(str, value))}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string, got {value!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ValueError(f"{name}: expected one of {', '.join(_CHOICES[name])}, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
    else:  # float
        if not _is_number(value):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name}: expected a finite number, got {value}")
    low, high, inclusive = _RANGES.get(name, (None, None, True))
    if low is not None and (value < low or (value == low and not inclusive)):
        raise ValueError(f"{name}: must be {'>=' if inclusive else '>'} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: must be <= {high}, got {value}")
    return value


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


# Per-stage values (the authors' stage 1/2/3 configs); everything else is shared.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: dict(epochs=16, batch_size=256, noise_tau=0.8, l1_weight=1.0, lpips_weight=1.0),
    2: dict(epochs=32, batch_size=512, noise_tau=0.8, l1_weight=0.05, lpips_weight=0.0, gan_weight=0.0),
    3: dict(epochs=16, batch_size=256, noise_tau=0.0, l1_weight=1.0, lpips_weight=1.0),
}

# PS-VAE: stage 1 = S-VAE (E frozen; semantic encoder/decoder on feature reconstruction + KL,
# D on the detached reconstruction), stage 2 = PS-VAE (everything trains, E progressively
# from its last block down; pixel losses + feature reconstruction of the frozen E's tokens +
# KL). Values the paper leaves open are ours (docs/TRAINING.md, "PS-VAE"); the fields not
# named here keep the shared defaults.
_PSVAE_SHARED: dict[str, Any] = dict(
    epochs=16, batch_size=256, decay_epochs=0.0, noise_tau=0.0, sample_posterior=True,
    feature_weight=1.0, feature_cos_weight=1.0, kl_weight=1e-3, l1_weight=1.0, lpips_weight=1.0,
    train_decoder_pos_embed=False,
)
PSVAE_STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: dict(_PSVAE_SHARED, gan_weight=0.0),
    2: dict(_PSVAE_SHARED, gan_weight=0.75, progressive_unfreeze=True),
}
RECIPE_DEFAULTS: dict[str, dict[int, dict[str, Any]]] = {"rpiae": STAGE_DEFAULTS, "ps-vae": PSVAE_STAGE_DEFAULTS}


def parse_override(item: str, config_cls: type = TrainConfig, what: str = "training config") -> tuple[str, Any]:
    """`key=value` from the command line, typed after the field of `config_cls` (a tuple field
    takes comma-separated floats)."""
    if "=" not in item:
        raise ValueError(f"expected key=value, got {item!r}")
    key, value = item.split("=", 1)
    key = key.strip().replace("-", "_")
    types = {f.name: str(f.type) for f in dataclasses.fields(config_cls)}
    if key not in types:
        raise ValueError(f"unknown {what} field {key!r}")
    kind = types[key]
    try:
        if kind.startswith("tuple"):
            return key, tuple(float(v) for v in value.split(","))
        if kind == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return key, value.lower() in ("1", "true", "yes")
        return key, {"int": int, "float": float}.get(kind, str)(value)
    except ValueError:
        what_kind = {"bool": "a boolean", "int": "an integer", "float": "a number"}.get(
            kind, "comma-separated numbers" if kind.startswith("tuple") else kind)
        raise ValueError(f"{key}: expected {what_kind}, got {value!r}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A training config file's mapping (JSON, or YAML with PyYAML); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"training config not found: {path}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError("YAML configs need PyYAML (pip install pyyaml); or use JSON") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields")
    return data


def config_file_values(path: str | Path, stage: int) -> dict[str, Any]:
    """The fields a config file sets for `stage` (shared keys, then its `stageN` section),
    each checked; errors name the file and the field."""
    data = read_config_file(path)
    sections = {f"stage{i}" for i in (1, 2, 3)}
    for name in sorted(sections & set(data)):
        if data[name] is not None and not isinstance(data[name], dict):
            raise ValueError(f"{path}: {name}: expected a mapping of config fields, got {data[name]!r}")
    values = {k: v for k, v in data.items() if k not in sections}
    values.update(data.get(f"stage{stage}") or {})
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise ValueError(f"{path}: unknown training config fields: {', '.join(map(str, unknown))}")
    try:
        return {k: check_field(k, v) for k, v in values.items()}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_train_config(
    stage: int, path: str | Path | None = None, overrides: dict[str, Any] | None = None, recipe: str = "rpiae"
) -> TrainConfig:
    """The recipe's defaults for `stage` <- file (shared keys, then its `stageN` section) <- overrides."""
    values: dict[str, Any] = dict(RECIPE_DEFAULTS.get(recipe, {}).get(stage, {}))  # TrainConfig checks both
    if path is not None:
        from_file = config_file_values(path, stage)
        for key, given in (("stage", stage), ("recipe", recipe)):
            if key in from_file and from_file[key] != given:
                raise ValueError(f"{path}: {key} is {from_file[key]!r}, but this run's --{key} is {given!r}")
        values.update(from_file)
    values.update(overrides or {})
    values["stage"], values["recipe"] = stage, recipe
    return TrainConfig.from_dict(values)
