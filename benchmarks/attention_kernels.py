"""vitlab's attention kernels against PyTorch's paths, for one attention block at MNIST size.

One ``vitlab.Attention`` (dim 64, 4 heads, 17 tokens, batch 128) on each of its four ways to run:
the fused path on vitlab's kernel (``kernels.small_attention``) or on ``F.scaled_dot_product_attention``
(what it falls back to with ``VITLAB_KERNELS=0``), and the explicit path, which the recorder uses, on
vitlab's kernels (``kernels.head_scores``, ``row_softmax``, ``head_weighted_sum``; ``Attention`` uses
them without autograd only, so in the training rows both explicit ways run the same PyTorch ops) or on
plain PyTorch matmuls and softmax. Then the softmax of (B, h, N, N) scores alone. Each is timed round-robin in
bursts, so machine noise hits all alike, and each figure is the best burst, with its ratio to the
slowest way of the same row.

    python benchmarks/attention_kernels.py                  # 2 threads, batch 128, 17 tokens
    python benchmarks/attention_kernels.py --tokens 50 --dim 256 --heads 4
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch

from vitlab import Attention, kernels

WAYS = {  # name -> (fused path?, vitlab's kernels on?)
    "fused, vitlab kernel": (True, True),
    "fused, SDPA": (True, False),
    "explicit, vitlab kernels": (False, True),
    "explicit, PyTorch ops": (False, False),
}


def kernels_on(on: bool) -> None:
    os.environ["VITLAB_KERNELS"] = "1" if on else "0"


def best_times(calls: dict[str, Callable], rounds: int, burst: int) -> dict[str, float]:
    """Best seconds per call of each function, timed in alternating bursts."""
    for call in calls.values():
        for _ in range(3):
            call()
    best = {name: float("inf") for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            for _ in range(burst):
                call()
            best[name] = min(best[name], (time.perf_counter() - t) / burst)
    return best


def print_table(title: str, times: dict[str, float]) -> None:
    slowest = max(times.values())
    print(f"\n{title}")
    print(f"{'way':<26} {'us':>9} {'x slowest':>10}")
    for name, seconds in sorted(times.items(), key=lambda kv: kv[1]):
        print(f"{name:<26} {seconds * 1e6:>9.1f} {slowest / seconds:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=17)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--burst", type=int, default=20, help="calls per timed burst")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = os.environ.get("VITLAB_KERNELS")
    head_dim = args.dim // args.heads
    try:
        kernels_on(True)
        built = kernels.available(args.tokens, head_dim)
        print(f"threads {args.threads}, batch {args.batch}, tokens {args.tokens}, dim {args.dim}, heads {args.heads}; "
              f"vitlab's kernels {'built' if built else 'not available: ' + kernels.errors.get((args.tokens, head_dim), 'size not supported')}")
        attn = Attention(args.dim, args.heads)
        x = torch.randn(args.batch, args.tokens, args.dim)
        x_grad = x.clone().requires_grad_()

        def way(fused: bool, on: bool, train: bool) -> Callable:
            def call():
                attn.fused = fused
                kernels_on(on)
                if train:
                    attn(x_grad).sum().backward()
                else:
                    with torch.inference_mode():
                        attn(x)
            return call

        attn.eval()
        print_table("forward (inference)", best_times(
            {name: way(fused, on, False) for name, (fused, on) in WAYS.items()}, args.rounds, args.burst))
        attn.train()
        print_table("forward + backward (training)", best_times(
            {name: way(fused, on, True) for name, (fused, on) in WAYS.items()}, args.rounds, args.burst))

        scores = torch.randn(args.batch, args.heads, args.tokens, args.tokens)
        kernels_on(True)
        softmax = {"torch.softmax": lambda: torch.softmax(scores, -1)}
        if kernels.softmax_applies(scores, -1):
            softmax["kernels.row_softmax"] = lambda: kernels.row_softmax(scores)
        print_table(f"softmax of {tuple(scores.shape)} scores over the last dim", best_times(softmax, args.rounds, args.burst))
    finally:
        if before is None:
            os.environ.pop("VITLAB_KERNELS", None)
        else:
            os.environ["VITLAB_KERNELS"] = before


if __name__ == "__main__":
    main()
