"""vitlab's bf16 products on AMX tiles (``vitlab.amx``) against F.linear's, at the MNIST model's shapes.

For each of a block's four Linear layers (2,176 rows at batch 128: q/k/v 64 -> 192, the output
projection 64 -> 64, the MLP 64 -> 128 and 128 -> 64) it times, best of a few bursts, the forward
product (bf16 input, float32 weight and bias rounded to bf16, bf16 output) and the backward one (the
input, weight and bias gradients), both ways:
- vitlab: ``torch.ops.vitlab.amx_linear`` and ``amx_linear_backward``;
- F.linear: ``F.linear(x, w_bf16, b_bf16)``, and for the backward what autograd runs for it: the
  input gradient ``grad @ w_bf16``, the weight gradient ``grad^T @ x`` and the bias gradient's sum.
The weights are cast to bf16 outside F.linear's timing, which flatters it.

    python benchmarks/amx_products.py               # 2 threads, batch 128
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from vitlab import amx

SHAPES = {"q/k/v": (64, 192), "output projection": (64, 64), "MLP in": (64, 128), "MLP out": (128, 64)}


def best_us(step: Callable, calls: int = 200, bursts: int = 7) -> float:
    """Best time of one call in microseconds, over ``bursts`` bursts of ``calls``."""
    for _ in range(20):
        step()
    best = float("inf")
    for _ in range(bursts):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=17)
    args = parser.parse_args(argv)
    if not amx.available():
        raise SystemExit(f"vitlab's AMX products do not run here: {amx.error or 'VITLAB_KERNELS is off'}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = args.batch * args.tokens
    print(f"threads {args.threads}, {rows} rows, torch {torch.__version__}; microseconds a call, best of 7 bursts")
    print(f"{'layer':<18} {'in':>4} {'out':>4} {'forward: vitlab':>16} {'F.linear':>9} {'ratio':>6} "
          f"{'backward: vitlab':>17} {'F.linear':>9} {'ratio':>6}")
    for name, (k, n) in SHAPES.items():
        x, weight, bias = torch.randn(rows, k).bfloat16(), torch.randn(n, k) * k**-0.5, torch.randn(n)
        grad = torch.randn(rows, n).bfloat16()
        w16, b16 = weight.bfloat16(), bias.bfloat16()
        forward = best_us(lambda: torch.ops.vitlab.amx_linear(x, weight, bias))
        forward_ref = best_us(lambda: F.linear(x, w16, b16))
        backward = best_us(lambda: torch.ops.vitlab.amx_linear_backward(grad, x, weight))
        backward_ref = best_us(lambda: (grad @ w16, grad.t() @ x, grad.sum(0)))
        print(f"{name:<18} {k:>4} {n:>4} {forward:>16.1f} {forward_ref:>9.1f} {forward_ref / forward:>5.2f}x "
              f"{backward:>17.1f} {backward_ref:>9.1f} {backward_ref / backward:>5.2f}x")


if __name__ == "__main__":
    main()
