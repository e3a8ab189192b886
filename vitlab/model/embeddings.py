"""The CLS token and position embeddings, and resampling them to another grid.

Legend: B batch, N tokens (1 CLS + G*G patches), G grid side, D model dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClsToken(nn.Module):
    """(B, N, D) -> (B, 1+N, D): prepend one learned D-vector to every sequence."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weight.expand(tokens.shape[0], -1, -1), tokens], dim=1)


def sincos_2d(grid_size: int, dim: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings -> (1, [1+] G*G, D); the CLS entry is zeros.

    Half of D encodes the row, half the column; each half is [sin(pos*w), cos(pos*w)] with
    w = 1 / 10000^(i/(D/4)), as in MAE and the ViT paper's appendix.
    """
    if dim % 4:
        raise ValueError(f"sincos embeddings need dim divisible by 4; got dim={dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (G*G, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (G*G, D/2)

    table = torch.cat([encode(rows), encode(cols)], dim=1).float()  # (G*G, D)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table.unsqueeze(0)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(1, p+G*G, D) -> (1, p+G'*G', D): bicubic resampling of the patch entries; the p prefix (CLS) entries kept."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected position embeddings of shape (1, N, D); got {tuple(pos_embed.shape)}")
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = int(round(patches.shape[1] ** 0.5))
    if old_grid * old_grid != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch position embeddings do not form a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, G, G)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class PositionEmbedding(nn.Module):
    """(B, 1+G*G, D) -> (B, 1+G*G, D): add one D-vector per position (the CLS position included).

    ``kind`` is ``"learned"`` (a parameter), ``"sincos"`` (a fixed buffer) or ``"none"`` (adds nothing).
    """

    def __init__(self, kind: str, grid_size: int, dim: int) -> None:
        super().__init__()
        if kind not in ("learned", "sincos", "none"):
            raise ValueError(f"kind must be 'learned', 'sincos' or 'none'; got {kind!r}")
        self.kind = kind
        self.grid_size = grid_size
        self.dim = dim
        if kind == "learned":
            self.weight = nn.Parameter(torch.zeros(1, 1 + grid_size * grid_size, dim))
            nn.init.trunc_normal_(self.weight, std=0.02)
        elif kind == "sincos":
            self.register_buffer("weight", sincos_2d(grid_size, dim), persistent=False)
        else:
            self.weight = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return tokens
        if tokens.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"expected {self.weight.shape[1]} tokens (1 CLS + {self.grid_size}x{self.grid_size} patches); "
                f"got {tokens.shape[1]}"
            )
        return tokens + self.weight

    @torch.no_grad()
    def resample(self, new_grid: int) -> None:
        """Move to a G' x G' grid: bicubic for learned embeddings, recomputed for sincos."""
        if self.kind == "learned":
            self.weight = nn.Parameter(resample_pos_embed(self.weight.data, new_grid))
        elif self.kind == "sincos":
            self.weight = sincos_2d(new_grid, self.dim).to(self.weight)
        self.grid_size = new_grid
