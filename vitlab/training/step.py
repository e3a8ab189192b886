"""One optimizer step on one batch: forward, loss, a check that the loss is finite, backward,
clipping, update. ``training.train_one_epoch`` runs it for every batch, and ``budget.time_steps``
times it, so the time a budget is planned with is the time of the step that trains.

Legend: B batch, K classes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.config import check_range
from .precision import autocast


def check_clip_grad(clip_grad: float | None) -> None:
    """Raise ValueError unless ``clip_grad`` is a finite number > 0 or None (no clipping).

    A negative norm is not "no clipping": ``clip_grad_norm_`` would scale every gradient by a negative
    factor, and the optimizer would climb the loss instead of descending it."""
    check_range("clip_grad", clip_grad, low=0, low_open=True, none="no clipping")


def check_label_smoothing(label_smoothing: float) -> None:
    """Raise ValueError unless ``label_smoothing`` is a number in [0, 1) (0: none; 1 would leave nothing to learn)."""
    check_range("label_smoothing", label_smoothing, low=0, high=1, high_open=True)


def train_step(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    label_smoothing: float = 0.0,
    clip_grad: float | None = None,
    precision: str = "fp32",
    where: Callable[[], str] = lambda: "this step",
) -> tuple[float, int]:
    """(B, C, H, W) images, (B,) labels -> (loss, correct): the batch's mean cross-entropy (with
    ``label_smoothing``) before the update, and how many of its B images the logits classified right.

    ``forward`` computes the (B, K) logits (``model`` itself, or a compiled ``model``); ``model``'s
    gradients are clipped to norm ``clip_grad`` (> 0, or None: not clipped). ``precision="bf16"`` runs the
    forward pass and the loss under ``torch.autocast`` (``vitlab.training.precision``). A non-finite loss raises
    ``FloatingPointError`` before it reaches the gradients or the weights; ``where()`` names the step
    in its message.
    """
    check_clip_grad(clip_grad)
    with autocast(images.device, precision):
        logits = forward(images)  # (B, K)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(
            f"non-finite training loss {value} at {where()}; "
            "a lower lr, a smaller clip_grad or checking the inputs for NaN usually helps"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
    optimizer.step()
    correct = (logits.argmax(dim=-1) == labels).sum().item()
    return value, correct
