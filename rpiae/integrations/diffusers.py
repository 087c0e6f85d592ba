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
  Latents are not scaled here; `config.scaling_factor`, `config.latents_mean` and
  `config.latents_std` (from `rpiae extract`'s statistics, per channel or per element) are
  for pipelines and training scripts, which apply them (`normalize_latents` /
  `denormalize_latents` do it the same way).
- `decode` returns `DecoderOutput(sample=...)`.

`save_pretrained` writes `config.json` + `diffusion_pytorch_model.safetensors` (the release's
state-dict keys under `model.`); `RPiAE.from_pretrained` and every `--model` option read the
same folder or Hub repository.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput
    from diffusers.models.modeling_utils import ModelMixin
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError('AutoencoderRPiAE needs diffusers: pip install "rpiae[diffusers]"') from e

from rpiae.config import RPiAEConfig
from rpiae.model import RPiAE


class AutoencoderRPiAE(ModelMixin, ConfigMixin):
    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        rpiae_config: dict | None = None,
        latents_mean: list | None = None,
        latents_std: list | None = None,
        scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        cfg = RPiAEConfig.from_dict(rpiae_config) if rpiae_config else RPiAEConfig(name="rpiae-b")
        if cfg.latent_norm:
            raise ValueError("AutoencoderRPiAE keeps latent statistics in latents_mean/latents_std, not in the model")
        self.model = RPiAE(cfg)

    # -- conversion ---------------------------------------------------------------------------
    @classmethod
    def from_rpiae(
        cls, model: RPiAE, latent_stats: str | Path | None = None, per: str = "channel", scaling_factor: float = 1.0
    ) -> "AutoencoderRPiAE":
        """The same weights in diffusers' class. A model that carries latent statistics, or a
        statistics file (`rpiae extract`'s, per channel or per element; the authors' .pt, per
        element), becomes `latents_mean` / `latents_std` in the config."""
        mean = std = None
        if latent_stats is not None:
            mean, std = _stats_from_file(latent_stats, per, model.config.latent_norm_eps)
        elif model.config.latent_norm:
            mean = model.latent_mean.detach().cpu()
            std = torch.sqrt(model.latent_var.detach().cpu() + model.config.latent_norm_eps)
        cfg = {**model.config.to_dict(), "latent_norm": False}
        vae = cls(rpiae_config=cfg, latents_mean=None if mean is None else mean.tolist(),
                  latents_std=None if std is None else std.tolist(), scaling_factor=scaling_factor)
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
    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """Images in [-1, 1] -> posterior over the latent (B, C, 16, 16)."""
        moments = self.model.vb_feature_encoder.moments(self.model.tokens((x + 1) / 2))  # (B, 2C, 16, 16)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        """Latents (B, C, 16, 16) -> images in [-1, 1] (not clamped)."""
        sample = self.model.decode(z) * 2 - 1
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    # -- latent statistics, as pipelines apply them ----------------------------------------------------
    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(z - latents_mean) / latents_std * scaling_factor (each part only if configured)."""
        mean, std = self._stats(z)
        return (z - mean) / std * self.config.scaling_factor

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z / self.config.scaling_factor * std + mean

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        def shaped(values: list | None, default: float):
            if values is None:
                return default
            t = torch.tensor(values, dtype=z.dtype, device=z.device)
            return t.view(1, -1, 1, 1) if t.dim() == 1 else t.unsqueeze(0)

        return shaped(self.config.latents_mean, 0.0), shaped(self.config.latents_std, 1.0)


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
