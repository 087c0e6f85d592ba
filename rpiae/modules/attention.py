"""Multi-head self-attention written plainly, in the parameter layouts the model's parts use.

Both compute softmax(q k^T / sqrt(d)) v through `F.scaled_dot_product_attention`, which
exports to ONNX as MatMul/Softmax/MatMul (no fast-path-only kernels), so the same module
runs in eager PyTorch, `torch.export` and ONNX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # (B, H, N, C/H)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, N, C)


def multi_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head: (B, N, C) each -> (B, N, C)."""
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    return _merge_heads(F.scaled_dot_product_attention(q, k, v))


class SelfAttentionQKV(nn.Module):
    """HF layout: separate `query`, `key`, `value` Linears (DINOv2 and ViT-MAE)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return multi_head(self.query(x), self.key(x), self.value(x), self.heads)


class AttentionOutput(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class HFAttention(nn.Module):
    """`attention.attention.{query,key,value}` + `attention.output.dense`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = SelfAttentionQKV(dim, heads)
        self.output = AttentionOutput(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class PackedAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameter layout (packed `in_proj_weight`, `out_proj`),
    batch-first self-attention only, without its eval fast path."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(multi_head(q, k, v, self.heads))


class ProjAttention(nn.Module):
    """CLIP/SigLIP layout: `q_proj`, `k_proj`, `v_proj`, `out_proj` Linears (SigLIP2)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(multi_head(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))
