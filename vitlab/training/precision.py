"""Training in bf16 with PyTorch's autocast: the matrix products in bf16, everything else float32.

``torch.autocast(device_type, dtype=torch.bfloat16)`` runs the products (Linear layers, the
attention's matmuls) in bf16 and keeps the weights, the optimizer's state and the loss in float32.
That is faster only where the device multiplies bf16 natively (a CPU with AMX or AVX512-BF16, a recent
GPU: ``native_bf16`` tells); elsewhere bf16 is emulated and slower than float32. Evaluation, recording
and the notebooks stay float32.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # name -> the dtype autocast multiplies in


def check_precision(precision: str) -> torch.dtype | None:
    """Raise ValueError unless ``precision`` is a name in ``PRECISIONS``; -> its dtype."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str):
    """A context in which the training step's products run in ``precision`` on ``device``."""
    dtype = check_precision(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
