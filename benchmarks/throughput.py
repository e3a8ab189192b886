"""Training and inference throughput of vitlab against timm, torchvision and vit-pytorch.

All models get the same MNIST-sized architecture (image 28, patch 7, 1 channel, dim 64,
depth 6, heads 4, mlp 128, 10 classes) and the same batch. Models are timed round-robin in
short bursts, so machine noise hits all of them alike, and each figure is the best burst.
Every figure is printed as a ratio to vitlab's eager training or inference speed, beside FLOPs
per image (torch.utils.flop_counter) and achieved GFLOP/s against a matmul peak measured in
the same run. The peers train with PyTorch's fused AdamW; vitlab's rows with ``vitlab.FlatAdamW``
(what ``vitlab.training.optim.make_optimizer`` builds: the same update, once per parameter group instead of
once per tensor), and "vitlab (torch AdamW)" is vitlab eager with the peers' optimizer, the models'
forward and backward passes alone compared. "vitlab (compiled)" is ``fit(compile=True)``'s path:
``torch.compile(model)``; its compilation happens in the warm-up, before the clock starts.
"vitlab (reused memory)" is ``fit()``'s eager path: vitlab eager with its CPU tensors from the
reusing allocator that ``fit`` trains inside (``vitlab.memory``); the compiled rows use it too, as
``fit`` does. Each of these steps opens a ``reusing(keep=True)`` scope, so the peers' steps in between
run on PyTorch's own allocator.
"vitlab (compiled, bf16)" is ``fit(compile=True, precision="bf16")``'s: the blocks' Linear products
in bf16 (``vitlab.training.precision``), set once for all its steps as ``fit`` sets it for an epoch, timed
only where the CPU multiplies bf16 natively; its GFLOP/s count the same FLOPs, and its share of the
peak is given against the fp32 peak, with the bf16 matmul peak printed beside it.

    python benchmarks/throughput.py                 # 2 threads, batch 128
    python benchmarks/throughput.py --rounds 8 --threads 2 --no-compile
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from vitlab.flat_adamw import FlatAdamW

import vitlab
from vitlab import memory
from vitlab.training.precision import matmuls_in, native_bf16

IMAGE, PATCH, CHANNELS, CLASSES, DIM, DEPTH, HEADS, MLP = 28, 7, 1, 10, 64, 6, 4, 128
TORCH_ADAMW = "vitlab (torch AdamW)"  # vitlab eager with the peers' optimizer: the models alone compared
REUSED = "vitlab (reused memory)"  # fit's eager path: vitlab eager inside vitlab.memory.reusing()


def build_vitlab() -> nn.Module:
    return vitlab.ViT(vitlab.ViTConfig())


def build_timm() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=IMAGE, patch_size=PATCH, in_chans=CHANNELS, num_classes=CLASSES,
                             embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP / DIM)


def build_torchvision() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=IMAGE, patch_size=PATCH, num_layers=DEPTH, num_heads=HEADS,
                              hidden_dim=DIM, mlp_dim=MLP, num_classes=CLASSES)
    model.conv_proj = nn.Conv2d(CHANNELS, DIM, kernel_size=PATCH, stride=PATCH)  # torchvision assumes RGB
    return model


def build_vit_pytorch() -> nn.Module:
    from vit_pytorch import ViT

    return ViT(image_size=IMAGE, patch_size=PATCH, num_classes=CLASSES, dim=DIM, depth=DEPTH, heads=HEADS,
               mlp_dim=MLP, channels=CHANNELS, dim_head=DIM // HEADS)


class Recorded(nn.Module):
    """vitlab with recording on for every forward pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with vitlab.record(self.model):
            return self.model(x)


def train_step_fn(
    model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, compile: bool = False, precision: str = "fp32",
    flat: bool = False, stack: ExitStack | None = None, reuse: bool = False,
) -> Callable:
    """One training step of ``model`` as a function. ``flat``: vitlab's ``FlatAdamW`` (what
    ``make_optimizer`` builds), else PyTorch's fused AdamW; the same update, on one parameter group.
    ``precision`` holds from here until ``stack`` closes, as ``fit`` sets it once for all the steps
    of an epoch. ``reuse``: each step runs inside ``vitlab.memory.reusing(keep=True)``, with the blocks
    that the step before freed, as every step of ``fit`` after its first does."""
    settings = dict(lr=1e-3, weight_decay=0.05)
    optimizer = FlatAdamW(model.parameters(), **settings) if flat else torch.optim.AdamW(
        model.parameters(), **settings, fused=True)
    model.train()
    forward = torch.compile(model) if compile else model
    if precision != "fp32":
        stack.enter_context(matmuls_in(model, precision))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(batch), labels).backward()
        optimizer.step()

    def reused_step():
        with memory.reusing(keep=True):
            step()

    return reused_step if reuse else step


def infer_fn(model: nn.Module, batch: torch.Tensor, compile: bool = False) -> Callable:
    model.eval()
    forward = torch.compile(model) if compile else model

    def step():
        with torch.inference_mode():
            forward(batch)

    return step


def flops_per_image(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, train: bool) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            F.cross_entropy(model(batch), labels).backward()
        else:
            with torch.no_grad():
                model(batch)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch.shape[0]


def matmul_peak(seconds: float = 2.0, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of an n x n matmul in ``dtype`` over about ``seconds``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def round_robin(steps: dict[str, Callable], rounds: int, burst: int, batch: int) -> dict[str, float]:
    """Best images/s of each step function, timed in alternating bursts."""
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    best = {name: 0.0 for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(burst):
                step()
            best[name] = max(best[name], burst * batch / (time.perf_counter() - t))
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="training bursts per model")
    parser.add_argument("--infer-rounds", type=int, default=None,
                        help="inference bursts per model (default: 3x --rounds; an inference burst is short)")
    parser.add_argument("--burst", type=int, default=10, help="steps per timed burst")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd vitlab path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randn(args.batch, CHANNELS, IMAGE, IMAGE)
    labels = torch.randint(0, CLASSES, (args.batch,))

    builders = {"vitlab": build_vitlab, "timm": build_timm, "torchvision": build_torchvision,
                "vit-pytorch": build_vit_pytorch}
    models = {name: build() for name, build in builders.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    flops = {name: flops_per_image(m, batch, labels, train=True) for name, m in models.items()}
    infer_flops = {name: flops_per_image(m, batch, labels, train=False) for name, m in models.items()}

    train_steps = {name: train_step_fn(m, batch, labels, flat=name == "vitlab") for name, m in models.items()}
    train_steps[TORCH_ADAMW] = train_step_fn(build_vitlab(), batch, labels)
    train_steps[REUSED] = train_step_fn(build_vitlab(), batch, labels, flat=True, reuse=True)
    for name in (TORCH_ADAMW, REUSED):
        flops[name], params[name] = flops["vitlab"], params["vitlab"]
    own = {"vitlab (compiled)": "fp32"} | ({"vitlab (compiled, bf16)": "bf16"} if native_bf16() else {})
    stack = ExitStack()
    for name, precision in ({} if args.no_compile else own).items():
        train_steps[name] = train_step_fn(build_vitlab(), batch, labels, compile=True, precision=precision, flat=True,
                                          stack=stack, reuse=True)
        flops[name], params[name] = flops["vitlab"], params["vitlab"]
    infer_steps = {name: infer_fn(m, batch) for name, m in models.items()}
    infer_steps["vitlab (recording)"] = infer_fn(Recorded(models["vitlab"]), batch)
    infer_flops["vitlab (recording)"] = infer_flops["vitlab"]

    peak = matmul_peak()
    try:
        with stack:
            train = round_robin(train_steps, args.rounds, args.burst, args.batch)
    finally:
        memory.clear()  # the blocks the reused-memory steps kept
    infer_rounds = args.infer_rounds or 3 * args.rounds
    infer = round_robin(infer_steps, infer_rounds, args.burst, args.batch)
    peak = max(peak, matmul_peak())
    bf16_peak = f"; bf16 {matmul_peak(dtype=torch.bfloat16):.0f}" if native_bf16() else ""

    print(f"threads {args.threads}, batch {args.batch}, torch {torch.__version__}; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s{bf16_peak}")
    print(f"\ntraining step (forward, backward, AdamW), best of {args.rounds} bursts of {args.burst}")
    print(f"{'model':<24} {'params':>8} {'img/s':>8} {'x vitlab':>9} {'MFLOP/img':>10} {'GFLOP/s':>8} {'% peak':>7}")
    for name, ips in sorted(train.items(), key=lambda kv: -kv[1]):
        gflops = ips * flops[name] / 1e9
        print(f"{name:<24} {params[name]:>8,} {ips:>8,.0f} {ips / train['vitlab']:>9.2f} {flops[name] / 1e6:>10.1f} "
              f"{gflops:>8.1f} {100 * gflops / peak:>6.1f}%")
    print(f"\ninference (torch.inference_mode), best of {infer_rounds} bursts of {args.burst}")
    print(f"{'model':<24} {'img/s':>8} {'x vitlab':>9} {'time x vitlab':>14}")
    for name, ips in sorted(infer.items(), key=lambda kv: -kv[1]):
        print(f"{name:<24} {ips:>8,.0f} {ips / infer['vitlab']:>9.2f} {infer['vitlab'] / ips:>14.2f}")
    peers = {k: v for k, v in train.items() if not k.startswith("vitlab")}
    fastest = max(peers, key=peers.get)
    paths = "".join(f", {name} {train[name] / peers[fastest]:.2f}x" for name in train if name.startswith("vitlab ("))
    print(f"\nfastest eager peer: {fastest}; vitlab eager {train['vitlab'] / peers[fastest]:.2f}x{paths}; "
          f"recording costs {infer['vitlab'] / infer['vitlab (recording)']:.2f}x plain inference time")


if __name__ == "__main__":
    main()
