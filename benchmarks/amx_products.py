"""vitlab's bf16 products on AMX tiles (``vitlab.amx``) against F.linear's, at the MNIST model's shapes.

For each of a block's four Linear layers (2,176 rows at batch 128: q/k/v 64 -> 192, the output
projection 64 -> 64, the MLP 64 -> 128 and 128 -> 64) it times, best of bursts that alternate between
the ways (``attention_kernels.best_times``), the forward
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
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vitlab import amx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, also when loaded by path
from attention_kernels import best_times  # noqa: E402

SHAPES = {"q/k/v": (64, 192), "output projection": (64, 64), "MLP in": (64, 128), "MLP out": (128, 64)}


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
    print(f"threads {args.threads}, {rows} rows, torch {torch.__version__}; microseconds a call, best of 7 "
          "alternating bursts of 200")
    print(f"{'layer':<18} {'in':>4} {'out':>4} {'forward: vitlab':>16} {'F.linear':>9} {'ratio':>6} "
          f"{'backward: vitlab':>17} {'F.linear':>9} {'ratio':>6}")
    for name, (k, n) in SHAPES.items():
        x, weight, bias = torch.randn(rows, k).bfloat16(), torch.randn(n, k) * k**-0.5, torch.randn(n)
        grad = torch.randn(rows, n).bfloat16()
        w16, b16 = weight.bfloat16(), bias.bfloat16()
        us = {way: seconds * 1e6 for way, seconds in best_times({
            "forward": lambda: torch.ops.vitlab.amx_linear(x, weight, bias),
            "F.linear forward": lambda: F.linear(x, w16, b16),
            "backward": lambda: torch.ops.vitlab.amx_linear_backward(grad, x, weight),
            "F.linear backward": lambda: (grad @ w16, grad.t() @ x, grad.sum(0)),
        }, rounds=7, burst=200).items()}
        forward, backward = us["F.linear forward"] / us["forward"], us["F.linear backward"] / us["backward"]
        print(f"{name:<18} {k:>4} {n:>4} {us['forward']:>16.1f} {us['F.linear forward']:>9.1f} {forward:>5.2f}x "
              f"{us['backward']:>17.1f} {us['F.linear backward']:>9.1f} {backward:>5.2f}x")

if __name__ == "__main__":
    main()
