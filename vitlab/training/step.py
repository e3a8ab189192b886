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

from .precision import autocast


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
    gradients are clipped to norm ``clip_grad`` (None or 0: not clipped). ``precision="bf16"`` runs the
    forward pass and the loss under ``torch.autocast`` (``vitlab.training.precision``). A non-finite loss raises
    ``FloatingPointError`` before it reaches the gradients or the weights; ``where()`` names the step
    in its message.
    """
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
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad, foreach=True)
    optimizer.step()
    correct = (logits.argmax(dim=-1) == labels).sum().item()
    return value, correct
