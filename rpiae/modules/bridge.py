"""Variational Bridge: tokens (B, N, C) <-> latent (B, Cz, 16, 16), Cz = 64 in RPiAE.

PS-VAE's semantic encoder/decoder are the same modules, deeper (`bridge_encoder_depth`,
`bridge_decoder_depth`) and with Cz = 96. Parameter names follow the RPiAE release
(`vb_feature_encoder.*`, `vb_feature_decoder.*`); the further encoder layers are
`vb_feature_encoder.net.*`, absent when `bridge_encoder_depth` is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rpiae.config import RPiAEConfig
from rpiae.modules.attention import PackedAttention


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over the latent; `mean` is the inference latent."""

    def __init__(self, moments: torch.Tensor, logvar_min: float = -30.0, logvar_max: float = 20.0) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, H, W) each
        self.logvar = logvar.clamp(logvar_min, logvar_max)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """Mean over elements of (mu^2 + sigma^2 - 1 - log sigma^2), per sample: (B,)."""
        return (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).mean(1)


class TransformerLayer(nn.Module):
    """Pre-norm layer in `nn.TransformerEncoderLayer`'s parameter layout (GELU, no dropout)."""

    def __init__(self, dim: int, heads: int, mlp: int, eps: float) -> None:
        super().__init__()
        self.self_attn = PackedAttention(dim, heads)
        self.linear1 = nn.Linear(dim, mlp)
        self.linear2 = nn.Linear(mlp, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class VBEncoder(nn.Module):
    """x = skip_proj(x) + MHA(LN1(x)); x = x + MLP(LN2(x)); x = layer(x) for each further
    layer (none in RPiAE); moments = to_moments(x)."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim, eps = cfg.encoder_hidden_size, cfg.bridge_ln_eps
        self.grid = cfg.grid_size
        self.logvar_range = (cfg.logvar_min, cfg.logvar_max)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = PackedAttention(dim, cfg.bridge_heads)
        self.skip_proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        # indices 0 and 3 carry weights, as in the release: Linear, GELU, Dropout, Linear
        self.proj2 = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(dim, dim))
        self.net = nn.ModuleList(
            TransformerLayer(dim, cfg.bridge_heads, cfg.bridge_encoder_mlp_size, eps)
            for _ in range(cfg.bridge_encoder_depth)
        )
        self.to_moments = nn.Linear(dim, 2 * cfg.latent_channels)
        nn.init.zeros_(self.proj2[3].weight)
        nn.init.zeros_(self.proj2[3].bias)

    def moments(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.skip_proj(tokens) + self.attn(self.norm1(tokens))
        x = x + self.proj2(self.norm2(x))
        for layer in self.net:
            x = layer(x)
        m = self.to_moments(x)  # (B, N, 2*Cz)
        b, n, c = m.shape
        return m.transpose(1, 2).reshape(b, c, self.grid, self.grid)  # (B, 2*Cz, 16, 16)

    def forward(self, tokens: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.moments(tokens), *self.logvar_range)


class VBDecoder(nn.Module):
    """latent (B, Cz, 16, 16) -> tokens (B, N, C) for the pixel decoder."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim = cfg.encoder_hidden_size
        self.in_proj = nn.Linear(cfg.latent_channels, dim)
        self.net = nn.ModuleList(
            TransformerLayer(dim, cfg.bridge_heads, cfg.bridge_decoder_mlp_size, cfg.bridge_ln_eps)
            for _ in range(cfg.bridge_decoder_depth)
        )
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(z.flatten(2).transpose(1, 2))  # (B, N, C)
        for layer in self.net:
            x = layer(x)
        return self.out_proj(x)
