"""Record what happens inside a vitlab ViT during a forward pass.

    with vitlab.record(model) as rec:
        logits = model(images)
    rec.attentions   # (B, L, h, N, N), each row sums to 1
    rec.tokens       # (B, L, N, D), the tokens after each block
    rec.shapes       # [(step name, shape), ...] in the order the forward pass produced them

Recording switches every attention to the explicit path (the fused one never forms the
probabilities, so there would be nothing to see), attaches a forward hook to each module of the
model that makes a step, and keeps the hooks' handles. On exit, also when the forward pass raised,
every hook is removed, and when no other recording of the model is open, each attention goes back
to the path it had. A recording holds the last forward pass made inside the context.

What a recording keeps grows with the batch: B * (L * h * N * N + (L + 1) * N * D) floats for the
attentions and the tokens (``recorded_bytes``): 58 kB per image for the default MNIST model, 30 MB
per image for a ViT-B/16 at 224 pixels. ``record(model, max_bytes=2**30)`` refuses a pass
that would keep more than ``max_bytes``, before it starts, saying how many bytes it needs: record
fewer images at a time, or pass a larger ``max_bytes``. ``rec.attentions`` and ``rec.tokens`` are
stacked on first reading, the per-layer pieces released, so reading them does not double the memory.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..model.blocks import DropPath
from ..model.patches import patchify
from ..model.vit import ViT

MAX_BYTES = 2**30  # what record keeps of one pass (attentions + tokens), unless told otherwise
MAIN_STEPS = ("patch_embed", "cls_token", "pos_embed", "norm", "pool", "head")  # traced besides the blocks
SKIPPED = (nn.Dropout, DropPath, nn.Identity, nn.ModuleList)  # they never change a shape: not steps of the trace

_open: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [thread id, open recordings, paths]
_open_lock = threading.Lock()


class Recording:
    """What one forward pass of a recorded ViT produced, detached from the autograd graph."""

    def __init__(self, patch_size: int, keep_all: bool = False) -> None:
        self.patch_size = patch_size
        self.keep_all = keep_all
        self.reset()

    def reset(self) -> None:
        self.images: torch.Tensor | None = None  # (B, C, H, W)
        self.logits: torch.Tensor | None = None  # (B, num_classes), or (B, D) for a model without a head
        self.shapes: list[tuple[str, tuple[int, ...]]] = []
        self.steps: dict[str, torch.Tensor] = {}  # every step's output, with keep_all=True
        self.embeddings: torch.Tensor | None = None  # (B, N, D): the first block's input
        self._attentions: list[torch.Tensor] = []  # L of (B, h, N, N)
        self._tokens: list[torch.Tensor] = []  # L of (B, N, D)
        self._stacked: dict[str, torch.Tensor] = {}  # "attentions" / "tokens" -> the stacked tensor, once read

    def _stack(self, name: str, layers: list[torch.Tensor]) -> torch.Tensor:
        """The layers stacked along dim 1, once: the stack is kept and the per-layer pieces let go (unless
        ``keep_all`` holds them in ``steps``), so reading twice costs neither time nor a second copy."""
        if name not in self._stacked:
            if not layers:
                raise RuntimeError("nothing recorded yet: run the model inside the `with vitlab.record(model)` block")
            self._stacked[name] = torch.stack(layers, dim=1)
            layers.clear()
        return self._stacked[name]

    @property
    def attentions(self) -> torch.Tensor:
        """(B, L, h, N, N): the attention probabilities of every layer and head."""
        return self._stack("attentions", self._attentions)

    @property
    def tokens(self) -> torch.Tensor:
        """(B, L, N, D): the token states after each block."""
        return self._stack("tokens", self._tokens)

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


def recorded_bytes(model: ViT, batch: int) -> int:
    """What recording one pass of ``batch`` images keeps: the attentions (B, L, h, N, N) and tokens (B, L+1, N, D)."""
    c = model.config
    per_image = c.depth * c.heads * c.num_tokens**2 + (c.depth + 1) * c.num_tokens * c.dim
    return batch * per_image * model.cls_token.weight.element_size()


@contextmanager
def record(
    model: nn.Module, every_step: bool = False, keep_all: bool = False, max_bytes: int = MAX_BYTES,
) -> Iterator[Recording]:
    """Record attentions, token states and the shape trace of ``model``'s forward passes.

    ``model`` is a vitlab ``ViT`` (convert timm, torchvision or Hugging Face models with
    ``vitlab.interop`` first). The shape trace lists the main steps (input, patch embedding, CLS
    token, positions, each block and its attention, final norm, pooling, head, logits);
    ``every_step=True`` lists every module's output (q, k, v, scores, the MLP, ...), and
    ``keep_all=True`` does too and keeps each of those outputs in ``rec.steps``. The main steps
    alone cost less: each hooked module runs PyTorch's slower call path.
    ``max_bytes`` (a positive int, default 2**30 = 1 GiB) bounds what one pass keeps: a pass whose
    attentions and tokens would take more (``recorded_bytes``) raises ValueError before it starts,
    naming the bytes it needs; record fewer images at a time, or pass a larger ``max_bytes``.
    Recordings of one model may be nested; a second thread may not record it meanwhile.
    """
    if hasattr(model, "_orig_mod"):
        raise ValueError("record the model itself, not the torch.compile'd wrapper: `with vitlab.record(model)`; "
                         "recording needs hooks that a compiled graph does not run")
    if not isinstance(model, ViT):
        raise ValueError(f"expected a vitlab ViT (vitlab.ViT); got {type(model).__name__}. Convert other models with "
                         "vitlab.interop.from_timm / from_torchvision / from_huggingface")
    if not (isinstance(max_bytes, int) and not isinstance(max_bytes, bool) and max_bytes > 0):
        raise ValueError(f"max_bytes must be a positive int; got {max_bytes!r}")
    rec = Recording(model.config.patch_size, keep_all)
    attend = {block.attn.attend for block in model.blocks}
    blocks = set(model.blocks)

    def start_pass(module, args):
        needed = recorded_bytes(model, args[0].shape[0])
        if needed > max_bytes:
            raise ValueError(
                f"recording {args[0].shape[0]} images needs {needed:,} bytes; max_bytes is {max_bytes:,}. "
                "Record fewer images at a time, or pass a larger max_bytes to vitlab.record"
            )
        rec.reset()
        rec.images = args[0].detach()
        rec.shapes.append(("input", tuple(args[0].shape)))
        if keep_all:
            rec.steps["input"] = rec.images

    def step(name):
        def hook(module, args, output):
            rec.shapes.append((name, tuple(output.shape)))
            if keep_all:
                rec.steps[name] = output.detach()
            if module in attend:
                rec._attentions.append(output.detach())
            elif module in blocks:
                if rec.embeddings is None:
                    rec.embeddings = args[0].detach()
                rec._tokens.append(output.detach())
        return hook

    def end_pass(module, args, output):
        rec.logits = output.detach()
        rec.shapes.append(("logits", tuple(output.shape)))

    _enter(model)
    handles = []
    try:
        handles.append(model.input.register_forward_pre_hook(start_pass))  # also for forward_features
        if every_step or keep_all:
            steps = [(name, m) for name, m in model.named_modules() if name and name != "input"]
        else:  # looked up by name, not by walking the model's hundred-odd modules: at batch 1 the walk shows
            steps = [(name, getattr(model, name)) for name in MAIN_STEPS[:3]]
            for i, block in enumerate(model.blocks):
                steps += [(f"blocks.{i}.attn.attend", block.attn.attend), (f"blocks.{i}", block)]
            steps += [(name, getattr(model, name)) for name in MAIN_STEPS[3:]]
        handles += [m.register_forward_hook(step(name)) for name, m in steps if not isinstance(m, SKIPPED)]
        handles.append(model.register_forward_hook(end_pass))
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        _leave(model)


def _enter(model: ViT) -> None:
    """Count this recording as open on ``model``; the first one saves each attention's path and
    switches it to the explicit one."""
    with _open_lock:
        state = _open.get(model)
        if state is not None and state[0] != threading.get_ident():
            raise RuntimeError("this model is being recorded in another thread; record a copy of it "
                               "(copy.deepcopy(model)) or wait until that recording ends")
        if state is None:
            attentions = [block.attn for block in model.blocks]
            state = _open[model] = [threading.get_ident(), 0, {m: m.fused for m in attentions}]
            for m in attentions:
                m.fused = False
        state[1] += 1


def _leave(model: ViT) -> None:
    """The last open recording of ``model`` puts every attention back on the path it had."""
    with _open_lock:
        state = _open[model]
        state[1] -= 1
        if state[1] == 0:
            for m, fused in state[2].items():
                m.fused = fused
            del _open[model]
