"""`AutoencoderRPiAE`: RPiAE with diffusers' autoencoder API (`pip install "rpiae[diffusers]"`).

    from rpiae.integrations.diffusers import AutoencoderRPiAE
    vae = AutoencoderRPiAE.from_pretrained("some/repo")            # or .from_rpiae(RPiAE.from_pretrained())
    posterior = vae.encode(images).latent_dist                     # images (B, 3, 256, 256) in [-1, 1]
    z = posterior.mode()                                            # (B, 64, 16, 16) = `rpiae encode`'s latent
    images = vae.decode(z).sample                                   # (B, 3, 256, 256) in [-1, 1], not clamped

Conventions, as diffusers' `AutoencoderKL`:

- Images are RGB NCHW in [-1, 1] (what `VaeImageProcessor` produces and expects); the model
  itself works in [0, 1], and the conversion happens here, at the boundary.
- `encode` returns `AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)` over the
  Variational Bridge's posterior: `.mean` / `.mode()` is the RPiAE latent, `.sample()` draws.
  Latents are not scaled here (`config.scaling_factor` is the pipeline's).
- Latent statistics (from `rpiae extract`, per channel or per element) are the buffers
  `_latents_mean` / `_latents_std`; per channel they are also `config.latents_mean` /
  `config.latents_std` for pipelines that read them there. `normalize_latents` /
  `denormalize_latents` apply them as training scripts do. With `config.latents_normalized`,
  `encode` returns the posterior of `(z - mean) / std` and `decode` maps its input back first,
  for pipelines that only divide by `scaling_factor` (DiTPipeline).
- `decode` returns `DecoderOutput(sample=...)`.
- The config fields pipelines read (`block_out_channels`: a factor of 16, `latent_channels`,
  `sample_size`, `shift_factor`, `force_upcast`) are derived from the model config.
- `enable_slicing()` (exact), `enable_gradient_checkpointing()`; `enable_tiling()` refuses.

`save_pretrained` writes `config.json` + `diffusion_pytorch_model.safetensors` (the release's
state-dict keys under `model.`); `RPiAE.from_pretrained` and every `--model` option read the
same folder or Hub repository.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.models.modeling_utils import ModelMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('AutoencoderRPiAE needs diffusers: pip install "rpiae[diffusers]"') from e

from rpiae.config import RPiAEConfig
from rpiae.model import RPiAE


STATS_MODES = ("none", "channel", "element")


class AutoencoderRPiAE(ModelMixin, AutoencoderMixin, ConfigMixin):
    config_name = "config.json"
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        rpiae_config: dict | None = None,
        latents_mean: list | None = None,
        latents_std: list | None = None,
        scaling_factor: float = 1.0,
        latents_stats: str | None = None,
        latents_normalized: bool = False,
        shift_factor: float | None = None,
        force_upcast: bool = True,
        in_channels: int | None = None,
        out_channels: int | None = None,
        latent_channels: int | None = None,
        sample_size: int | None = None,
        block_out_channels: list | None = None,
    ) -> None:
        super().__init__()
        cfg = RPiAEConfig.from_dict(rpiae_config) if rpiae_config else RPiAEConfig(name="rpiae-b")
        if cfg.latent_norm:
            raise ValueError("AutoencoderRPiAE keeps latent statistics in its own buffers, not in the model")
        self.model = RPiAE(cfg)
        # what pipelines read: a spatial factor 2 ** (len(block_out_channels) - 1), latent channels,
        # image size; derived from the model, never declared twice
        c, h, _ = cfg.latent_shape
        factor = cfg.image_size // h
        derived = {"in_channels": 3, "out_channels": 3, "latent_channels": c, "sample_size": cfg.image_size,
                   "block_out_channels": [c] * (factor.bit_length())}
        given = {"in_channels": in_channels, "out_channels": out_channels, "latent_channels": latent_channels,
                 "sample_size": sample_size, "block_out_channels": block_out_channels}
        wrong = [k for k, v in given.items() if v is not None and (list(v) if isinstance(v, (list, tuple)) else v) != derived[k]]
        if wrong:
            raise ValueError(f"config {', '.join(wrong)} disagree with the model's ({', '.join(f'{k}={derived[k]}' for k in wrong)})")
        # statistics: per channel (also in the config, for pipelines that read latents_mean/std
        # there) or per element (weights only: 64x16x16 numbers do not belong in config.json)
        mode = latents_stats or ("none" if latents_mean is None else
                                 "channel" if torch.tensor(latents_mean).dim() == 1 else "element")
        if mode not in STATS_MODES:
            raise ValueError(f"latents_stats must be one of {', '.join(STATS_MODES)}, got {mode!r}")
        shape = {"none": (1, 1, 1), "channel": (c, 1, 1), "element": tuple(cfg.latent_shape)}[mode]
        mean = torch.zeros(shape) if latents_mean is None else torch.tensor(latents_mean, dtype=torch.float32).reshape(shape)
        std = torch.ones(shape) if latents_std is None else torch.tensor(latents_std, dtype=torch.float32).reshape(shape)
        self.register_buffer("_latents_mean", mean, persistent=True)
        self.register_buffer("_latents_std", std, persistent=True)
        self.register_to_config(latents_stats=mode, **derived)
        self.use_slicing = False
        self.gradient_checkpointing = False

    # -- conversion ---------------------------------------------------------------------------
    @classmethod
    def from_rpiae(
        cls, model: RPiAE, latent_stats: str | Path | None = None, per: str = "channel", scaling_factor: float = 1.0,
        latents_normalized: bool = False,
    ) -> "AutoencoderRPiAE":
        """The same weights in diffusers' class. A model that carries latent statistics (per
        element), or a statistics file (`rpiae extract`'s, per channel or per element; the
        authors' .pt, per element), become the `latents_mean` / `latents_std` buffers, and for
        per-channel statistics the config's lists too. `latents_normalized=True` makes `encode`
        return, and `decode` take, normalised latents (for pipelines that only divide by
        `scaling_factor`)."""
        mean = std = None
        if latent_stats is not None:
            mean, std = _stats_from_file(latent_stats, per, model.config.latent_norm_eps)
        elif model.config.latent_norm:
            per = "element"
            mean = model.latent_mean.detach().cpu()
            std = torch.sqrt(model.latent_var.detach().cpu() + model.config.latent_norm_eps)
        mode = "none" if mean is None else per
        cfg = {**model.config.to_dict(), "latent_norm": False}
        in_config = mode == "channel"
        vae = cls(rpiae_config=cfg, latents_mean=mean.tolist() if in_config else None,
                  latents_std=std.tolist() if in_config else None, scaling_factor=scaling_factor,
                  latents_stats=mode, latents_normalized=latents_normalized)
        if mode == "element":
            vae._latents_mean.copy_(mean.reshape(vae._latents_mean.shape))
            vae._latents_std.copy_(std.reshape(vae._latents_std.shape))
        sd = {k: v for k, v in model.state_dict().items() if k not in ("latent_mean", "latent_var")}
        vae.model.load_state_dict(sd, strict=True)
        dtype = next(model.parameters()).dtype
        return (vae if dtype == torch.float32 else vae.to(dtype)).eval()

    def to_rpiae(self) -> RPiAE:
        """The same weights as an `RPiAE` (its latent is the raw posterior mean)."""
        out = RPiAE(self.model.config)
        out.load_state_dict(self.model.state_dict(), strict=True)
        return out.to(next(self.parameters()).dtype).eval()

    # -- the autoencoder API ----------------------------------------------------------------------
    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        """fn(x), one sample at a time with slicing, recomputed in backward with gradient
        checkpointing (the whole encoder or decoder is one checkpoint)."""
        def call(t):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                return self._gradient_checkpointing_func(fn, t)
            return fn(t)

        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([call(x[i : i + 1]) for i in range(x.shape[0])])
        return call(x)

    def _moments(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model.vb_feature_encoder.moments(self.model.tokens(images01))  # (B, 2C, 16, 16)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] -> posterior over the latent (B, C, 16, 16); with
        `config.latents_normalized`, over (z - latents_mean) / latents_std."""
        moments = self._run(self._moments, (x + 1) / 2)
        if self.config.latents_normalized:
            mean, logvar = moments.chunk(2, dim=1)
            m, s = self._stats_like(mean)
            moments = torch.cat([(mean - m) / s, logvar - 2 * torch.log(s).expand_as(logvar)], dim=1)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        """Latents (B, C, 16, 16) -> images in [-1, 1] (not clamped); with
        `config.latents_normalized`, `z` is normalised and is first mapped back."""
        if self.config.latents_normalized:
            m, s = self._stats_like(z)
            z = z * s + m
        sample = self._run(self.model.decode, z) * 2 - 1
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    def enable_tiling(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "AutoencoderRPiAE does not tile: its encoder and decoder attend over the whole image and the whole "
            "latent grid, so tiles would change the result; enable_slicing() saves memory exactly (one image at a time)")

    # -- latent statistics, as pipelines apply them ----------------------------------------------------
    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - latents_mean) / latents_std * scaling_factor (no-op statistics when none were given)."""
        mean, std = self._stats_like(z)
        return (z - mean) / std * self.config.scaling_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats_like(z)
        return z / self.config.scaling_factor * std + mean

    def _stats_like(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self._latents_mean.to(z.device, z.dtype).unsqueeze(0),
                self._latents_std.to(z.device, z.dtype).unsqueeze(0))


def _stats_from_file(path: str | Path, per: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from rpiae.checkpoints import read_file, read_latent_stats

    if per not in ("channel", "element"):
        raise ValueError(f"per must be 'channel' or 'element', got {per!r}")
    if per == "channel":
        obj, _ = read_file(path)
        if isinstance(obj, dict) and "channel_mean" in obj and "channel_var" in obj:
            return obj["channel_mean"].float(), torch.sqrt(obj["channel_var"].float() + eps)
        raise ValueError(f"{path}: no per-channel statistics (channel_mean/channel_var); use per='element'")
    mean, var = read_latent_stats(path)
    return mean, torch.sqrt(var + eps)
