"""Mini-batches straight from in-memory tensors: a seeded order, normalised, augmented a whole batch at a time.

MNIST fits in memory, so a batch is one index into the image tensor, one ``data.normalize_batch`` and
one ``data.augment_batch`` call: on a few CPU cores that is far faster than a DataLoader transforming
one PIL image at a time. A DataLoader (your own ``ImageFolder``, say) is passed through as it is.

Legend: B batch, N images, H/W height/width.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from .data import augment_batch, check_elastic, normalize_batch


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DigitDataset-like (``.images``, ``.labels``) or an (images, labels) pair -> the two tensors; else None."""
    if hasattr(data, "images") and hasattr(data, "labels"):
        return torch.as_tensor(data.images), torch.as_tensor(data.labels)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
        if labels.ndim == 1 and images.ndim in (3, 4) and len(images) == len(labels):
            return images, labels
    return None


def check_augment(augment: bool, elastic: float) -> None:
    """Raise ValueError unless ``elastic`` is a warp in pixels >= 0, and 0 when ``augment`` is off."""
    check_elastic(elastic)
    if elastic and not augment:
        raise ValueError(f"elastic={elastic} distorts augmented batches only; got augment=False")


class TensorBatches:
    """Iterable of (B, 1, H, W) float32 normalised images and (B,) int64 labels over in-memory tensors.

    Images are (N, H, W) or (N, 1, H, W), uint8 or floats in [0, 1]. Each pass draws a fresh order from
    ``generator`` when ``shuffle``; the last batch holds the remainder, or is left out with ``drop_last``
    (every batch then has one shape, which a compiled model wants; with ``shuffle`` a different
    remainder is left out each pass). ``augment`` moves every batch by
    ``data.augment_batch`` with ``aug_generator``, adding an elastic distortion of ``elastic`` pixels.
    The tensors move to ``device`` once, up front.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = False,
        generator: torch.Generator | None = None, augment: bool = False, elastic: float = 0.0,
        aug_generator: torch.Generator | None = None, device: torch.device | str | None = None,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"expected as many labels as images, at least one; got {len(images)} and {len(labels)}")
        check_augment(augment, elastic)
        if drop_last and len(labels) < batch_size:
            raise ValueError(f"drop_last needs at least one full batch of {batch_size} images; got {len(labels)}")
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size = batch_size
        self.shuffle, self.generator = shuffle, generator
        self.augment, self.elastic, self.aug_generator = augment, elastic, aug_generator
        self.drop_last = drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.labels) // self.batch_size
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.labels.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = normalize_batch(self.images[index])  # (B, 1, H, W)
            if self.augment:
                images = augment_batch(images, self.aug_generator, self.elastic)
            yield images, self.labels[index]


def make_batches(
    data, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
    augment: bool = False, elastic: float = 0.0, aug_generator: torch.Generator | None = None,
    device: torch.device | str | None = None, drop_last: bool = False,
) -> Iterable:
    """dataset -> iterable of (images, labels) batches.

    In-memory data (an object with ``.images`` (N, H, W) uint8 and ``.labels`` (N,), such as a
    ``DigitDataset``, or an ``(images, labels)`` pair) becomes ``TensorBatches``. Anything else (a
    DataLoader, a list of batches) is returned as it is: its own order and transforms apply, and the
    other arguments are ignored.
    """
    tensors = as_tensors(data)
    if tensors is None:
        return data
    return TensorBatches(*tensors, batch_size, shuffle=shuffle, generator=generator, augment=augment,
                         elastic=elastic, aug_generator=aug_generator, device=device, drop_last=drop_last)


def num_images(data) -> int:
    """In-memory data, a DataLoader or a list of batches -> how many images one pass over it sees."""
    tensors = as_tensors(data)
    if tensors is not None:
        return len(tensors[1])
    if hasattr(data, "dataset"):
        return len(data.dataset)
    return sum(len(labels) for _, labels in data)
