"""Named places in the forward pass that the recorder can see.

A ``Tap`` is an identity module: it returns its input unchanged, and exists so that
``vitlab.record`` can attach a forward hook to a tensor that no other module outputs
(the q/k/v split, the attention scores, the tokens after adding the CLS token).
With no hook attached it costs one Python call.
"""

from __future__ import annotations

import torch
from torch import nn


class Tap(nn.Module):
    """x -> x, unchanged; a hook point named by its place in the model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
