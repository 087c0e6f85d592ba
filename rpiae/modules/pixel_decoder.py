"""Pixel decoder D: ViT-MAE-style decoder in the HF `ViTMAELayer` layout used by RAE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rpiae.config import RPiAEConfig
from rpiae.modules.attention import HFAttention


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = True) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos embedding, (grid^2 [+1], dim), float64 then cast; CLS row zero."""
    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # MAE: meshgrid(grid_w, grid_h)

    def embed_1d(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    emb = torch.cat([embed_1d(gw, dim // 2), embed_1d(gh, dim // 2)], dim=1)  # (grid^2, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def init_linears(module: nn.Module, scheme: str) -> None:
    """(Re-)initialise every Linear in `module`: "normal" draws normal(0.02) weights and zero
    biases (HF ViT-MAE's init); "torch" restores PyTorch's default (weights kaiming-uniform with
    a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), biases from the same range), which the
    RPiAE authors' decoder keeps, as it applies no init of its own."""
    if scheme not in ("normal", "torch"):
        raise ValueError(f"unknown init scheme {scheme!r}; choose normal or torch")
    for m in module.modules():
        if not isinstance(m, nn.Linear):
            continue
        if scheme == "torch":
            m.reset_parameters()
        else:
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class Intermediate(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class Output(nn.Module):
    def __init__(self, hidden: int, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim, eps = cfg.decoder_hidden_size, cfg.decoder_ln_eps
        self.attention = HFAttention(dim, cfg.decoder_heads)
        self.intermediate = Intermediate(dim, cfg.decoder_mlp_size)
        self.output = Output(cfg.decoder_mlp_size, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(self.intermediate(self.layernorm_after(x)))


class PixelDecoder(nn.Module):
    """Tokens (B, N, C_enc) -> image (B, 3, 256, 256) in ImageNet-normalised space."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim, grid = cfg.decoder_hidden_size, cfg.grid_size
        self.patch, self.grid = cfg.decoder_patch_size, grid
        self.decoder_embed = nn.Linear(cfg.encoder_hidden_size, dim)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(dim, grid).unsqueeze(0), requires_grad=False
        )  # fixed, (1, 1 + N, D)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=cfg.decoder_ln_eps)
        self.decoder_pred = nn.Linear(dim, cfg.decoder_patch_size**2 * 3)
        # HF ViT-MAE's init; a training run that starts D afresh picks its own (`decoder_init`)
        init_linears(self, "normal")

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b, p, g = x.shape[0], self.patch, self.grid
        x = x.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # nhwpqc -> nchpwq
        return x.reshape(b, 3, g * p, g * p)  # (B, 3, 256, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(tokens)  # (B, N, D)
        cls = self.trainable_cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.decoder_pos_embed  # (B, 1+N, D)
        for layer in self.decoder_layers:
            x = layer(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+N, p*p*3)
        return self.unpatchify(x[:, 1:])
