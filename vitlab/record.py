"""Record what happens inside a vitlab ViT during a forward pass.

    with vitlab.record(model) as rec:
        logits = model(images)
    rec.attentions   # (B, L, h, N, N), each row sums to 1
    rec.tokens       # (B, L, N, D), the tokens after each block
    rec.shapes       # [(step name, shape), ...] in the order the forward pass produced them

Recording switches every attention to the explicit path (the fused kernel never materialises
the probabilities, so a hook there would see nothing), attaches forward hooks and keeps their
handles. On exit, also when the forward pass raised, every hook is removed and each attention's
path is restored. A recording holds the last forward pass made inside the context.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .attention import Attention
from .blocks import MLP, Block
from .embeddings import ClsToken, PositionEmbedding
from .patches import PatchEmbed, patchify
from .taps import Tap

# Modules whose outputs are steps of the shape trace. Dropout, DropPath and Identity are left
# out: they never change a shape.
TRACED = (Tap, nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Softmax, nn.GELU, ClsToken, PositionEmbedding, PatchEmbed,
          Attention, MLP, Block)


class Recording:
    """What one forward pass of a recorded ViT produced (detached from the autograd graph)."""

    def __init__(self, patch_size: int, keep_all: bool) -> None:
        self.patch_size = patch_size
        self.keep_all = keep_all
        self.reset()

    def reset(self) -> None:
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.images: torch.Tensor | None = None
        self.embeddings: torch.Tensor | None = None  # (B, N, D), the input of the first block
        self.logits: torch.Tensor | None = None
        self.steps: dict[str, torch.Tensor] = {}  # every traced output, with keep_all=True
        self._attentions: list[torch.Tensor] = []
        self._tokens: list[torch.Tensor] = []

    @property
    def attentions(self) -> torch.Tensor:
        """(B, L, h, N, N): the attention probabilities of every layer and head."""
        if not self._attentions:
            raise RuntimeError("nothing recorded yet: run the model inside the `with vitlab.record(model)` block")
        return torch.stack(self._attentions, dim=1)

    @property
    def tokens(self) -> torch.Tensor:
        """(B, L, N, D): the token states after each block."""
        if not self._tokens:
            raise RuntimeError("nothing recorded yet: run the model inside the `with vitlab.record(model)` block")
        return torch.stack(self._tokens, dim=1)

    @property
    def patches(self) -> torch.Tensor:
        """(B, N-1, P*P*C): the flattened patches of the recorded images."""
        if self.images is None:
            raise RuntimeError("nothing recorded yet: run the model inside the `with vitlab.record(model)` block")
        return patchify(self.images, self.patch_size)

    def format_shapes(self) -> str:
        """The shape trace as an aligned two-column text table."""
        width = max((len(name) for name, _ in self.shapes), default=4)
        lines = [f"{'step':<{width}}  shape", f"{'-' * width}  -----"]
        lines += [f"{name:<{width}}  {tuple(shape)}" for name, shape in self.shapes]
        return "\n".join(lines)


def _attention_modules(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


@contextmanager
def record(model: nn.Module, keep_all: bool = False) -> Iterator[Recording]:
    """Record attentions, token states and the shape trace of ``model``'s forward passes.

    ``model`` is a vitlab ``ViT`` (convert timm, torchvision or Hugging Face models with
    ``vitlab.interop`` first). ``keep_all=True`` also keeps every traced tensor in ``rec.steps``.
    """
    attentions = _attention_modules(model)
    if not attentions or not hasattr(model, "blocks") or not hasattr(model, "input"):
        raise ValueError(
            f"expected a vitlab ViT (with vitlab Attention modules); got {type(model).__name__}. "
            "Convert other models with vitlab.interop.from_timm / from_torchvision / from_huggingface"
        )
    rec = Recording(model.config.patch_size, keep_all)
    handles = []
    saved_paths = {m: m.fused for m in attentions}
    block_index = {block: i for i, block in enumerate(model.blocks)}
    attend_index = {block.attn.attend: i for i, block in enumerate(model.blocks)}

    def start_pass(module, args):
        rec.reset()
        rec.images = args[0].detach()

    def on_output(name):
        def hook(module, args, output):
            rec.shapes.append((name, tuple(output.shape)))
            if rec.keep_all:
                rec.steps[name] = output.detach()
            if module in attend_index:
                rec._attentions.append(output.detach())
            elif module in block_index:
                rec._tokens.append(output.detach())
                if block_index[module] == 0:
                    rec.embeddings = args[0].detach()
        return hook

    def on_logits(module, args, output):
        rec.logits = output.detach()
        rec.shapes.append(("logits", tuple(output.shape)))

    try:
        for m in attentions:
            m.fused = False
        handles.append(model.input.register_forward_pre_hook(start_pass))
        for name, module in model.named_modules():
            if name and isinstance(module, TRACED):
                handles.append(module.register_forward_hook(on_output(name)))
        handles.append(model.register_forward_hook(on_logits))
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        for m, fused in saved_paths.items():
            m.fused = fused
