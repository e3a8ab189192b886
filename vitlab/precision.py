"""bf16 matrix products inside a float32 model: the Linear layers of the encoder blocks.

On a CPU with AMX or AVX512-BF16 (and on recent GPUs) a bf16 product of the blocks' shapes runs 2-3x
as fast as an fp32 one. ``matmuls_in(model, "bf16")`` rounds only the inputs of the four Linear products
of each block (q/k/v, the attention's output projection, the MLP's two layers) to bf16; each product
accumulates in fp32 and comes back as float32, so everything else stays float32: the weights the
optimizer updates, LayerNorm, the attention scores, softmax and probabilities, GELU, the residual
sums, the loss. The patch projection and the head stay fp32 too: they are small, and they touch the
raw pixels and the logits. Where the CPU has AMX-BF16 the bf16 products run on vitlab's own operators
(``vitlab.amx``: the same products, in one pass each, their weight and bias gradients summed in
float32); elsewhere on ``F.linear``. (vitlab's attention kernel takes the q/k/v product in bf16 and hands the
output projection its input in bf16: the numbers of the casts to float32 and back, without the casts.)

That is narrower than ``torch.autocast``, which also runs attention's small products (17 tokens
here) and the softmax in bf16: on a CPU those are slower in bf16 than in fp32, and the recorded
attention would lose precision (benchmarks/RESULTS.md has the measurements). Where the CPU has no
native bf16 arithmetic the products are emulated and much slower: ``native_bf16`` says which case a
device is.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import amx

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # name -> the dtype of the blocks' Linear products


class Linear(nn.Linear):
    """(..., in_features) -> (..., out_features): ``nn.Linear`` whose product may run in a lower precision.

    ``matmul_dtype`` None (the default): exactly ``nn.Linear``. ``torch.bfloat16``: input, weight and
    bias are rounded to bf16 for the product, and the result is cast back to the input's dtype; the
    parameters themselves stay as they are. Set it with ``matmuls_in``.
    """

    matmul_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product, cast back to the wider of the input's and the weight's dtype."""
        if self.matmul_dtype is None:
            return super().forward(x)
        return self.product(x).to(torch.promote_types(x.dtype, self.weight.dtype))

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The product in ``matmul_dtype`` (its result in that dtype, not cast back): what the
        attention kernel reads when it can take bf16 (``vitlab.kernels.small_attention``)."""
        dtype = self.matmul_dtype
        if dtype is None or dtype == x.dtype == self.weight.dtype:
            return super().forward(x)
        if dtype == torch.bfloat16 and amx.applies(x, self.weight):
            return amx.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


def check_precision(precision: str) -> torch.dtype | None:
    """Raise ValueError unless ``precision`` is a name in ``PRECISIONS``; -> its dtype."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


@contextmanager
def matmuls_in(model: nn.Module, precision: str) -> Iterator[nn.Module]:
    """Within the block, every ``precision.Linear`` of ``model`` multiplies in ``precision`` ("fp32" or
    "bf16"); on leaving (also on an error) each one is as it was before."""
    dtype = check_precision(precision)
    if dtype == torch.bfloat16:
        amx.available()  # built (on first use) here, outside any torch.compile trace of the products
    layers = [module for module in model.modules() if isinstance(module, Linear)]
    before = [layer.__dict__.get("matmul_dtype", Linear.matmul_dtype) for layer in layers]
    try:
        for layer in layers:
            layer.matmul_dtype = dtype
        yield model
    finally:
        for layer, dtype_before in zip(layers, before):
            layer.matmul_dtype = dtype_before


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 natively: a CPU with AMX-BF16 or AVX512-BF16, a CUDA device
    that supports bf16. Elsewhere bf16 products are emulated, and slower than fp32 ones."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
        return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))
    return False
