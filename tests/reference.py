"""An independent reference of the authors' architecture, assembled from peer library
modules (transformers' Dinov2WithRegistersModel and ViTMAELayer, torch.nn's
MultiheadAttention and TransformerEncoderLayer) and loaded from the same release state
dict. Test-only: it shares no model code with `rpiae`."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, ViTMAEConfig
from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _hf4_to_hf5(sd: dict) -> dict:
    """Release key names (transformers 4) -> transformers 5 in-memory names."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"attention\.attention\.(query|key|value)\.", lambda m: f"attention.{m.group(1)[0]}_proj.", k)
        k = k.replace("attention.output.dense.", "attention.o_proj.")
        k = k.replace("intermediate.dense.", "mlp.fc1.").replace("output.dense.", "mlp.fc2.")
        out[k] = v
    return out


class ReferenceRPiAE(nn.Module):
    def __init__(self, cfg, sd: dict) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.encoder_hidden_size
        self.dino = Dinov2WithRegistersModel(
            Dinov2WithRegistersConfig(
                hidden_size=c,
                num_hidden_layers=cfg.encoder_depth,
                num_attention_heads=cfg.encoder_heads,
                intermediate_size=cfg.encoder_mlp_size,
                num_register_tokens=cfg.encoder_registers,
                image_size=cfg.encoder_pos_grid * cfg.encoder_patch_size,
                patch_size=cfg.encoder_patch_size,
                layer_norm_eps=cfg.encoder_ln_eps,
                hidden_act="gelu",
            )
        )
        self.dino.layernorm = nn.LayerNorm(c, eps=cfg.encoder_ln_eps, elementwise_affine=False)
        # VB encoder
        self.norm1 = nn.LayerNorm(c)
        self.attn = nn.MultiheadAttention(c, cfg.bridge_heads, batch_first=True)
        self.skip_proj = nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c)
        self.proj2 = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Dropout(0.0), nn.Linear(c, c))
        self.to_moments = nn.Linear(c, 2 * cfg.latent_channels)
        # VB decoder
        self.in_proj = nn.Linear(cfg.latent_channels, c)
        self.net = nn.ModuleList(
            nn.TransformerEncoderLayer(
                c, cfg.bridge_heads, cfg.bridge_decoder_mlp_size, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(cfg.bridge_decoder_depth)
        )
        self.out_proj = nn.Linear(c, c)
        # pixel decoder
        d = cfg.decoder_hidden_size
        mae = ViTMAEConfig(
            hidden_size=d, num_attention_heads=cfg.decoder_heads, intermediate_size=cfg.decoder_mlp_size,
            layer_norm_eps=cfg.decoder_ln_eps, hidden_act="gelu", qkv_bias=True,
        )
        self.decoder_embed = nn.Linear(c, d)
        self.decoder_layers = nn.ModuleList(ViTMAELayer(mae) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d, eps=cfg.decoder_ln_eps)
        self.decoder_pred = nn.Linear(d, cfg.decoder_patch_size**2 * 3)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens + 1, d))
        self._load(sd)

    def _load(self, sd: dict) -> None:
        sd = _hf4_to_hf5(sd)
        mine = {}
        for k, v in sd.items():
            if k.startswith("encoder.encoder."):
                mine["dino." + k[len("encoder.encoder.") :]] = v
            elif k.startswith("vb_feature_encoder."):
                mine[k[len("vb_feature_encoder.") :]] = v
            elif k.startswith("vb_feature_decoder."):
                mine[k[len("vb_feature_decoder.") :]] = v
            elif k.startswith("decoder."):
                mine[k[len("decoder.") :]] = v
        self.load_state_dict(mine, strict=True)
        self.eval()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        h = self.dino(pixel_values=(x - MEAN) / STD).last_hidden_state[:, 1 + self.cfg.encoder_registers :]
        n = self.norm1(h)
        h = self.skip_proj(h) + self.attn(n, n, n, need_weights=False)[0]
        h = h + self.proj2(self.norm2(h))
        m = self.to_moments(h)
        g = self.cfg.grid_size
        return m.transpose(1, 2).reshape(m.shape[0], -1, g, g)[:, : self.cfg.latent_channels]

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.in_proj(z.flatten(2).transpose(1, 2))
        for layer in self.net:
            h = layer(h)
        h = self.decoder_embed(self.out_proj(h))
        h = torch.cat([self.trainable_cls_token.expand(h.shape[0], -1, -1), h], 1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            h = layer(h)
        h = self.decoder_pred(self.decoder_norm(h))[:, 1:]
        b, g, p = h.shape[0], self.cfg.grid_size, self.cfg.decoder_patch_size
        img = torch.einsum("nhwpqc->nchpwq", h.reshape(b, g, g, p, p, 3)).reshape(b, 3, g * p, g * p)
        return img * STD + MEAN
