"""Where a model lives: the device of its parameters, which its inputs must be moved to."""

from __future__ import annotations

import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """-> the device of ``model``'s first parameter (a vitlab model keeps all of them on one device)."""
    for parameter in model.parameters():
        return parameter.device
    raise ValueError(f"expected a model with parameters to find its device; got a {type(model).__name__} with none")
