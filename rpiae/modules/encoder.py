"""Encoder E: a pretrained ViT whose patch tokens the rest of the model works on.

- `DinoV2Encoder`: DINOv2 ViT/14 with register tokens, in HF `Dinov2WithRegistersModel`
  layout; exactly the parameters of the RPiAE release under `encoder.encoder.`.
- `Siglip2Encoder`: SigLIP2 ViT, in HF `Siglip2VisionModel` layout without the pooling head
  (PS-VAE's second encoder); no CLS or register tokens.

`RepresentationEncoder` wraps the one `config.encoder_type` names with the input pipeline
(resize to the encoder's input size, normalisation) and the output convention (patch tokens
only: CLS and registers dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rpiae.config import RPiAEConfig
from rpiae.modules.attention import HFAttention, ProjAttention


def vit_init(module: nn.Module, *tokens: torch.Tensor) -> None:
    """HF ViT init: truncated normal(0.02) for Linear/Conv weights and for `tokens` (learned
    tokens, position embeddings), zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    for t in tokens:
        nn.init.trunc_normal_(t, std=0.02)


class PatchEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x).flatten(2).transpose(1, 2)  # (B,3,H,W) -> (B, N, C)


class Embeddings(nn.Module):
    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim = cfg.encoder_hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)  # unused
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.encoder_registers, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, cfg.encoder_pos_grid**2 + 1, dim))
        self.patch_embeddings = PatchEmbeddings(dim, cfg.encoder_patch_size)

    def resized_position_embeddings(self, grid: int) -> torch.Tensor:
        """Pos-embed for a grid x grid token map, as HF does it: bicubic, antialiased, fp32."""
        pos = self.position_embeddings
        stored = int((pos.shape[1] - 1) ** 0.5)
        if stored == grid:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(
            patch_pos.float(), size=(grid, grid), mode="bicubic", align_corners=False, antialias=True
        ).to(pos.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)  # (1, 1 + grid^2, C)

    def forward(self, pixels: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        b = pixels.shape[0]
        x = self.patch_embeddings(pixels)  # (B, N, C)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + pos_embed  # (B, 1+N, C)
        regs = self.register_tokens.expand(b, -1, -1)
        return torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)  # (B, 1+R+N, C)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu: str = "none") -> None:
        super().__init__()
        self.gelu = gelu  # "none" (exact, DINOv2) or "tanh" (SigLIP2's gelu_pytorch_tanh)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.gelu))


class Block(nn.Module):
    """Pre-norm ViT block with LayerScale (DINOv2)."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim, eps = cfg.encoder_hidden_size, cfg.encoder_ln_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attention = HFAttention(dim, cfg.encoder_heads)
        self.layer_scale1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, cfg.encoder_mlp_size)
        self.layer_scale2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Layers(nn.Module):
    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(Block(cfg) for _ in range(cfg.encoder_depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.layer:
            x = blk(x)
        return x


class DinoV2Encoder(nn.Module):
    """DINOv2-with-registers backbone. The final LayerNorm has no affine (as released)."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Layers(cfg)
        self.layernorm = nn.LayerNorm(cfg.encoder_hidden_size, eps=cfg.encoder_ln_eps, elementwise_affine=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        emb = self.embeddings
        vit_init(self, emb.cls_token, emb.register_tokens, emb.position_embeddings)

    def forward(self, pixels: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels, pos_embed)  # (B, 1+R+N, C)
        return self.layernorm(self.encoder(x))


class Siglip2Embeddings(nn.Module):
    """Patch embedding as a Linear on flattened (row, column, channel) patches, plus a learned
    position embedding stored for a `encoder_pos_grid` square grid (HF `Siglip2VisionEmbeddings`)."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim, self.patch = cfg.encoder_hidden_size, cfg.encoder_patch_size
        self.patch_embedding = nn.Linear(3 * self.patch**2, dim)
        self.position_embedding = nn.Embedding(cfg.encoder_pos_grid**2, dim)

    def resized_position_embeddings(self, grid: int) -> torch.Tensor:
        """Pos-embed for a grid x grid token map, as HF does it: bilinear, antialiased, fp32."""
        pos = self.position_embedding.weight  # (G*G, C)
        stored = int(pos.shape[0] ** 0.5)
        if stored == grid:
            return pos.unsqueeze(0)
        pos = pos.reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos.float(), size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)
        return pos.to(self.position_embedding.weight.dtype).permute(0, 2, 3, 1).reshape(1, grid * grid, -1)

    def forward(self, pixels: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        p = self.patch
        x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
        x = x.reshape(b, (h // p) * (w // p), p * p * c)  # (B, N, p*p*3), SigLIP2's patch order
        return self.patch_embedding(x) + pos_embed  # (B, N, C)


class Siglip2Layer(nn.Module):
    """Pre-norm ViT block (no LayerScale), tanh-approximated GELU."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        dim, eps = cfg.encoder_hidden_size, cfg.encoder_ln_eps
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = ProjAttention(dim, cfg.encoder_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, cfg.encoder_mlp_size, gelu="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Siglip2Layers(nn.Module):
    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Siglip2Layer(cfg) for _ in range(cfg.encoder_depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Siglip2Encoder(nn.Module):
    """SigLIP2 vision tower up to `post_layernorm` (the attention-pooling head is not used)."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        self.embeddings = Siglip2Embeddings(cfg)
        self.encoder = Siglip2Layers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.encoder_hidden_size, eps=cfg.encoder_ln_eps)
        vit_init(self, self.embeddings.position_embedding.weight)

    def forward(self, pixels: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixels, pos_embed)  # (B, N, C)
        return self.post_layernorm(self.encoder(x))


BACKBONES = {"dinov2": DinoV2Encoder, "siglip2": Siglip2Encoder}


class RepresentationEncoder(nn.Module):
    """Images in [0, 1] -> patch tokens (B, N, C), exactly as the release computes them."""

    def __init__(self, cfg: RPiAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = BACKBONES[cfg.encoder_type](cfg)
        self.register_buffer("mean", torch.empty(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.empty(1, 3, 1, 1), persistent=False)
        # The stored -> 16x16 pos-embed resize (antialiased) does not export, so it is
        # computed once and kept; it is recomputed whenever the weights can have changed
        # (after loading, when switching to eval). In training mode it is computed live.
        self.register_buffer("pos_embed", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_pos_embed())
        self.reset_constants()
        self.refresh_pos_embed()

    @torch.no_grad()
    def reset_constants(self) -> None:
        """The normalisation constants, from the config, on the weights' device (the position
        embedding follows the weights: `refresh_pos_embed`, also run after every load)."""
        device = next(self.encoder.parameters()).device
        self.mean = torch.tensor(self.cfg.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.cfg.std, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def refresh_pos_embed(self) -> None:
        self.pos_embed = self.encoder.embeddings.resized_position_embeddings(self.cfg.grid_size).detach().clone()

    def train(self, mode: bool = True) -> "RepresentationEncoder":
        super().train(mode)
        if not mode:
            self.refresh_pos_embed()
        return self

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        size = self.cfg.encoder_input_size
        if x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (self.resize(images) - self.mean) / self.std  # (B, 3, 224, 224)
        if self.training:
            pos = self.encoder.embeddings.resized_position_embeddings(self.cfg.grid_size)
        else:
            pos = self.pos_embed
        tokens = self.encoder(x, pos)  # (B, prefix + N, C), prefix = CLS + registers or none
        return tokens[:, self.cfg.encoder_prefix_tokens :]  # (B, N, C)
