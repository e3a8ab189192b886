"""The optimiser recipe: AdamW with the usual weight-decay split, linear warmup then cosine decay.

Weight decay pulls weights towards zero. That suits the matrices of Linear and Conv layers, but not
biases, LayerNorm gains (decaying them towards 0 switches features off), the CLS token or the position
embeddings (a learned input, not a map), so those go in a group without decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..model.config import check_range, in_range
from ..model.embeddings import ClsToken, PositionEmbedding

NO_DECAY_MODULES = (nn.LayerNorm, ClsToken, PositionEmbedding)  # every parameter of these is left undecayed


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """model -> [{params, weight_decay}, {params, weight_decay: 0.0}]: matrices decay; biases, norms, CLS, pos do not.

    A parameter is left undecayed when it is 0- or 1-dimensional (biases, norm gains) or belongs directly
    to a LayerNorm, ClsToken or PositionEmbedding. Frozen parameters (requires_grad False) are left out.
    """
    check_range("weight_decay", weight_decay, low=0)
    no_decay = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, keep = [], []
    for p in model.parameters():
        if p.requires_grad:
            (keep if p.ndim <= 1 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


class WarmupCosine:
    """step -> lr factor: (step+1)/warmup_steps while warming up, then a cosine from 1 down to 0 at total_steps.

    ``step`` counts the optimizer steps already taken (0 for the first), as ``LambdaLR`` passes it. An
    object rather than a closure, so that ``LambdaLR.state_dict()`` saves ``total_steps`` and
    ``warmup_steps`` and a resumed run follows the same curve.
    """

    def __init__(self, total_steps: int, warmup_steps: int) -> None:
        check_range("total_steps", total_steps, integer=True, low=1)
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}]; got {warmup_steps!r}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adamw(groups: list[dict], lr: float) -> torch.optim.AdamW:
    """param groups -> ``torch.optim.AdamW``, fused (one kernel for every tensor's update) where the
    parameters' device has PyTorch's fused AdamW (CPU and CUDA do), else its foreach form. The same update
    rule either way; for a model of this size the fused step takes a fraction of the per-tensor loop's time."""
    device = next((p.device for group in groups for p in group["params"]), torch.device("cpu"))
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, fused=fused, foreach=None if fused else True)


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, total_steps: int, warmup: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """model -> (AdamW on ``param_groups``, LambdaLR of ``WarmupCosine``); ``warmup``: a fraction of total_steps.

    ``lr``: a finite number > 0; ``weight_decay``: >= 0; ``total_steps``: an int >= 1; ``warmup``: in [0, 1).
    """
    if not in_range(warmup, low=0, high=1, high_open=True):
        raise ValueError(f"warmup is a fraction of the total steps, in [0, 1); got {warmup!r}")
    check_range("lr", lr, low=0, low_open=True)
    optimizer = adamw(param_groups(model, weight_decay), lr)
    schedule = WarmupCosine(total_steps, round(warmup * total_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
