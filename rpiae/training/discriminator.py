"""GAN discriminator of the recipe: a frozen DINO (v1) ViT-S/8 feature network with small
trainable heads (StyleGAN-T style), plus DiffAugment (translation + colour).

The feature network reads the official DINO checkpoint layout (`dino_deitsmall8_pretrain.pth`:
`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,
mlp.fc1,mlp.fc2}.*`, `norm.*`) from a local file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from rpiae.checkpoints import CheckpointError, load_strict, read_file, unwrap_state_dict
from rpiae.config import IMAGENET_MEAN, IMAGENET_STD

HOOKS = (2, 5, 8, 11)  # blocks whose outputs feed a head (plus the final normed output)


# -- DINO v1 ViT feature network ----------------------------------------------------------------


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, 4 * dim)
        self.mlp.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.attn.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, N, C/H)
        x = x + self.attn.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class DinoFeatures(nn.Module):
    """Images in [-1, 1] -> list of token maps (B, C, N) after blocks 2, 5, 8, 11 and the last norm."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 8, size: int = 224) -> None:
        super().__init__()
        self.size = size
        grid = size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.hooks = tuple(h for h in HOOKS if h < depth)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DinoFeatures":
        return super().train(False)  # frozen, always eval

    @property
    def num_features(self) -> int:
        return len(self.hooks) + 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        feats = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in self.hooks:
                feats.append(x)
        feats.append(self.norm(x))
        return [f.transpose(1, 2) for f in feats]  # (B, C, N) each


# -- heads ---------------------------------------------------------------------------------------


class BatchNormLocal(nn.Module):
    """Batch norm over virtual batches of 8 samples, batch statistics always (StyleGAN-T)."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5) -> None:
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        groups = math.ceil(b / self.virtual_bs)
        if b % groups:
            groups = 1
        x = x.view(groups, -1, c, n)
        mean = x.mean(dim=(1, 3), keepdim=True)
        var = x.var(dim=(1, 3), keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(var + self.eps)
        x = x.view(b, c, n)
        return x * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


def _sn_block(channels: int, kernel: int) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.Sequential(spectral_norm(conv), BatchNormLocal(channels), nn.LeakyReLU(0.2))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.fn(x)) / math.sqrt(2)


class DiscHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.main = nn.Sequential(_sn_block(channels, 1), Residual(_sn_block(channels, 9)))
        self.cls = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.main(x)).flatten(1)  # (B, N)


class Discriminator(nn.Module):
    """Logits (B, sum of token counts) for images in [-1, 1]; only the heads train."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 8, diffaug: bool = True) -> None:
        super().__init__()
        self.features = DinoFeatures(dim, depth, heads, patch)
        self.heads = nn.ModuleList(DiscHead(dim) for _ in range(self.features.num_features))
        self.diffaug = diffaug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.diffaug:
            x = diff_augment(x)
        feats = self.features(x)
        return torch.cat([h(f) for h, f in zip(self.heads, feats)], dim=1)


def load_dino_features(disc: Discriminator, path: str | Path) -> None:
    """The DINO ViT-S/8 weights (official, timm or a `teacher`/`student` checkpoint) into the feature net."""
    obj, _ = read_file(path)
    sd = unwrap_state_dict(obj, preferred=("teacher", "student", "state_dict", "model"))
    for prefix in ("backbone.", "module.backbone.", "module."):
        if any(k.startswith(prefix + "blocks.") for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm."))}
    if "pos_embed" not in sd:
        raise CheckpointError(f"{path}: not a DINO ViT checkpoint (no pos_embed)")
    load_strict(disc.features, sd, f"discriminator weights {path}")
    disc.features.requires_grad_(False)


# -- DiffAugment (Zhao et al. 2020), policy "color,translation", images in [-1, 1] ---------------


def diff_augment(x: torch.Tensor, translation: float = 0.125) -> torch.Tensor:
    b = x.shape[0]
    opts = dict(device=x.device, dtype=x.dtype)
    # colour: brightness, saturation, contrast
    x = x + (torch.rand(b, 1, 1, 1, **opts) - 0.5)
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (torch.rand(b, 1, 1, 1, **opts) * 2) + m
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * (torch.rand(b, 1, 1, 1, **opts) + 0.5) + m
    # translation by up to 1/8 of the size, zero padded
    h, w = x.shape[-2:]
    sh, sw = int(h * translation + 0.5), int(w * translation + 0.5)
    ty = torch.randint(-sh, sh + 1, (b,), device=x.device)
    tx = torch.randint(-sw, sw + 1, (b,), device=x.device)
    padded = F.pad(x, (sw, sw, sh, sh))
    rows = (torch.arange(h, device=x.device)[None, :] + sh - ty[:, None]).clamp(0, h + 2 * sh - 1)  # (B, H)
    cols = (torch.arange(w, device=x.device)[None, :] + sw - tx[:, None]).clamp(0, w + 2 * sw - 1)  # (B, W)
    idx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def quantize_fake(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits (straight-through, so G still gets a gradient)."""
    q = torch.round(x.clamp(0, 1) * 255) / 255
    return x + (q - x).detach()
