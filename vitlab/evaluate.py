"""Command line: the test accuracy of a saved checkpoint. ``python -m vitlab.evaluate --checkpoint PATH``."""

from __future__ import annotations

import argparse
import re

import torch

from .training.checkpoint import load_checkpoint
from .training.data import DigitDataset, load_mnist, read_mnist_idx
from .training.loop import evaluate

RESULT_FORMAT = "accuracy {accuracy:.2%} on {n} images"  # the last line printed, e.g. "accuracy 98.83% on 10000 images"
RESULT_PATTERN = re.compile(r"^accuracy (\d{1,3}\.\d{2})% on (\d+) images$")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vitlab.evaluate",
        description="Evaluate a vitlab checkpoint on the MNIST test split (evaluation only: nothing is trained).",
        epilog="The last line printed is always 'accuracy A% on N images', A a percentage with two decimals, "
        f"e.g. 'accuracy 98.83% on 10000 images'; a regular expression for it: {RESULT_PATTERN.pattern}",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint from python -m vitlab.train or fit")
    parser.add_argument("--data-dir", help="folder with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz], "
                        "e.g. ../shared/data/mnist; without it, the test split of vitlab.data.load_mnist()")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default 512)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print what was loaded, then, last, ``RESULT_FORMAT`` for the test split; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, checkpoint = load_checkpoint(args.checkpoint)
    c = model.config
    print(f"checkpoint {args.checkpoint}: ViT dim {c.dim}, depth {c.depth}, heads {c.heads}, patch {c.patch_size}, "
          f"{model.num_parameters():,} parameters, trained on {checkpoint.get('data_source') or 'unknown data'}")
    if args.data_dir is not None:
        test, where = DigitDataset(*read_mnist_idx(args.data_dir, "test")), args.data_dir
    else:
        data = load_mnist(verbose=False)
        if data.test is None:
            raise SystemExit(f"error: no MNIST test split: {data.message}. Pass --data-dir with the t10k IDX files")
        test, where = data.test, f"load_mnist ({data.source})"
    print(f"test split: {where}, {len(test)} images")
    scores = evaluate(model, test, args.batch_size)
    print(RESULT_FORMAT.format(accuracy=scores["accuracy"], n=scores["n"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
