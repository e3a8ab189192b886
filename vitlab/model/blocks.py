"""Encoder blocks: the ViT pre-norm block and the original Transformer post-norm block.

Legend: B batch, N tokens, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .taps import Tap


class MLP(nn.Module):
    """(B, N, D) -> (B, N, D): Linear(D, mlp_dim), GELU, dropout, Linear(mlp_dim, D), dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """(B, ...) -> (B, ...): stochastic depth. In training, zero a whole sample's residual branch
    with probability ``p`` and scale the kept ones by 1/(1-p); the identity in eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1); got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """(B, N, D) -> (B, N, D): one encoder block.

    ``norm="pre"`` (ViT):     x = x + attn(norm1(x));  x = x + mlp(norm2(x))
    ``norm="post"`` (2017):   x = norm1(x + attn(x));  x = norm2(x + mlp(x))
    """

    def __init__(
        self, dim: int, heads: int, mlp_dim: int, norm: str = "pre", dropout: float = 0.0, attn_dropout: float = 0.0,
        drop_path: float = 0.0, qkv_bias: bool = True, eps: float = 1e-6, fused: bool = False,
    ) -> None:
        super().__init__()
        if norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post'; got {norm!r}")
        self.pre_norm = norm == "pre"
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, attn_dropout=attn_dropout, dropout=dropout, fused=fused)
        self.drop_path1 = DropPath(drop_path)
        self.residual1 = Tap()  # (B, N, D), after the attention's residual add
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = self.residual1(x + self.drop_path1(self.attn(self.norm1(x), mask)))
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        x = self.norm1(self.residual1(x + self.drop_path1(self.attn(x, mask))))
        return self.norm2(x + self.drop_path2(self.mlp(x)))
