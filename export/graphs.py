"""The two inference graphs as exportable modules.

    EncodeGraph: images (B, 3, 256, 256) float32 in [0, 1] -> latent (B, 64, 16, 16)
    DecodeGraph: latent (B, 64, 16, 16)                     -> image  (B, 3, 256, 256)

(their names, shapes and dtypes are declared in rpiae.export.spec)

The 256 -> 224 bicubic resize is a fixed linear map per axis. ONNX Runtime's cubic Resize
differs from PyTorch's when downsampling, so the graph writes it as `R @ x @ R^T` with R
computed once by PyTorch's own kernel: the same numbers on every runtime.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rpiae.export.spec import GRAPHS, graph_spec
from rpiae.model import RPiAE


def bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix equal to PyTorch's bicubic (align_corners=False, no antialias)
    resize along one axis; exact because the kernel is separable and linear. Computed by
    the float32 kernel itself, so the weights are the very float32 numbers it uses."""
    eye = torch.eye(n_in, dtype=torch.float32).view(1, 1, n_in, n_in)
    return F.interpolate(eye, size=(n_out, n_in), mode="bicubic", align_corners=False)[0, 0]


class EncodeGraph(nn.Module):
    def __init__(self, model: RPiAE) -> None:
        super().__init__()
        cfg = model.config
        self.model = model.eval()
        r = bicubic_matrix(cfg.image_size, cfg.encoder_input_size)
        self.register_buffer("resize_rows", r)  # (224, 256)
        self.register_buffer("resize_cols", r.t().contiguous())  # (256, 224)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.resize_rows @ images @ self.resize_cols  # (B, 3, 224, 224)
        return self.model.encode(x)  # (B, 64, 16, 16)


class DecodeGraph(nn.Module):
    def __init__(self, model: RPiAE) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent)  # (B, 3, 256, 256)


def graph_module(model: RPiAE, graph: str) -> nn.Module:
    if graph == "encode":
        return EncodeGraph(model)
    if graph == "decode":
        return DecodeGraph(model)
    raise ValueError(f"unknown graph {graph!r}; expected one of {GRAPHS}")


def example_input(model: RPiAE, graph: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded input for one graph of `model` (`GraphSpec.sample`)."""
    return graph_spec(model.config, graph).sample(batch, seed)
