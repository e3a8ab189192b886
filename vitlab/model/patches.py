"""Patches: an image becomes a sequence of flattened patches, then of tokens.

Legend: B batch, C channels, H/W height/width, P patch size, N patches, D model dim.
Flattened patches are ordered (p1 p2 c), as in lucidrains' vit-pytorch:
``rearrange(x, 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)')``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .taps import Tap


def _check_images(images: torch.Tensor, patch_size: int) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W); got a tensor of shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image height and width must be divisible by patch_size={patch_size}; got {height}x{width}"
        )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, P*P*C) with N = (H/P)*(W/P), patches in row-major order."""
    _check_images(images, patch_size)
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(
    patches: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(B, N, P*P*C) -> (B, C, H, W), the inverse of ``patchify``.

    ``grid`` is (rows, columns) of patches; by default the grid is square.
    """
    if patches.ndim != 3:
        raise ValueError(f"expected patches of shape (B, N, P*P*C); got a tensor of shape {tuple(patches.shape)}")
    expected = patch_size * patch_size * channels
    if patches.shape[-1] != expected:
        raise ValueError(
            f"expected patch vectors of length P*P*C = {patch_size}*{patch_size}*{channels} = {expected}; "
            f"got {patches.shape[-1]}"
        )
    n = patches.shape[1]
    if grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"{n} patches do not form a square grid; pass grid=(rows, columns)")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} holds {grid[0] * grid[1]} patches; got {n}")
    return rearrange(
        patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid[0], w=grid[1], p1=patch_size, p2=patch_size
    )


def conv_to_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch weight (D, C, P, P) -> Linear weight (D, P*P*C) acting on ``patchify`` output."""
    return rearrange(weight, "d c p1 p2 -> d (p1 p2 c)")


def linear_to_conv_weight(weight: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Linear patch weight (D, P*P*C) -> Conv2d weight (D, C, P, P); the inverse of ``conv_to_linear_weight``."""
    return rearrange(weight, "d (p1 p2 c) -> d c p1 p2", p1=patch_size, p2=patch_size, c=channels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): cut into P x P patches and project each to D values.

    Two interchangeable forms with the same parameter name ``proj``:
    ``"linear"`` applies ``nn.Linear(P*P*C, D)`` to ``patchify(x)``;
    ``"conv"`` applies ``nn.Conv2d(C, D, kernel_size=P, stride=P)`` and flattens the grid.
    ``load_from(other)`` copies weights across forms so both give the same output.
    """

    def __init__(self, patch_size: int, in_channels: int, dim: int, kind: str = "conv") -> None:
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"kind must be 'conv' or 'linear'; got {kind!r}")
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.kind = kind
        self.patches = Tap()  # (B, N, P*P*C), the flattened patches (linear form only: a conv never forms them)
        if kind == "conv":
            self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        else:
            self.proj = nn.Linear(patch_size * patch_size * in_channels, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D)."""
        _check_images(images, self.patch_size)
        if self.kind == "conv":
            return self.proj(images).flatten(2).transpose(1, 2)  # (B, D, H/P, W/P) -> (B, N, D)
        return self.proj(self.patches(patchify(images, self.patch_size)))  # (B, N, P*P*C) -> (B, N, D)

    def linear_weight(self) -> torch.Tensor:
        """The projection as a (D, P*P*C) matrix acting on flattened patches, whatever the form."""
        w = self.proj.weight
        return conv_to_linear_weight(w) if self.kind == "conv" else w

    @torch.no_grad()
    def load_from(self, other: "PatchEmbed") -> "PatchEmbed":
        """Copy ``other``'s projection into this one, converting between conv and linear forms."""
        if (other.patch_size, other.in_channels) != (self.patch_size, self.in_channels):
            raise ValueError(
                f"expected a PatchEmbed with patch_size={self.patch_size}, in_channels={self.in_channels}; "
                f"got patch_size={other.patch_size}, in_channels={other.in_channels}"
            )
        w = other.linear_weight()
        if self.kind == "conv":
            w = linear_to_conv_weight(w, self.patch_size, self.in_channels)
        self.proj.weight.copy_(w)
        self.proj.bias.copy_(other.proj.bias)
        return self
