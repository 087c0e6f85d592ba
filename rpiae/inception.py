"""Inception-v3 2048-d pool features for FID, as torch-fidelity's `FeatureExtractorInceptionV3`
computes them, in plain torch (torch-fidelity itself imports torchvision, which this project
does not depend on).

The network is the FID Inception (the TensorFlow `inception-2015-12-05` graph that TTUR,
pytorch-fid and torch-fidelity use): torchvision's Inception-v3 layout with TensorFlow's
average pools that ignore padding, a max pool in the last block, BatchNorm eps 1e-3 and a
1008-class `fc`. Inputs are uint8 images (N, 3, H, W); they are resized to 299x299 with
TensorFlow 1.x bilinear interpolation (align_corners=False), scaled by (x - 128) / 128, and
the output is the global average pool (N, 2048), float32.

Weights: torch-fidelity's file `weights-inception-2015-12-05-6726825d.pth` (a plain state
dict: `<block>.conv.weight`, `<block>.bn.{weight,bias,running_mean,running_var}`, `fc.*`),
read with `torch.load(weights_only=True)` and loaded strictly. torch-fidelity fetches it
with `torch.hub.load_state_dict_from_url`, so a machine that has run torch-fidelity keeps it
in `torch.hub.get_dir()/checkpoints/`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
INPUT_SIZE = 299
FEATURES = 2048


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float images as TensorFlow 1.x's `resize_bilinear`
    (align_corners=False) does it: source position = output index * (in / out), computed
    in float32, no half-pixel offset, the upper neighbour clamped at the last pixel."""

    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo.float()).to(x.dtype)

    y_lo, y_hi, dy = axis(x.shape[2])
    x_lo, x_hi, dx = axis(x.shape[3])
    top, bottom = x[:, :, y_lo, :], x[:, :, y_hi, :]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * dx
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * dx
    return top + (bottom - top) * dy[:, None]


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm with exactly the four tensors the weights file stores."""

    def __init__(self, channels: int, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv(nn.Module):
    """Conv (no bias) + BatchNorm + ReLU: one `<block>` of the weights file."""

    def __init__(self, c_in: int, c_out: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TensorFlow's: padding not counted


class MixedA(nn.Module):  # Mixed_5b..5d, 35x35
    def __init__(self, c_in: int, pool: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv(c_in, 64, 1)
        self.branch5x5_1 = BasicConv(c_in, 48, 1)
        self.branch5x5_2 = BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1)
        self.branch_pool = BasicConv(c_in, pool, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class MixedB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class MixedC(nn.Module):  # Mixed_6b..6e, 17x17, factorised 7x7
    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv(c_in, 192, 1)
        self.branch7x7_1 = BasicConv(c_in, c7, 1)
        self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for k in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{k}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class MixedD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv(c_in, 192, 1)
        self.branch3x3_2 = BasicConv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool, as the TensorFlow graph has it)
    def __init__(self, c_in: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv(c_in, 320, 1)
        self.branch3x3_1 = BasicConv(c_in, 384, 1)
        self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3Features(nn.Module):
    """uint8 images (N, 3, H, W) -> Inception-v3 pool features (N, 2048) float32. Frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b = MixedE(1280, max_pool=False)
        self.Mixed_7c = MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, 1008)  # the classifier: in the weights file, not used for FID
        self.requires_grad_(False)
        self.eval()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = resize_bilinear_tf1(images.to(self.fc.weight.device, torch.float32), INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3)).float()


def load_inception(path: str | Path) -> InceptionV3Features:
    """The feature network with its weights from `path` (torch-fidelity's layout; strict)."""
    from rpiae.checkpoints import load_strict, read_file, unwrap_state_dict

    obj, _ = read_file(path)
    sd = unwrap_state_dict(obj, preferred=("state_dict",))
    # BatchNorm's step counter, present when a file was saved from torch's BatchNorm2d, carries no weight
    sd = {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}
    net = InceptionV3Features()
    load_strict(net, sd, f"Inception weights {path}")
    return net.requires_grad_(False).eval()
