"""Model configuration: the single source of truth for sizes and I/O conventions.

The config travels with every artefact the project writes (safetensors metadata, ONNX
metadata, export manifests), so nothing downstream re-declares a size or a normalisation.

Two model families share one model class and one set of modules: RPiAE (arXiv 2603.19206)
and PS-VAE (arXiv 2512.17909), both a representation encoder, a KL-regularised token
autoencoder and a pixel decoder. `family` records which one a config is (and so which
training recipe it belongs to); the structural differences are sizes and the knobs below,
whose defaults are RPiAE's, so configs written before they existed load unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

FAMILIES = ("rpiae", "ps-vae")
ENCODER_TYPES = ("dinov2", "siglip2")


LATENT_NORM_EPS = 1e-5  # the authors' eps of the latent normalisation (z - mean) / sqrt(var + eps)


# the least value of each whole-number field (sizes, depths and heads; 0 where the model allows none)
_AT_LEAST = {
    "image_size": 1, "encoder_input_size": 1, "encoder_patch_size": 1, "encoder_hidden_size": 1, "encoder_depth": 1,
    "encoder_heads": 1, "encoder_mlp_size": 1, "encoder_registers": 0, "encoder_pos_grid": 1, "latent_channels": 1,
    "bridge_heads": 1, "bridge_encoder_depth": 0, "bridge_encoder_mlp_size": 1, "bridge_decoder_depth": 0,
    "bridge_decoder_mlp_size": 1, "decoder_hidden_size": 1, "decoder_depth": 1, "decoder_heads": 1,
    "decoder_mlp_size": 1, "decoder_patch_size": 1,
}
_POSITIVE_FLOATS = ("encoder_ln_eps", "bridge_ln_eps", "decoder_ln_eps", "latent_norm_eps")


@dataclass(frozen=True)
class RPiAEConfig:
    family: str = "rpiae"  # "rpiae" | "ps-vae": what the model is, and the recipe that trains it

    # I/O conventions
    image_size: int = 256  # model input and output: float RGB in [0, 1], NCHW
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    # encoder E: "dinov2" = DINOv2 ViT/14 with register tokens (HF Dinov2WithRegistersModel
    # layout); "siglip2" = SigLIP2 ViT (HF Siglip2VisionModel layout, no CLS, no registers)
    encoder_type: str = "dinov2"
    encoder_input_size: int = 224  # images are resized (bicubic, no antialias) to this
    encoder_patch_size: int = 14
    encoder_hidden_size: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    encoder_mlp_size: int = 3072
    encoder_registers: int = 4
    encoder_pos_grid: int = 37  # pos-embed stored for a 37x37 grid (518 px), + 1 CLS row for DINOv2
    encoder_ln_eps: float = 1e-6

    # Variational Bridge (PS-VAE: the semantic encoder/decoder)
    latent_channels: int = 64
    bridge_heads: int = 8
    # transformer layers the bridge encoder runs after its first attention + MLP block, before
    # the moments head (0 in RPiAE, whose bridge encoder is that one block)
    bridge_encoder_depth: int = 0
    bridge_encoder_mlp_size: int = 3072
    bridge_decoder_depth: int = 6
    bridge_decoder_mlp_size: int = 3072
    bridge_ln_eps: float = 1e-5
    logvar_min: float = -30.0
    logvar_max: float = 20.0

    # pixel decoder D: ViT-MAE-style decoder
    decoder_hidden_size: int = 1152
    decoder_depth: int = 28
    decoder_heads: int = 16
    decoder_mlp_size: int = 4096
    decoder_patch_size: int = 16
    decoder_ln_eps: float = 1e-12

    # training-time token noise sigma = tau * U(0, 1); never applied at inference
    noise_tau: float = 0.8

    # optional latent normalisation with per-element dataset statistics (the model then has
    # `latent_mean`/`latent_var` buffers of shape latent_shape): encode returns
    # (z - mean) / sqrt(var + eps) and decode first applies z * sqrt(var + eps) + mean
    latent_norm: bool = False
    latent_norm_eps: float = LATENT_NORM_EPS

    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        self._check_ranges()
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of: {', '.join(FAMILIES)}")
        if self.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"unknown encoder_type {self.encoder_type!r}; expected one of: {', '.join(ENCODER_TYPES)}")
        if self.encoder_type == "siglip2" and self.encoder_registers:
            raise ValueError("a siglip2 encoder has no register tokens: set encoder_registers=0")
        if self.bridge_encoder_depth < 0:
            raise ValueError("bridge_encoder_depth must be >= 0")
        if self.encoder_input_size % self.encoder_patch_size:
            raise ValueError("encoder_input_size must be a multiple of encoder_patch_size")
        if self.decoder_patch_size * self.grid_size != self.image_size:
            raise ValueError(
                f"decoder_patch_size * grid ({self.decoder_patch_size}*{self.grid_size}) "
                f"must equal image_size ({self.image_size})"
            )
        for dim, heads, what in (
            ("encoder_hidden_size", "encoder_heads", "encoder"),
            ("encoder_hidden_size", "bridge_heads", "bridge"),  # the bridge attends at the encoder's width
            ("decoder_hidden_size", "decoder_heads", "decoder"),
        ):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{heads}: the {what} width {dim}={getattr(self, dim)} is not divisible by "
                                 f"{getattr(self, heads)} heads")

    def _check_ranges(self) -> None:
        """Types and ranges of the fields, one line naming the field (before the structural checks,
        which divide by some of them)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in _AT_LEAST:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{f.name} must be a whole number, got {v!r}")
                if v < _AT_LEAST[f.name]:
                    raise ValueError(f"{f.name} must be >= {_AT_LEAST[f.name]}, got {v}")
            elif f.name in _POSITIVE_FLOATS or f.name in ("logvar_min", "logvar_max", "noise_tau"):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"{f.name} must be a finite number, got {v!r}")
                if f.name in _POSITIVE_FLOATS and v <= 0:
                    raise ValueError(f"{f.name} must be > 0, got {v}")
        if self.noise_tau < 0:
            raise ValueError(f"noise_tau must be >= 0, got {self.noise_tau}")
        if self.logvar_min >= self.logvar_max:
            raise ValueError(f"logvar_min ({self.logvar_min}) must be below logvar_max ({self.logvar_max})")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if (not isinstance(v, (tuple, list)) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
                raise ValueError(f"{key} must be three numbers (R, G, B), got {v!r}")
        if any(x <= 0 for x in self.std):
            raise ValueError(f"std must be > 0 per channel, got {tuple(self.std)}")
        if not isinstance(self.latent_norm, bool):
            raise ValueError(f"latent_norm must be true or false, got {self.latent_norm!r}")

    @property
    def grid_size(self) -> int:
        """Side of the token grid (and of the latent): 224 / 14 = 16."""
        return self.encoder_input_size // self.encoder_patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def encoder_prefix_tokens(self) -> int:
        """Tokens E computes before its patch tokens: CLS + registers (DINOv2), none (SigLIP2)."""
        return 1 + self.encoder_registers if self.encoder_type == "dinov2" else 0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.grid_size, self.grid_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RPiAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(float(v) for v in d[key])
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "RPiAEConfig":
        return cls.from_dict(json.loads(s))

    # FLOPs per image (multiply-add = 2 FLOPs) of the two inference graphs; used by the
    # benchmark's fraction-of-peak column. Matmuls only: norms/softmax/GELU are < 1 %.
    def flops(self) -> dict[str, float]:
        def block(tokens: int, dim: int, mlp: int) -> float:
            qkvo = 4 * tokens * dim * dim
            attn = 2 * tokens * tokens * dim
            ffn = 2 * tokens * dim * mlp
            return 2.0 * (qkvo + attn + ffn)

        t, e, d = self.num_tokens, self.encoder_hidden_size, self.decoder_hidden_size
        te = t + self.encoder_prefix_tokens
        td = t + 1
        p = self.encoder_patch_size
        encoder = 2.0 * t * 3 * p * p * e + self.encoder_depth * block(te, e, self.encoder_mlp_size)
        # bridge encoder: skip_proj + attention + 2-layer MLP + further layers + moments head
        bridge_enc = (
            block(t, e, e)
            + 2.0 * t * e * e
            + self.bridge_encoder_depth * block(t, e, self.bridge_encoder_mlp_size)
            + 2.0 * t * e * 2 * self.latent_channels
        )
        bridge_dec = (
            2.0 * t * self.latent_channels * e
            + self.bridge_decoder_depth * block(t, e, self.bridge_decoder_mlp_size)
            + 2.0 * t * e * e
        )
        pixel = (
            2.0 * t * e * d
            + self.decoder_depth * block(td, d, self.decoder_mlp_size)
            + 2.0 * td * d * self.decoder_patch_size**2 * 3
        )
        # the 256->224 resize as two matmuls
        s, r = self.image_size, self.encoder_input_size
        resize = 2.0 * 3 * (r * s * s + r * r * s)
        return {"encode": resize + encoder + bridge_enc, "decode": bridge_dec + pixel}


PRESETS: dict[str, RPiAEConfig] = {
    # the paper's main configuration and the authors' release
    "rpiae-b": RPiAEConfig(name="rpiae-b"),
    # same code path, small enough to train and export on 2 CPU cores
    "tiny": RPiAEConfig(
        name="tiny",
        image_size=256,
        encoder_input_size=224,
        encoder_patch_size=14,
        encoder_hidden_size=192,
        encoder_depth=4,
        encoder_heads=3,
        encoder_mlp_size=768,
        encoder_registers=4,
        encoder_pos_grid=37,
        latent_channels=64,
        bridge_heads=4,
        bridge_decoder_depth=2,
        bridge_decoder_mlp_size=768,
        decoder_hidden_size=256,
        decoder_depth=4,
        decoder_heads=4,
        decoder_mlp_size=1024,
        decoder_patch_size=16,
    ),
}

# PS-VAE (arXiv 2512.17909): the same skeleton with a 96-channel latent and a deeper semantic
# encoder/decoder; the sizes the paper leaves open are ours (docs/TRAINING.md, "PS-VAE").
_PS_VAE = dict(family="ps-vae", latent_channels=96, bridge_encoder_depth=2, bridge_decoder_depth=3, noise_tau=0.0)
PRESETS.update({
    # DINOv2-B/14-reg4 at 224, semantic encoder/decoder of 3 transformer blocks each, ViT-XL pixel decoder
    "ps-vae": RPiAEConfig(name="ps-vae", **_PS_VAE),
    # a SigLIP2 encoder; the papers name no SigLIP2 size: SigLIP2-B/16 at 256 is our choice
    # (16x16 tokens, no resize), with its [-1, 1] input scaling
    "ps-vae-siglip2": RPiAEConfig(
        name="ps-vae-siglip2",
        **_PS_VAE,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        encoder_type="siglip2",
        encoder_input_size=256,
        encoder_patch_size=16,
        encoder_registers=0,
        encoder_pos_grid=16,
    ),
    # the tiny sizes with PS-VAE's structure, for tests
    "ps-vae-tiny": dataclasses.replace(
        PRESETS["tiny"], name="ps-vae-tiny", **_PS_VAE, bridge_encoder_mlp_size=768, bridge_decoder_mlp_size=768
    ),
})


def get_preset(name: str) -> RPiAEConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
