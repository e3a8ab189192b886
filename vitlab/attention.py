"""Multi-head self-attention with a fused and an explicit path, and attention masks.

Legend: B batch, N tokens, D model dim, h heads, d head dim (D = h*d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .precision import Linear
from .taps import Tap


def local_window_mask(grid_size: int, window: int, cls_token: bool = True) -> torch.Tensor:
    """A (N, N) bool mask, True where query i may attend to key j; N = [1+] G*G.

    Each patch sees the patches of the ``window`` x ``window`` square centred on it (clipped at the
    border). The CLS token sees every token, and every patch sees the CLS token, so global
    information still flows through it.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd k >= 1; got {window}")
    rows = torch.arange(grid_size).repeat_interleave(grid_size)  # (G*G,)
    cols = torch.arange(grid_size).repeat(grid_size)
    radius = window // 2
    near = ((rows[:, None] - rows[None, :]).abs() <= radius) & ((cols[:, None] - cols[None, :]).abs() <= radius)
    if not cls_token:
        return near
    n = grid_size * grid_size + 1
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[1:, 1:] = near
    return mask


def _check_mask(mask: torch.Tensor, batch: int, heads: int, n: int) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"expected a bool attention mask (True = may attend); got dtype {mask.dtype}")
    if mask.shape[-2:] != (n, n):
        raise ValueError(f"expected an attention mask ending in ({n}, {n}); got {tuple(mask.shape)}")
    leading = tuple(mask.shape[:-2])
    if len(leading) > 2 or any(size not in (1, full) for size, full in zip(leading[::-1], (heads, batch))):
        raise ValueError(
            f"expected an attention mask broadcastable to (B, h, N, N) = ({batch}, {heads}, {n}, {n}); "
            f"got {tuple(mask.shape)}"
        )
    if not torch.compiler.is_compiling() and not mask.any(-1).all():
        raise ValueError("every query must be allowed to attend to at least one key; the mask has an all-False row")


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a forward hook of its own (process-wide hooks do not count)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class Softmax(nn.Softmax):
    """``nn.Softmax`` that runs vitlab's kernel (``kernels.row_softmax``) where it applies: without
    autograd, over the last dim of a contiguous float32 CPU tensor of up to ``kernels.MAX_TOKENS``
    columns, such as attention scores in inference or recording. The same function; elsewhere exactly
    ``nn.Softmax`` (with autograd the kernel's faster forward did not make up for its custom op's cost
    in the backward pass: benchmarks/attention_kernels.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _needs_grad(x) and kernels.softmax_applies(x, self.dim):
            return kernels.row_softmax(x)
        return super().forward(x)


class Attention(nn.Module):
    """(B, N, D) -> (B, N, D): multi-head scaled dot-product self-attention.

    One ``Linear(D, 3*D)`` gives q, k and v. ``fused=False`` runs the explicit path, whose
    probabilities come out of one named module, ``self.attend``, where the recorder reads them.
    ``fused=True`` never shows the probabilities: on a CPU, in float32, without a mask or attention
    dropout and for up to ``kernels.MAX_TOKENS`` tokens it runs vitlab's own kernel
    (``vitlab.kernels``, where it can be built; it takes the q/k/v product in bf16 where
    ``precision.matmuls_in`` makes it bf16), elsewhere ``F.scaled_dot_product_attention``. The
    explicit path runs on kernels of the same source where no autograd is needed. Every path computes
    the same function.
    """

    def __init__(
        self, dim: int, heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads: got dim={dim}, heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.q, self.k, self.v = Tap(), Tap(), Tap()  # (B, h, N, d) each
        self.scores = Tap()  # (B, h, N, N), scaled and masked, before the softmax
        self.attend = Softmax(dim=-1)  # (B, h, N, N), rows sum to 1
        self.attn_drop = nn.Dropout(attn_dropout)
        self.merge = Tap()  # (B, N, D), the heads concatenated
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); ``mask`` is bool, broadcastable to (B, h, N, N), True = may attend."""
        B, N, D = x.shape
        if mask is not None:
            _check_mask(mask, B, self.heads, N)
        if self.fused and mask is None and self._kernel_applies(x):
            # Where both products run in bf16 (precision.matmuls_in), the kernel reads and writes bf16
            # itself: the same numbers as casting to float32 and back around it, without those passes.
            # A hook on either projection sees them as before: called as modules, in float32.
            in_product_dtype = self.qkv.matmul_dtype == self.proj.matmul_dtype and not _hooked(self.qkv, self.proj)
            qkv = self.qkv.product(x) if in_product_dtype else self.qkv(x)
            return self.proj_drop(self.proj(kernels.small_attention(qkv, self.heads, self.scale)))
        # 'b n (three h d) -> three (b h n d)': chunk, not indexing, so that the backward pass
        # concatenates the three gradients instead of zero-filling and adding three full-size tensors.
        q, k, v = (t.view(B, N, self.heads, self.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        q, k, v = self.q(q), self.k(k), self.v(v)  # (B, h, N, d)
        if self.fused:
            p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, h, N, d)
        else:
            # Without autograd (inference, recording) vitlab's kernels take q, k and v as the taps hand
            # them on (views of the projection) and compute the expressions beside them without first
            # copying the views. With autograd the matmuls are faster: their backward reuses those copies.
            products = not _needs_grad(q, k, v) and kernels.heads_apply(q, k, v)
            # (B, h, N, N). q is scaled first: the product needs a contiguous copy of the q view anyway
            scores = kernels.head_scores(q, k, self.scale) if products else (q * self.scale) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            attn = self.attn_drop(self.attend(self.scores(scores)))  # (B, h, N, N)
            out = kernels.head_weighted_sum(attn, v) if products else attn @ v  # (B, h, N, d)
        out = self.merge(out.transpose(1, 2).reshape(B, N, D))  # 'b h n d -> b n (h d)'
        return self.proj_drop(self.proj(out))

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """Whether the fused path may run vitlab's kernel, which skips the q, k, v and merge taps: only
        with no hook of their own on them (hooks on every module, as FlopCounterMode sets, do not count)
        and no attention dropout to apply."""
        if self.training and self.attn_drop.p > 0:
            return False
        if _hooked(self.q, self.k, self.v, self.merge):
            return False
        return kernels.applies(x, self.heads)
