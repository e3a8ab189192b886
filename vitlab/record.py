"""Record what happens inside a vitlab ViT during a forward pass.

    with vitlab.record(model) as rec:
        logits = model(images)
    rec.attentions   # (B, L, h, N, N), each row sums to 1
    rec.tokens       # (B, L, N, D), the tokens after each block
    rec.shapes       # [(step name, shape), ...] in the order the forward pass produced them

Recording switches every attention to the explicit path (the fused kernel never materialises
the probabilities, so a hook there would see nothing), attaches forward hooks (one on the model's
input, one on the model, and one process-wide hook that acts only on the model's own modules) and
keeps their handles. On exit, also when the forward pass raised, every hook is removed and each
attention's path is restored. A recording holds the last forward pass made inside the context.

The attentions and token states are copied into buffers that a recording keeps from one forward
pass to the next, and that a recording no longer referenced hands on to the next one (up to
``SPARE_BYTES``). Holding on to each pass's own tensors instead would make every pass take fresh
memory from the operating system, and on a CPU the page faults of that cost more than the copies.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

from .attention import Attention
from .blocks import MLP, Block
from .embeddings import ClsToken, PositionEmbedding
from .patches import PatchEmbed, patchify
from .taps import Tap

# Modules whose outputs are steps of the shape trace. Dropout, DropPath and Identity are left
# out: they never change a shape.
TRACED = (Tap, nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Softmax, nn.GELU, ClsToken, PositionEmbedding, PatchEmbed,
          Attention, MLP, Block)


SPARE_BYTES = 64 * 2**20  # buffers of finished recordings kept for the next one, at most
_spare: list[torch.Tensor] = []
_spare_lock = threading.Lock()


def _buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device: a spare one if there is one."""
    with _spare_lock:
        for i, spare in enumerate(_spare):
            if spare.shape == shape and spare.dtype == like.dtype and spare.device == like.device:
                return _spare.pop(i)
    with torch.inference_mode(False):  # a normal tensor, so that a later pass outside inference mode can fill it
        return torch.empty(shape, dtype=like.dtype, device=like.device)


def _hand_on(buffers: dict[str, torch.Tensor]) -> None:
    """Called when a recording is garbage-collected: keep its buffers for the next one, newest first,
    while they fit in SPARE_BYTES."""
    with _spare_lock:
        _spare[:0] = buffers.values()
        total = 0
        for i, spare in enumerate(_spare):
            total += spare.numel() * spare.element_size()
            if total > SPARE_BYTES:
                del _spare[i:]
                break


class Recording:
    """What one forward pass of a recorded ViT produced (detached from the autograd graph)."""

    def __init__(self, patch_size: int, keep_all: bool, depth: int = 0) -> None:
        self.patch_size = patch_size
        self.keep_all = keep_all
        self.depth = depth  # blocks of the model: layers the buffers have room for
        # "attentions" (L, B, h, N, N), "tokens" (1+L, B, N, D): layer first, so each copy in is contiguous
        self._buffers: dict[str, torch.Tensor] = {}
        weakref.finalize(self, _hand_on, self._buffers)
        self.reset()

    def reset(self) -> None:
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.images: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.steps: dict[str, torch.Tensor] = {}  # every traced output, with keep_all=True
        self._filled = {"attentions": 0, "tokens": 0}  # layers of each buffer this pass has written

    def _store(self, kind: str, index: int, value: torch.Tensor) -> None:
        """Copy ``value`` (B, ...) into slot ``index`` of the ``kind`` buffer (L, B, ...) or, for the
        tokens, whose slot 0 holds the embeddings, (1+L, B, ...)."""
        shape = (self.depth + (kind == "tokens"), *value.shape)
        buffer = self._buffers.get(kind)
        if buffer is None or buffer.shape != shape or buffer.dtype != value.dtype or buffer.device != value.device:
            buffer = self._buffers[kind] = _buffer(shape, value)
        buffer[index].copy_(value.detach())
        self._filled[kind] = index + 1

    def _read(self, kind: str, start: int = 0) -> torch.Tensor:
        if not self._filled[kind] > start:
            raise RuntimeError("nothing recorded yet: run the model inside the `with vitlab.record(model)` block")
        # clone, not contiguous(): with one image the transposed slice is already contiguous, and a view
        # of the buffer would change under the caller on the next pass
        layers = self._buffers[kind][start : self._filled[kind]]
        return layers.transpose(0, 1).clone(memory_format=torch.contiguous_format)

    @property
    def attentions(self) -> torch.Tensor:
        """(B, L, h, N, N): the attention probabilities of every layer and head."""
        return self._read("attentions")

    @property
    def tokens(self) -> torch.Tensor:
        """(B, L, N, D): the token states after each block."""
        return self._read("tokens", start=1)

    @property
    def embeddings(self) -> torch.Tensor | None:
        """(B, N, D): the input of the first block (patch embeddings, CLS token, position embeddings);
        None before a forward pass reached it."""
        if not self._filled["tokens"]:
            return None
        return self._buffers["tokens"][0].clone()

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


@contextmanager
def record(model: nn.Module, keep_all: bool = False) -> Iterator[Recording]:
    """Record attentions, token states and the shape trace of ``model``'s forward passes.

    ``model`` is a vitlab ``ViT`` (convert timm, torchvision or Hugging Face models with
    ``vitlab.interop`` first). ``keep_all=True`` also keeps every traced tensor in ``rec.steps``.
    """
    named = list(model.named_modules())  # walked once: the walk is most of what entering costs
    attentions = [m for _, m in named if isinstance(m, Attention)]
    if not attentions or not hasattr(model, "blocks") or not hasattr(model, "input"):
        raise ValueError(
            f"expected a vitlab ViT (with vitlab Attention modules); got {type(model).__name__}. "
            "Convert other models with vitlab.interop.from_timm / from_torchvision / from_huggingface"
        )
    rec = Recording(model.config.patch_size, keep_all, depth=len(model.blocks))
    handles = []
    saved_paths = {m: m.fused for m in attentions}
    block_index = {block: i for i, block in enumerate(model.blocks)}
    attend_index = {block.attn.attend: i for i, block in enumerate(model.blocks)}

    def start_pass(module, args):
        rec.reset()
        rec.images = args[0].detach()

    traced = {module: name for name, module in named if name and isinstance(module, TRACED)}

    def on_output(module, args, output):
        name = traced.get(module)
        if name is None:  # a module of another model, or one the trace leaves out
            return
        rec.shapes.append((name, tuple(output.shape)))
        if rec.keep_all:
            rec.steps[name] = output.detach()
        if module in attend_index:
            rec._store("attentions", attend_index[module], output)
        elif module in block_index:
            if block_index[module] == 0:
                rec._store("tokens", 0, args[0])
            rec._store("tokens", 1 + block_index[module], output)

    def on_logits(module, args, output):
        rec.logits = output.detach()
        rec.shapes.append(("logits", tuple(output.shape)))

    try:
        for m in attentions:
            m.fused = False
        handles.append(model.input.register_forward_pre_hook(start_pass))
        # One hook for every module, which looks the module up, rather than a hook on each of the
        # model's hundred-odd modules: registering and removing those took longer than a forward pass
        # of a small batch.
        handles.append(register_module_forward_hook(on_output))
        handles.append(model.register_forward_hook(on_logits))
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        for m, fused in saved_paths.items():
            m.fused = fused
