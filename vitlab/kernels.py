"""vitlab's own CPU kernels for attention at short token counts.

At the token counts of small images (17 for MNIST with 7-pixel patches) neither attention in PyTorch
runs near the machine's speed: ``F.scaled_dot_product_attention`` is tuned for long sequences, and
the explicit path spends most of its time on copies that put the heads first and back, and on
17-wide softmax rows. ``csrc/small_attention.cpp`` does the whole of the fused path, forward and
backward, 16 images and one head at a time (one image per vector lane), reading q, k and v straight
out of the q/k/v projection and writing the merged heads straight out (``small_attention``). The same
source gives the explicit path its pieces without autograd: ``head_scores``, ``row_softmax`` and
``head_weighted_sum``. It is compiled for one token count and head size on first use (a C++ compiler
with OpenMP, such as g++, is needed; about a second), cached on disk (``vitlab.build``), and loaded
with ctypes. Where it cannot be built, or where ``VITLAB_KERNELS=0``, ``available`` says False and both
paths run on PyTorch's ops as before.

Legend: B batch, N tokens, h heads, d head dim, D = h*d.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import threading
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from . import build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "small_attention.cpp"
MAX_TOKENS = 64  # the kernel keeps a few N x N and N x d tiles of 16-image vectors per thread
LANES = 16  # images per vector: the kernel works on groups of 16 images, one image per lane
HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128)  # whole 16-float vectors
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_lock = threading.Lock()
_libraries: dict[tuple[int, int], ctypes.CDLL | None] = {}
errors: dict[tuple[int, int], str] = {}  # (N, d) -> why the kernel for it could not be built


def enabled() -> bool:
    """False where the environment variable VITLAB_KERNELS is 0 (or "false", "no", "off")."""
    return os.environ.get("VITLAB_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def supports(tokens: int, head_dim: int) -> bool:
    """Whether the kernel is written for N = ``tokens`` and d = ``head_dim`` (it may still fail to build)."""
    return 1 <= tokens <= MAX_TOKENS and head_dim in HEAD_DIMS


def _build(tokens: int, head_dim: int) -> ctypes.CDLL:
    defines = (f"-DTOKENS={tokens}", f"-DHEAD_DIM={head_dim}")
    lib = ctypes.CDLL(str(build.shared_library(SOURCE, f"small_attention_n{tokens}_d{head_dim}", FLAGS + defines)))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.attn_forward.argtypes = [pointer, pointer, pointer, size, size, ctypes.c_float, ctypes.c_int]
    lib.attn_backward.argtypes = [pointer, pointer, pointer, pointer, size, size, ctypes.c_float, ctypes.c_int]
    lib.attn_forward_bf16.argtypes = lib.attn_forward.argtypes
    lib.attn_backward_bf16.argtypes = lib.attn_backward.argtypes
    lib.softmax_rows.argtypes = [pointer, pointer, size, ctypes.c_int]
    lib.head_scores.argtypes = [pointer, pointer, pointer, pointer, pointer, size, size, ctypes.c_float, ctypes.c_int]
    lib.head_weighted_sum.argtypes = [pointer, pointer, pointer, pointer, size, size, ctypes.c_int]
    for function in (lib.attn_forward, lib.attn_backward, lib.attn_forward_bf16, lib.attn_backward_bf16,
                     lib.softmax_rows, lib.head_scores, lib.head_weighted_sum):
        function.restype = None
    return lib


def _library(tokens: int, head_dim: int) -> ctypes.CDLL | None:
    key = (tokens, head_dim)
    if key not in _libraries:
        with _lock:
            if key not in _libraries:
                try:
                    _libraries[key] = _build(tokens, head_dim)
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    _libraries[key], errors[key] = None, str(error)
                    log.info("vitlab's small-attention kernel is not available for N=%d, d=%d: %s",
                             tokens, head_dim, error)
    return _libraries[key]


def available(tokens: int, head_dim: int) -> bool:
    """Whether the kernel runs here for N = ``tokens``, d = ``head_dim``: enabled, written for that size,
    and built (the first call for a size builds it; ``errors`` says why a build failed)."""
    return enabled() and supports(tokens, head_dim) and _library(tokens, head_dim) is not None


def applies(x: torch.Tensor, heads: int) -> bool:
    """Whether ``small_attention`` can take the q/k/v of the (B, N, D) tokens ``x``: float32 on a CPU,
    and ``available`` for its N and d."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 3
            and available(x.shape[1], x.shape[2] // heads))


def _groups(batch: int) -> int:
    return -(-batch // LANES)


def probabilities(probs: torch.Tensor, batch: int) -> torch.Tensor:
    """The kernel's saved probabilities, (G, h, N, N, 16) with image b in lane b % 16 of group b // 16,
    as (B, h, N, N)."""
    G, heads, N, _, lanes = probs.shape
    return probs.permute(0, 4, 1, 2, 3).reshape(G * lanes, heads, N, N)[:batch]


DTYPES = (torch.float32, torch.bfloat16)  # of q, k, v and the output; the arithmetic is float32 either way


def _check_dtype(qkv: torch.Tensor) -> None:
    if qkv.dtype not in DTYPES:
        raise ValueError(f"the attention kernel takes q/k/v in float32 or bfloat16; got {qkv.dtype}")


def _forward(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_dtype(qkv)
    qkv = qkv.contiguous()
    B, N, three_d = qkv.shape
    D = three_d // 3
    out, probs = qkv.new_empty(B, N, D), qkv.new_empty(_groups(B), heads, N, N, LANES, dtype=torch.float32)
    lib = _library(N, D // heads)
    forward = lib.attn_forward_bf16 if qkv.dtype == torch.bfloat16 else lib.attn_forward
    forward(qkv.data_ptr(), out.data_ptr(), probs.data_ptr(), B, heads, scale, torch.get_num_threads())
    return out, probs


def _backward(qkv: torch.Tensor, probs: torch.Tensor, grad_out: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    _check_dtype(qkv)
    qkv, probs, grad_out = qkv.contiguous(), probs.contiguous(), grad_out.to(qkv.dtype).contiguous()
    B, N, three_d = qkv.shape
    grad_qkv = torch.empty_like(qkv)
    lib = _library(N, three_d // 3 // heads)
    backward = lib.attn_backward_bf16 if qkv.dtype == torch.bfloat16 else lib.attn_backward
    backward(qkv.data_ptr(), probs.data_ptr(), grad_out.data_ptr(), grad_qkv.data_ptr(), B, heads, scale,
             torch.get_num_threads())
    return grad_qkv


# The ops are named for the layout of the probabilities they save ("grouped": 16 images to a vector).
# torch.compile's on-disk caches key compiled graphs on op names, not on the fake functions below, so a
# change of that layout needs new names, or a warm cache would replay graphs built for the old one.
@torch.library.custom_op("vitlab::grouped_attention", mutates_args=())
def _small_attention_op(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(qkv, heads, scale)


@_small_attention_op.register_fake
def _(qkv, heads, scale):
    B, N, three_d = qkv.shape
    return qkv.new_empty(B, N, three_d // 3), qkv.new_empty(_groups(B), heads, N, N, LANES, dtype=torch.float32)


@torch.library.custom_op("vitlab::grouped_attention_backward", mutates_args=())
def _small_attention_backward_op(qkv: torch.Tensor, probs: torch.Tensor, grad_out: torch.Tensor, heads: int,
                                 scale: float) -> torch.Tensor:
    return _backward(qkv, probs, grad_out, heads, scale)


@_small_attention_backward_op.register_fake
def _(qkv, probs, grad_out, heads, scale):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, heads, scale = inputs
    ctx.save_for_backward(qkv, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zeros for the probabilities' gradient, which is never used
    ctx.heads, ctx.scale = heads, scale


def _grad(ctx, grad_out, grad_probs):
    if grad_out is None:
        return None, None, None
    qkv, probs = ctx.saved_tensors
    return _small_attention_backward_op(qkv, probs, grad_out, ctx.heads, ctx.scale), None, None


_small_attention_op.register_autograd(_grad, setup_context=_setup_context)


@register_flop_formula(torch.ops.vitlab.grouped_attention)
def _forward_flops(qkv_shape, heads, scale, *args, **kwargs) -> int:
    """What torch.utils.flop_counter counts for the two batched products the kernel does: q k^T and p v."""
    B, N, three_d = qkv_shape
    return 2 * (2 * B * N * N * (three_d // 3))


@register_flop_formula(torch.ops.vitlab.grouped_attention_backward)
def _backward_flops(qkv_shape, *args, **kwargs) -> int:
    """The backward pass's four: the gradients of p, v, q and k."""
    B, N, three_d = qkv_shape
    return 4 * (2 * B * N * N * (three_d // 3))


def small_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """(B, N, 3*D) q/k/v projection -> (B, N, D) heads merged: softmax(q k^T * scale) v per head, the
    function of ``Attention``'s explicit path without a mask. Needs ``applies`` to hold for the tokens.

    ``qkv`` is float32, or bfloat16 where the products around the attention run in bf16
    (``vitlab.precision``): then the output is bf16 too, rounded to nearest even, the scores, softmax
    and sums in between are float32, and the result is exactly what casting q, k, v to float32, running
    in float32 and casting the output back gives, without the two casts' passes over memory."""
    return _small_attention_op(qkv, heads, scale)[0]


def softmax_applies(x: torch.Tensor, dim: int) -> bool:
    """Whether ``row_softmax`` can take ``x`` for a softmax over ``dim``: the last dim of a contiguous,
    non-empty float32 CPU tensor, with a kernel ``available`` for its length (rows of up to MAX_TOKENS)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim >= 1 and dim in (-1, x.ndim - 1)
            and x.numel() > 0 and x.is_contiguous() and available(x.shape[-1], HEAD_DIMS[0]))


@torch.library.custom_op("vitlab::row_softmax", mutates_args=())
def _row_softmax_op(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    _library(n, HEAD_DIMS[0]).softmax_rows(x.data_ptr(), y.data_ptr(), x.numel() // n, torch.get_num_threads())
    return y


@_row_softmax_op.register_fake
def _(x):
    return torch.empty_like(x)


def _row_softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _row_softmax_grad(ctx, grad):
    (y,) = ctx.saved_tensors
    return torch._softmax_backward_data(grad, y, -1, y.dtype)  # y * (grad - sum(grad * y))


_row_softmax_op.register_autograd(_row_softmax_grad, setup_context=_row_softmax_setup)


def row_softmax(x: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (..., N): ``torch.softmax(x, -1)``, 16 rows at a time (one row per vector lane), with
    ``torch.softmax``'s gradient. Needs ``softmax_applies(x, -1)``. PyTorch's own softmax handles one
    short row at a time, and at N = 17 spends more time on that than on the exponentials."""
    return _row_softmax_op(x)


def heads_apply(*heads: torch.Tensor) -> bool:
    """Whether ``head_scores`` and ``head_weighted_sum`` can take these (B, h, N, d) tensors (q, k, v):
    float32 on a CPU, each head row contiguous, and ``available`` for their N and d."""
    first = heads[0]
    return (first.ndim == 4 and first.numel() > 0
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.shape == first.shape
                    and t.stride(3) == 1 for t in heads)
            and available(first.shape[2], first.shape[3]))  # last: it builds the kernel on first use


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(*t.stride()[:3])


@torch.library.custom_op("vitlab::head_scores", mutates_args=())
def _head_scores_op(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    B, heads, N, d = q.shape
    scores = q.new_empty(B, heads, N, N)
    _library(N, d).head_scores(q.data_ptr(), k.data_ptr(), _strides(q), _strides(k), scores.data_ptr(), B, heads,
                               scale, torch.get_num_threads())
    return scores


@_head_scores_op.register_fake
def _(q, k, scale):
    B, heads, N, d = q.shape
    return q.new_empty(B, heads, N, N)


def _head_scores_setup(ctx, inputs, output):
    q, k, scale = inputs
    ctx.save_for_backward(q, k)
    ctx.scale = scale


def _head_scores_grad(ctx, grad):
    q, k = ctx.saved_tensors
    grad = grad * ctx.scale
    return grad @ k, grad.transpose(-2, -1) @ q, None


_head_scores_op.register_autograd(_head_scores_grad, setup_context=_head_scores_setup)


@torch.library.custom_op("vitlab::head_weighted_sum", mutates_args=())
def _head_weighted_sum_op(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    attn = attn.contiguous()
    B, heads, N, d = v.shape
    out = v.new_empty(B, N, heads, d)
    _library(N, d).head_weighted_sum(attn.data_ptr(), v.data_ptr(), _strides(v), out.data_ptr(), B, heads,
                                     torch.get_num_threads())
    return out.transpose(1, 2)


@_head_weighted_sum_op.register_fake
def _(attn, v):
    B, heads, N, d = v.shape
    return v.new_empty(B, N, heads, d).transpose(1, 2)


def _head_weighted_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _head_weighted_sum_grad(ctx, grad):
    attn, v = ctx.saved_tensors
    return grad @ v.transpose(-2, -1), attn.transpose(-2, -1) @ grad


_head_weighted_sum_op.register_autograd(_head_weighted_sum_grad, setup_context=_head_weighted_sum_setup)


@register_flop_formula(torch.ops.vitlab.head_scores)
def _head_scores_flops(q_shape, *args, **kwargs) -> int:
    """What torch.utils.flop_counter counts for q @ k^T."""
    B, heads, N, d = q_shape
    return 2 * B * heads * N * N * d


@register_flop_formula(torch.ops.vitlab.head_weighted_sum)
def _head_weighted_sum_flops(attn_shape, v_shape, *args, **kwargs) -> int:
    """What torch.utils.flop_counter counts for attn @ v."""
    B, heads, N, d = v_shape
    return 2 * B * heads * N * N * d


def head_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, h, N, d) q and k -> (B, h, N, N) ``scale * q @ k^T``, read straight from views of the q/k/v
    projection (no copies), 16 images at a time. Needs ``heads_apply(q, k)``."""
    return _head_scores_op(q, k, scale)


def head_weighted_sum(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, h, N, N) weights and (B, h, N, d) v -> (B, h, N, d) ``attn @ v``, stored heads-merged: the
    result is a view of (B, N, h, d) memory, so that merging the heads copies nothing. Needs
    ``heads_apply(v)``."""
    return _head_weighted_sum_op(attn, v)
