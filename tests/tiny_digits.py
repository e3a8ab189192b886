"""Tiny, learnable stand-ins for MNIST and a tiny ViT, shared by the training, checkpoint and CLI tests."""

import torch

from vitlab.model import ViT
from vitlab.training.data import DigitDataset

TINY = dict(dim=32, depth=2, heads=2, mlp_dim=64)  # a ViT that trains in milliseconds per step


def tiny_digits(n: int = 256, seed: int = 0) -> DigitDataset:
    """n noisy 28x28 uint8 images whose label k (0..9) is their brightness: pixels uniform in [20k, 20k + 60)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randint(0, 60, (n, 28, 28), generator=g)
    return DigitDataset((20 * labels.view(-1, 1, 1) + noise).to(torch.uint8), labels)


def tiny_vit(seed: int = 0, **overrides) -> ViT:
    torch.manual_seed(seed)
    return ViT(**{**TINY, **overrides})
