"""Multi-head self-attention, written as the textbook formula, and local attention masks.

    softmax(q k^T / sqrt(d)) v,   for every head, on q, k, v from one Linear(D, 3*D)

Legend: B batch, N tokens, D model dim, h heads, d head dim (D = h*d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .taps import Tap


def local_window_mask(grid_size: int, window: int, cls_token: bool = True) -> torch.Tensor:
    """(G, k) -> (N, N) bool mask, True where query i may attend to key j; N = [1+] G*G.

    Each patch sees the patches of the ``window`` x ``window`` square centred on it (clipped at the
    border). The CLS token sees every token, and every patch sees the CLS token, so global
    information still flows through it.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd k >= 1; got {window}")
    rows = torch.arange(grid_size).repeat_interleave(grid_size)  # (G*G,) row of each patch
    cols = torch.arange(grid_size).repeat(grid_size)  # (G*G,) column of each patch
    radius = window // 2
    near = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    if not cls_token:
        return near
    mask = torch.ones(grid_size**2 + 1, grid_size**2 + 1, dtype=torch.bool)
    mask[1:, 1:] = near
    return mask


def check_mask(mask: torch.Tensor, batch: int, heads: int, n: int) -> None:
    """Raise ValueError unless ``mask`` is bool, broadcastable to (B, h, N, N), with no all-False row."""
    if mask.dtype != torch.bool:
        raise ValueError(f"expected a bool attention mask (True = may attend); got dtype {mask.dtype}")
    leading = tuple(mask.shape[:-2])
    if (mask.ndim < 2 or tuple(mask.shape[-2:]) != (n, n) or len(leading) > 2
            or any(size not in (1, full) for size, full in zip(leading[::-1], (heads, batch)))):
        raise ValueError(
            f"expected an attention mask broadcastable to (B, h, N, N) = ({batch}, {heads}, {n}, {n}); "
            f"got {tuple(mask.shape)}"
        )
    if not torch.compiler.is_compiling() and not mask.any(-1).all():
        raise ValueError("every query must be allowed to attend to at least one key; the mask has an all-False row")


class Attention(nn.Module):
    """(B, N, D) -> (B, N, D): multi-head scaled dot-product self-attention.

    The explicit path is the formula step by step; its probabilities come out of one named module,
    ``self.attend``, where ``vitlab.record`` reads them. ``fused=True`` computes the same function
    with ``F.scaled_dot_product_attention``, which never forms the probabilities (faster for many
    tokens; nothing to record).
    """

    def __init__(
        self, dim: int, heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads: got dim={dim}, heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5  # 1 / sqrt(d)
        self.fused = fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q, self.k, self.v = Tap(), Tap(), Tap()  # (B, h, N, d) each
        self.scores = Tap()  # (B, h, N, N): q k^T / sqrt(d), masked, before the softmax
        self.attend = nn.Softmax(dim=-1)  # (B, h, N, N): the probabilities, each row sums to 1
        self.attn_drop = nn.Dropout(attn_dropout)
        self.merge = Tap()  # (B, N, D): the heads side by side again
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); ``mask`` is bool, broadcastable to (B, h, N, N), True = may attend."""
        B, N, D = x.shape
        if mask is not None:
            check_mask(mask, B, self.heads, N)
        # 'b n (three h d) -> three (b h n d)': split the projection into q, k, v, then into heads
        q, k, v = (t.view(B, N, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        q, k, v = self.q(q), self.k(k), self.v(v)  # (B, h, N, d)
        if self.fused:
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, N, d)
        else:
            scores = q @ k.transpose(-2, -1) * self.scale  # (B, h, N, N)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = self.attn_drop(self.attend(self.scores(scores)))  # (B, h, N, N)
            out = attn @ v  # (B, h, N, d)
        out = self.merge(out.transpose(1, 2).reshape(B, N, D))  # 'b h n d -> b n (h d)'
        return self.proj_drop(self.proj(out))
