"""LPIPS (VGG16 variant) in plain torch, loading local weight files only.

Layouts read (one file or several, merged):
- the VGG16 backbone in torchvision's layout: `features.N.weight/bias` (N = 0, 2, 5, ...,
  28; `classifier.*` is ignored) — e.g. torchvision's `vgg16-397923af.pth`;
- the LPIPS linear heads: `lin{0..4}.model.1.weight` (1x1 convs, no bias) — the LPIPS
  release's `weights/v0.1/vgg.pth`.
Files are read with `torch.load(weights_only=True)` (or safetensors).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rpiae.checkpoints import CheckpointError, read_file, unwrap_state_dict

VGG16_CHANNELS = (64, 128, 256, 512, 512)
_VGG16_BLOCKS = (2, 2, 3, 3, 3)  # convs per stage


class LinearHead(nn.Module):
    """LPIPS `NetLinLayer`: Dropout (index 0, identity at eval) + 1x1 conv without bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """d(x, y) per image (B,), inputs in [-1, 1]. Frozen: it is a loss, never trained.

    `channels` exists for tests (a narrow network of the same structure); real use keeps VGG16's.
    """

    def __init__(self, channels: Sequence[int] = VGG16_CHANNELS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.taps: list[int] = []  # indices in `features` after which a feature is taken (relu_k)
        c_in = 3
        for stage, (c, n) in enumerate(zip(channels, _VGG16_BLOCKS)):
            if stage:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(n):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = c
            self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)  # torchvision vgg16 `features.N` indices
        for k, c in enumerate(channels):
            self.add_module(f"lin{k}", LinearHead(c))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # always eval

    def _feats(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out, taps = [], set(self.taps)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
            if i == self.taps[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self._feats(x), self._feats(y)
        total = 0.0
        for k, (a, b) in enumerate(zip(fx, fy)):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            d = getattr(self, f"lin{k}")((a - b).pow(2))  # (B, 1, h, w)
            total = total + d.mean(dim=(1, 2, 3))
        return total


def load_lpips(paths: str | Path | Sequence[str | Path], channels: Sequence[int] = VGG16_CHANNELS) -> LPIPS:
    """An LPIPS module with its backbone and heads from local files (strict: all keys needed)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    net = LPIPS(channels)
    expected = net.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for p in paths:
        obj, _ = read_file(p)
        sd = unwrap_state_dict(obj, preferred=("state_dict", "model"))
        for prefix in ("net.", "module."):
            if any(k.startswith(prefix + "features.") or k.startswith(prefix + "lin0.") for k in sd):
                sd = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}
        merged.update({k: v for k, v in sd.items() if k in expected and k not in ("shift", "scale")})
    wanted = [k for k in expected if k not in ("shift", "scale")]
    missing = [k for k in wanted if k not in merged]
    if missing:
        raise CheckpointError(
            f"LPIPS weights incomplete: missing {', '.join(missing[:4])}"
            + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
            + "; give torchvision's VGG16 (features.N.*) and the LPIPS heads (lin{0..4}.model.1.weight)"
        )
    wrong = [k for k in wanted if tuple(merged[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise CheckpointError(f"LPIPS weights have wrong shapes: {', '.join(wrong[:4])}")
    net.load_state_dict({**{k: v.float() for k, v in merged.items()}, "shift": net.shift, "scale": net.scale})
    return net.requires_grad_(False).eval()


def lpips_loss(net: LPIPS, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS of images in [0, 1]."""
    return net(recon * 2 - 1, target * 2 - 1).mean()


