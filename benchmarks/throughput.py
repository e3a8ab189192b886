"""Training and inference throughput of vitlab against timm, torchvision and vit-pytorch, and what
recording, importing and building a model cost.

All models get the same MNIST-sized architecture (image 28, patch 7, 1 channel, dim 64, depth 6,
heads 4, mlp 128, 10 classes) and the same batch. Everything is timed round-robin in short bursts, so
machine noise hits all rows alike, and each figure is the best burst. Training figures are printed as
ratios to vitlab's eager step, beside FLOPs per image (torch.utils.flop_counter) and the GFLOP/s
achieved against an fp32 matmul peak measured in the same run. Every model trains with PyTorch's
fused AdamW, the optimizer ``vitlab.training.optim.make_optimizer`` builds, so the rows compare the
models' forward and backward passes.

- "vitlab (compiled)" is ``fit(compile=True)``'s path, ``torch.compile(model)``; its compilation
  happens in the warm-up, before the clock starts.
- "vitlab (compiled, bf16)" adds ``fit(precision="bf16")``'s ``torch.autocast``
  (``vitlab.training.precision``); it is timed only where the CPU multiplies bf16 natively
  (``native_bf16()``), as elsewhere bf16 is emulated and slower than fp32.
- Recording is timed as a learner records, ``with vitlab.record(model) as rec: model(x)`` and then
  ``rec.attentions``, against the same model's plain forward pass, at ``--batch`` and at batch 1 (the
  explorer records one image at a time).
- ``python -c "import vitlab"`` is timed in fresh interpreters (best of ``--import-runs``, after one
  that warms the file cache); ``vitlab.ViT()`` in this one.

The last lines compare each figure with the bound it must hold (benchmarks/README.md).

    python benchmarks/throughput.py --rounds 4      # 2 threads, batch 128
    python benchmarks/throughput.py --rounds 8 --threads 2 --no-compile
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import vitlab
from vitlab.training.precision import autocast, native_bf16

IMAGE, PATCH, CHANNELS, CLASSES, DIM, DEPTH, HEADS, MLP = 28, 7, 1, 10, 64, 6, 4, 128
PEERS = ("timm", "torchvision", "vit-pytorch")
# The bounds the figures must hold: step speed / fastest eager peer's (at least), recording time / plain
# inference time (at most), seconds to import vitlab and to build a ViT (at most).
TARGETS = {"eager": 1.0, "compiled": 1.2, "recording": 1.3, "import": 1.5, "build": 0.1}


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


def train_step_fn(
    model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, compile: bool = False, precision: str = "fp32",
) -> Callable:
    """One training step of ``model`` as a function: forward, cross-entropy, backward, fused AdamW.
    ``precision="bf16"``: the forward pass under ``torch.autocast``, as ``fit(precision="bf16")`` runs it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
    model.train()
    forward = torch.compile(model) if compile else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(batch.device, precision):
            loss = F.cross_entropy(forward(batch), labels)
        loss.backward()
        optimizer.step()

    return step


def infer_fn(model: nn.Module, batch: torch.Tensor, recording: bool = False) -> Callable:
    """One inference pass under ``torch.inference_mode``. ``recording``: inside ``vitlab.record(model)``,
    the attentions read afterwards, as a learner records."""
    model.eval()

    def step():
        with torch.inference_mode():
            model(batch)

    def recorded_step():
        with torch.inference_mode():
            with vitlab.record(model) as rec:
                model(batch)
            return rec.attentions

    return recorded_step if recording else step


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


SETTLE_SECONDS = 0.5  # pause before each timed burst (see round_robin)


def round_robin(steps: dict[str, Callable], rounds: int, burst: int) -> dict[str, float]:
    """Best seconds per call of each function, timed in alternating bursts of ``burst`` calls, each after an
    untimed call."""
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    best = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            # A pause and one untimed call first: a compiled step leaves the OpenMP threads of its generated
            # code spinning for a while after it returns, and the model timed next would pay for them.
            time.sleep(SETTLE_SECONDS)
            step()
            t = time.perf_counter()
            for _ in range(burst):
                step()
            best[name] = min(best[name], (time.perf_counter() - t) / burst)
    return best


def import_seconds(runs: int, module: str = "vitlab") -> float:
    """Best wall time of ``python -c "import <module>"`` in a fresh interpreter, after one run that warms
    the file cache."""
    command = [sys.executable, "-c", f"import {module}"]
    subprocess.run(command, check=True)
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(command, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def build_seconds(runs: int = 5) -> float:
    """Best time of ``vitlab.ViT()`` in this interpreter."""
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        vitlab.ViT()
        best = min(best, time.perf_counter() - t)
    return best


def verdict(ok: bool) -> str:
    return "holds" if ok else "MISSED"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print its tables and bounds -> the figures the bounds are checked on."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="training bursts per model")
    parser.add_argument("--infer-rounds", type=int, default=None,
                        help="inference bursts per model (default: 3x --rounds; an inference burst is short)")
    parser.add_argument("--burst", type=int, default=10, help="steps per timed burst")
    parser.add_argument("--import-runs", type=int, default=5, help="timed `import vitlab` interpreters")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd vitlab rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = torch.randn(args.batch, CHANNELS, IMAGE, IMAGE)
    labels = torch.randint(0, CLASSES, (args.batch,))
    one = batch[:1].clone()

    builders = {"vitlab": build_vitlab, "timm": build_timm, "torchvision": build_torchvision,
                "vit-pytorch": build_vit_pytorch}
    models = {name: build() for name, build in builders.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    flops = {name: flops_per_image(m, batch, labels, train=True) for name, m in models.items()}

    train_steps = {name: train_step_fn(m, batch, labels) for name, m in models.items()}
    own = {} if args.no_compile else {"vitlab (compiled)": "fp32"}
    if not args.no_compile and native_bf16():
        own["vitlab (compiled, bf16)"] = "bf16"
    for name, precision in own.items():
        train_steps[name] = train_step_fn(build_vitlab(), batch, labels, compile=True, precision=precision)
        flops[name], params[name] = flops["vitlab"], params["vitlab"]

    vit = build_vitlab()  # inference: plain and recorded passes of one model, at both batch sizes
    infer_steps = {name: infer_fn(m, batch) for name, m in models.items() if name != "vitlab"}
    infer_steps |= {"vitlab": infer_fn(vit, batch), "vitlab (recording)": infer_fn(vit, batch, recording=True),
                    "vitlab, batch 1": infer_fn(vit, one), "vitlab (recording), batch 1": infer_fn(vit, one, True)}

    peak = matmul_peak()
    train = round_robin(train_steps, args.rounds, args.burst)
    infer_rounds = args.infer_rounds or 3 * args.rounds
    infer = round_robin(infer_steps, infer_rounds, args.burst)
    peak = max(peak, matmul_peak())
    bf16_peak = f"; bf16 {matmul_peak(dtype=torch.bfloat16):.0f}" if native_bf16() else ""
    import_s, build_s = import_seconds(args.import_runs), build_seconds()
    torch_import_s = import_seconds(args.import_runs, "torch")  # most of vitlab's import is PyTorch's

    print(f"threads {args.threads}, batch {args.batch}, torch {torch.__version__}; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s{bf16_peak}")
    print(f"\ntraining step (forward, backward, fused AdamW), best of {args.rounds} bursts of {args.burst}")
    print(f"{'model':<24} {'params':>8} {'img/s':>8} {'x vitlab':>9} {'MFLOP/img':>10} {'GFLOP/s':>8} {'% peak':>7}")
    for name, seconds in sorted(train.items(), key=lambda kv: kv[1]):
        ips = args.batch / seconds
        gflops = ips * flops[name] / 1e9
        print(f"{name:<24} {params[name]:>8,} {ips:>8,.0f} {train['vitlab'] / seconds:>9.2f} "
              f"{flops[name] / 1e6:>10.1f} {gflops:>8.1f} {100 * gflops / peak:>6.1f}%")
    print(f"\ninference (torch.inference_mode), best of {infer_rounds} bursts of {args.burst}")
    print(f"{'model':<28} {'img/s':>8} {'ms/pass':>8} {'time x vitlab':>14}")
    for name, seconds in sorted(infer.items(), key=lambda kv: kv[1]):
        plain = infer["vitlab, batch 1" if name.endswith("batch 1") else "vitlab"]
        images = 1 if name.endswith("batch 1") else args.batch
        print(f"{name:<28} {images / seconds:>8,.0f} {1e3 * seconds:>8.2f} {seconds / plain:>14.2f}")

    fastest = min(PEERS, key=train.get)
    figures = {
        "fastest_peer": fastest,
        "eager": train[fastest] / train["vitlab"],
        "recording": infer["vitlab (recording)"] / infer["vitlab"],
        "recording_batch_1": infer["vitlab (recording), batch 1"] / infer["vitlab, batch 1"],
        "import": import_s,
        "build": build_s,
    }
    if "vitlab (compiled)" in train:
        figures["compiled"] = train[fastest] / train["vitlab (compiled)"]
    if "vitlab (compiled, bf16)" in train:
        figures["compiled_bf16"] = train[fastest] / train["vitlab (compiled, bf16)"]
    print(f"\nbounds (fastest eager peer: {fastest})")
    print(f"eager step: {figures['eager']:.2f}x the fastest eager peer's speed "
          f"(>= {TARGETS['eager']}x: {verdict(figures['eager'] >= TARGETS['eager'])})")
    if "compiled" in figures:
        print(f"compiled step: {figures['compiled']:.2f}x the fastest eager peer's speed "
              f"(>= {TARGETS['compiled']}x: {verdict(figures['compiled'] >= TARGETS['compiled'])})")
    if "compiled_bf16" in figures:
        print(f"compiled bf16 step: {figures['compiled_bf16']:.2f}x the fastest eager peer's speed")
    for key, size in (("recording", args.batch), ("recording_batch_1", 1)):
        print(f"recording at batch {size}: {figures[key]:.2f}x plain inference time "
              f"(<= {TARGETS['recording']}x: {verdict(figures[key] <= TARGETS['recording'])})")
    print(f"import vitlab: {import_s:.2f} s, import torch alone {torch_import_s:.2f} s "
          f"(< {TARGETS['import']} s: {verdict(import_s < TARGETS['import'])})")
    print(f"vitlab.ViT(): {build_s * 1e3:.1f} ms (< {TARGETS['build'] * 1e3:.0f} ms: "
          f"{verdict(build_s < TARGETS['build'])})")
    return figures


if __name__ == "__main__":
    main()
