"""Where the fused attention (F.scaled_dot_product_attention) starts to beat the explicit one on a CPU.

For a range of token counts N it times forward + backward of one vitlab ``Attention`` on each path,
alternating the two in bursts so machine noise hits both alike, and prints explicit/fused time.
``ViTConfig(attn_impl="auto")`` uses the explicit path up to ``EXPLICIT_ATTENTION_MAX_TOKENS``.

    python benchmarks/attention_crossover.py --threads 2 --dim 64 --heads 4
"""

from __future__ import annotations

import argparse
import time

import torch

from vitlab import Attention
from vitlab.model.config import EXPLICIT_ATTENTION_MAX_TOKENS


def best_time(attn: Attention, x: torch.Tensor, fused: bool, repeats: int) -> float:
    attn.fused = fused
    t = time.perf_counter()
    for _ in range(repeats):
        attn(x).sum().backward()
    return (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[17, 50, 65, 101, 197, 257, 401, 577, 1025])
    parser.add_argument("--token-budget", type=int, default=16384, help="batch = token budget // tokens")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    attn = Attention(args.dim, args.heads)
    print(f"threads {args.threads}, dim {args.dim}, heads {args.heads}; auto uses explicit up to "
          f"{EXPLICIT_ATTENTION_MAX_TOKENS} tokens")
    print(f"{'tokens':>6} {'batch':>6} {'explicit ms':>12} {'fused ms':>9} {'explicit/fused':>15}")
    for n in args.tokens:
        batch = max(1, args.token_budget // n)
        x = torch.randn(batch, n, args.dim, requires_grad=True)
        for fused in (False, True):
            best_time(attn, x, fused, 2)  # warm-up
        explicit = fused = float("inf")
        for _ in range(args.rounds):
            explicit = min(explicit, best_time(attn, x, False, 3))
            fused = min(fused, best_time(attn, x, True, 3))
        print(f"{n:>6} {batch:>6} {explicit * 1e3:>12.2f} {fused * 1e3:>9.2f} {explicit / fused:>15.2f}")


if __name__ == "__main__":
    main()
