"""RPiAE: Representation-Pivoted Autoencoder (arXiv 2603.19206), as released by the authors.

    image (B,3,H,W) in [0,1]
      -> encoder E (DINOv2-B/14-reg4)            tokens  (B, 256, 768)
      -> vb_feature_encoder (Variational Bridge)  moments (B, 128, 16, 16) -> mean = latent
    latent (B,64,16,16)
      -> vb_feature_decoder                       tokens  (B, 256, 768)
      -> decoder D (ViT-XL pixel decoder)         image   (B, 3, 256, 256), un-normalised

`state_dict()` has exactly the release's 770 keys, so the authors' checkpoint loads strictly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rpiae.config import RPiAEConfig, get_preset
from rpiae.modules import DiagonalGaussian, PixelDecoder, RepresentationEncoder, VBDecoder, VBEncoder


class RPiAE(nn.Module):
    def __init__(self, config: RPiAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = RepresentationEncoder(config)
        self.vb_feature_encoder = VBEncoder(config)
        self.vb_feature_decoder = VBDecoder(config)
        self.decoder = PixelDecoder(config)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        self.eval()

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RPiAE":
        """A randomly initialised model of a named size (`rpiae-b`, `tiny`)."""
        cfg = get_preset(name)
        if overrides:
            cfg = RPiAEConfig.from_dict({**cfg.to_dict(), **overrides})
        return cls(cfg)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: RPiAEConfig | str | None = None) -> "RPiAE":
        """Load the authors' release `.pt` or one of this project's `.safetensors` files.

        The project's files carry their config; for the release the config is matched from
        the tensor shapes against the presets (pass `config=` for a custom size).
        """
        from rpiae.checkpoints import load_model

        return load_model(path, config)

    def save(self, path: str | Path, dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> Path:
        """Write the project's format: safetensors with the config in its metadata."""
        from rpiae.checkpoints import save_model

        return save_model(self, path, dtype=dtype, metadata=metadata)

    # -- the two inference graphs --------------------------------------------------------
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """E's patch tokens (B, N, C) of images in [0, 1]."""
        return self.encoder(images)

    def posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        return self.vb_feature_encoder(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> posterior mean (B, 64, 16, 16)."""
        return self.posterior(images).mean

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pixel decoder on tokens (B, N, C) -> image (B, 3, 256, 256), un-normalised."""
        return self.decoder(tokens) * self.std + self.mean

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 64, 16, 16) -> (B, 3, 256, 256); not clamped (post-processing clamps)."""
        return self.decode_tokens(self.vb_feature_decoder(z))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    # -- helpers ----------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters (trainable and fixed) per part, as the paper's Table 6 counts them."""
        parts = {
            "encoder": self.encoder,
            "vb_encoder": self.vb_feature_encoder,
            "vb_decoder": self.vb_feature_decoder,
            "pixel_decoder": self.decoder,
        }
        return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}

    @staticmethod
    def add_token_noise(tokens: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training-time noise z + sigma * N(0, I), sigma = tau * U(0, 1) per sample."""
        b = tokens.shape[0]
        shape = (b,) + (1,) * (tokens.dim() - 1)
        sigma = tau * torch.rand(shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        noise = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        return tokens + sigma * noise
