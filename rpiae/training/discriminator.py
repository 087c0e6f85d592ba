"""GAN discriminator of the recipe: a frozen DINO (v1) ViT-S/8 feature network with small
trainable heads (StyleGAN-T style), plus DiffAugment (translation, then colour), as the
authors' `src/disc/dinodisc.py` and `src/disc/diffaug.py` build it.

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
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from rpiae.checkpoints import CheckpointError, load_strict, read_file, unwrap_state_dict
from rpiae.config import IMAGENET_MEAN, IMAGENET_STD
from rpiae.imageio import quantize_8bit

HOOKS = (2, 5, 8, 11)  # blocks whose outputs feed a head, after the last block's output


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
        # the authors' discriminator backbone uses the tanh approximation of GELU
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x)), approximate="tanh"))


class DinoFeatures(nn.Module):
    """Images in [-1, 1] -> token maps (B, C, N), CLS dropped: the last block's output (not
    normed), then the outputs of blocks 2, 5, 8, 11. `norm` is loaded but unused."""

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
            x = blk(x)  # (B, 1+N, C)
            if i in self.hooks:
                feats.append(x)
        feats.insert(0, x)
        return [f[:, 1:].transpose(1, 2) for f in feats]  # (B, C, N) each


# -- heads ---------------------------------------------------------------------------------------


class BatchNormLocal(nn.Module):
    """Batch norm over groups of `virtual_bs` samples, batch statistics always, in fp32.

    The authors use `virtual_bs=1`: each sample is normalised over its own tokens.
    """

    def __init__(self, channels: int, virtual_bs: int = 1, eps: float = 1e-6) -> None:
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, n = x.shape
        groups = math.ceil(b / self.virtual_bs)
        if b % groups:
            groups = 1
        x = x.float().view(groups, -1, c, n)
        mean = x.mean(dim=(1, 3), keepdim=True)
        var = x.var(dim=(1, 3), keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(var + self.eps)
        x = x.view(b, c, n)
        return x * self.weight.view(1, -1, 1) + self.bias.view(1, -1, 1)


class SpectralNormVU(nn.Module):
    """Spectral normalisation as the authors' discriminator applies it (`SpectralNorm.apply`
    of `torch.nn.utils.spectral_norm`, one power iteration, dim 0): u and v drawn from N(0, I)
    and normalised, no warm-up; each forward in train mode updates v = W^T u / |.| first, then
    u = W v / |.|; the weight is divided by sigma = u^T W v. A parametrization with the buffer
    names of torch's (`_u`, `_v`), so the state-dict layout is the same either way."""

    def __init__(self, weight: torch.Tensor, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps
        h, w = weight.shape[0], weight[0].numel()
        self.register_buffer("_u", F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=eps))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mat = weight.flatten(1)  # (out, in * kernel)
        if self.training:
            with torch.no_grad():  # in place, as torch's: the buffers carry the estimate on
                F.normalize(torch.mv(mat.t(), self._u), dim=0, eps=self.eps, out=self._v)
                F.normalize(torch.mv(mat, self._v), dim=0, eps=self.eps, out=self._u)
        u, v = self._u.clone(), self._v.clone()  # clones: a second forward must not change the first's graph
        return weight / torch.dot(u, torch.mv(mat, v))


def spectral_normed(conv: nn.Conv1d, warmup: bool) -> nn.Conv1d:
    """`conv` with its weight spectrally normalised: the authors' variant (`SpectralNormVU`) or,
    with `warmup`, torch's parametrization (15 power iterations at construction, u then v)."""
    if warmup:
        return spectral_norm(conv)
    # unsafe: registering without the trial forward, which would run a power iteration now
    parametrize.register_parametrization(conv, "weight", SpectralNormVU(conv.weight), unsafe=True)
    return conv


def _sn_block(channels: int, kernel: int, group: int, eps: float, sn_warmup: bool) -> nn.Sequential:
    conv = nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular")
    return nn.Sequential(spectral_normed(conv, sn_warmup), BatchNormLocal(channels, group, eps), nn.LeakyReLU(0.2))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.fn(x)) / math.sqrt(2)


class DiscHead(nn.Module):
    def __init__(self, channels: int, norm_group: int = 1, norm_eps: float = 1e-6, sn_warmup: bool = False) -> None:
        super().__init__()
        self.main = nn.Sequential(
            _sn_block(channels, 1, norm_group, norm_eps, sn_warmup),
            Residual(_sn_block(channels, 9, norm_group, norm_eps, sn_warmup)),
        )
        self.cls = spectral_normed(nn.Conv1d(channels, 1, 1), sn_warmup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.main(x)).flatten(1)  # (B, N)


class Discriminator(nn.Module):
    """Logits (B, sum of token counts) for images in [-1, 1]; only the heads train.

    Spectral norm's power iteration runs only in train mode: the trainer keeps the
    discriminator in eval mode for the generator step and in train mode for its own step.
    """

    def __init__(
        self,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        patch: int = 8,
        diffaug: bool = True,
        norm_group: int = 1,
        norm_eps: float = 1e-6,
        sn_warmup: bool = False,
    ) -> None:
        super().__init__()
        self.features = DinoFeatures(dim, depth, heads, patch)
        self.heads = nn.ModuleList(
            DiscHead(dim, norm_group, norm_eps, sn_warmup) for _ in range(self.features.num_features)
        )
        self.diffaug = diffaug

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """DiffAugment (when on) of images in [-1, 1]."""
        return diff_augment(x) if self.diffaug else x

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, sum of token counts) of already augmented images."""
        feats = self.features(x)
        return torch.cat([h(f) for h, f in zip(self.heads, feats)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.augment(x))


def real_fake_logits(
    disc: Discriminator, real: torch.Tensor, fake: torch.Tensor, fake_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real logits, fake logits) for the discriminator's step. `fake_first` (the authors'):
    augment the fake batch, then the real one, then classify fake, then real (the random draws
    and the spectral norm's power iterations in that order); else the real batch is augmented
    and classified first, then the fake."""
    if fake_first:
        fake_in, real_in = disc.augment(fake), disc.augment(real)
        fake_logits = disc.classify(fake_in)
        return disc.classify(real_in), fake_logits
    real_logits = disc(real)
    return real_logits, disc(fake)


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


# -- DiffAugment (Zhao et al. 2020; StyleGAN-T's version), images in [-1, 1] -------------------


def diff_augment(x: torch.Tensor, translation: float = 0.125) -> torch.Tensor:
    """Translation by up to 1/8 of the size (zero fill), then brightness, saturation and
    contrast; one draw per sample, in fp32. Random numbers are drawn in the same order and
    shapes as StyleGAN-T's `DiffAug.aug` (policy flags, then a (7, B) block), so a seeded
    run augments exactly as the authors' code does."""
    x = x.float()
    b, dev = x.shape[0], x.device
    torch.rand(3)  # the policy flags (translation, colour, cutout); always on here
    r = torch.rand(7, b, 1, 1, device=dev)
    h, w = x.shape[-2:]
    dh, dw = round(h * translation), round(w * translation)
    ty = (r[0] * (2 * dh + 1)).floor().long() - dh  # (B, 1, 1), uniform in [-dh, dh]
    tx = (r[1] * (2 * dw + 1)).floor().long() - dw
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (B, H+2, W+2, C): the zero border is the fill
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    rows = (torch.arange(h, device=dev).view(1, h, 1) + ty + 1).clamp(0, h + 1)  # (B, H, 1)
    cols = (torch.arange(w, device=dev).view(1, 1, w) + tx + 1).clamp(0, w + 1)  # (B, 1, W)
    x = padded[bi, rows, cols].permute(0, 3, 1, 2)  # (B, C, H, W)
    r = r.unsqueeze(-1)  # (7, B, 1, 1, 1)
    x = x + (r[2] - 0.5)  # brightness
    m = x.mean(dim=1, keepdim=True)
    x = (x - m) * (r[3] * 2) + m  # saturation
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * (r[4] + 0.5) + m).contiguous()  # contrast


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def quantize_fake(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to 8 bits (straight-through, so G still gets a gradient)."""
    q = quantize_8bit(x)
    return x + (q - x).detach()
