"""bf16 Linear products on a CPU's AMX tiles: what ``precision.Linear`` runs in bf16 where it can.

At a small ViT's shapes (2,176 rows of 64-192 features for MNIST at batch 128) a bf16 product through
``F.linear`` and oneDNN spends about as long getting ready (some 15 us a call) and, in the backward pass,
reading an operand transposed, as multiplying. ``csrc/amx_linear.cpp`` does each product in one pass on
the tiles: it rounds the float32 weight to bf16 and packs it as it reads it, adds the bias and rounds on
the way out, and packs the weight gradient's operands once, each thread its own share of the rows.
Measured at the MNIST model's four shapes (``benchmarks/amx_products.py``, RESULTS.md): the forward
products 1.5-2.2x and the backward ones 1.5-2.2x as fast as ``F.linear``'s.

``linear(x, weight, bias)`` is ``F.linear(x, weight.bfloat16(), bias.bfloat16())`` for a bf16 ``x``, up to
the order in which the float32 sums are taken; its gradient gives the weight's and the bias's summed in
float32 over every row and rounded once (``F.linear``'s bf16 gradient rounds them to bf16 first).

The operators are compiled on first use against the installed PyTorch's headers (a C++ compiler that
knows AMX, such as g++ 11 or later, is needed; about 8 s) and cached (``vitlab.build``). They run only
where the CPU has AMX-BF16 and Linux grants the process the tile state; elsewhere, or where
``VITLAB_KERNELS=0``, ``available`` says False and the products run on ``F.linear``.

Legend: M rows (every leading dim of x flattened), K in features, N out features.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch.utils.flop_counter import register_flop_formula

from . import build, kernels

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "amx_linear.cpp"
FLAGS = ("-O3", "-march=native", "-mamx-tile", "-mamx-bf16", "-fopenmp", "-shared", "-fPIC", "-std=c++20")

_lock = threading.Lock()
_state: dict[str, bool] = {}
error: str | None = None  # why the operators could not be built or loaded, once that failed


def cpu_has_amx() -> bool:
    """Whether this CPU multiplies bf16 on AMX tiles (as PyTorch reads its capabilities)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("amx_bf16"))


def _load() -> None:
    if sys.platform != "linux":
        raise RuntimeError(f"the AMX products are built for Linux, which grants the tile state; this is {sys.platform}")
    path = build.shared_library(SOURCE, "amx_linear", FLAGS + build.torch_flags(), key=build.torch_key(),
                                libraries=("-lc10", "-ltorch_cpu"))
    torch.ops.load_library(str(path))
    _register()
    x = torch.ones(1, 32, dtype=torch.bfloat16)
    torch.ops.vitlab.amx_linear(x, torch.ones(16, 32), None)  # raises where Linux refuses the tiles


def available() -> bool:
    """Whether ``linear`` runs here: enabled (``VITLAB_KERNELS``), a CPU with AMX-BF16, and the operators
    built and loaded (the first call builds them; ``error`` says why that failed)."""
    if not kernels.enabled():
        return False
    if "loaded" not in _state:  # once; later calls (also inside a torch.compile trace) read the answer
        _try_load()
    return _state["loaded"]


def _try_load() -> None:
    global error
    with _lock:
        if "loaded" in _state:
            return
        if not cpu_has_amx():
            _state["loaded"], error = False, "this CPU has no AMX-BF16"
            return
        try:
            _load()
            _state["loaded"] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as failure:
            _state["loaded"], error = False, str(failure)
            log.info("vitlab's AMX products are not available: %s", failure)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` can take input ``x`` and ``weight``: CPU tensors, a float32 or bf16 2-D weight,
    x with at least one dim, and ``available``."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.ndim >= 1 and weight.ndim == 2
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype in (torch.float32, torch.bfloat16)
            and available())  # last: it builds the operators on first use


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., K) -> (..., N) bf16: ``x`` (rounded to bf16 if it is not) times the (N, K) ``weight``
    rounded to bf16, transposed, plus ``bias`` rounded to bf16; float32 sums, rounded once at the end.
    Differentiable in all three. Needs ``applies(x, weight)``."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected input (..., {weight.shape[1]}) for a weight of shape {tuple(weight.shape)}; "
                         f"got {tuple(x.shape)}")
    return torch.ops.vitlab.amx_linear(x.to(torch.bfloat16), weight, bias)


def _register() -> None:
    """Shapes for torch.compile, the gradient and FLOP counts, once the operators are loaded."""
    if "registered" in _state:
        return
    _state["registered"] = True

    @torch.library.register_fake("vitlab::amx_linear")
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.register_fake("vitlab::amx_linear_backward")
    def _(grad, x, weight):
        return torch.empty_like(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])

    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.bias_dtype = bias is not None, None if bias is None else bias.dtype

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.vitlab.amx_linear_backward(grad.to(torch.bfloat16), x, weight)
        return grad_x, grad_weight, grad_bias.to(ctx.bias_dtype) if ctx.has_bias else None

    torch.library.register_autograd("vitlab::amx_linear", backward, setup_context=setup_context)

    @register_flop_formula(torch.ops.vitlab.amx_linear)
    def _forward_flops(x_shape, weight_shape, *args, **kwargs) -> int:
        return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]

    @register_flop_formula(torch.ops.vitlab.amx_linear_backward)
    def _backward_flops(grad_shape, x_shape, weight_shape, *args, **kwargs) -> int:
        return 4 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]
