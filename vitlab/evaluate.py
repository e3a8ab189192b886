"""Command line: the test accuracy of a saved checkpoint. ``python -m vitlab.evaluate --checkpoint PATH``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from .train import ArgumentParser, add, number, report_failure
from .training.checkpoint import load_checkpoint
from .training.data import DigitDataset, load_mnist, read_mnist_idx
from .training.loop import evaluate

RESULT_FORMAT = "accuracy {accuracy:.2%} on {n} images"  # the last line printed, e.g. "accuracy 98.83% on 10000 images"
RESULT_PATTERN = re.compile(r"^accuracy (\d{1,3}\.\d{2})% on (\d+) images$")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m vitlab.evaluate",
        description="Evaluate a vitlab checkpoint on the MNIST test split (evaluation only: nothing is trained).",
        epilog="The last line printed is always 'accuracy A% on N images', A a percentage with two decimals, "
        f"e.g. 'accuracy 98.83% on 10000 images'; a regular expression for it: {RESULT_PATTERN.pattern}. "
        "A bad argument prints one line, 'error: <message>', and exits with status 2; a file that cannot be "
        "read or evaluated prints one such line and exits with status 1 (--debug shows the traceback).",
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint from python -m vitlab.train or fit")
    parser.add_argument("--data-dir", help="folder with t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz], "
                        "e.g. ../shared/data/mnist; without it, the test split of vitlab.training.data.load_mnist()")
    add(parser, "--threads", number(integer=True, low=1), "torch CPU threads", default_text="torch's choice")
    add(parser, "--batch-size", number(integer=True, low=1), "images per forward pass", default=512)
    parser.add_argument("--debug", action="store_true", help="on a failure, print the traceback too")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print what was loaded, then, last, ``RESULT_FORMAT`` for the test split -> the exit status: 0, or 1 for a
    file that cannot be read or evaluated; a bad argument exits with status 2 (SystemExit) before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: no such folder")
    try:
        return run(args)
    except (Exception, KeyboardInterrupt) as err:
        return report_failure(err, args.debug)


def run(args: argparse.Namespace) -> int:
    """Evaluate with the checked ``args``."""
    if args.threads is not None:
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
            raise FileNotFoundError(f"no MNIST test split: {data.message}. Pass --data-dir with the t10k IDX files")
        test, where = data.test, f"load_mnist ({data.source})"
    print(f"test split: {where}, {len(test)} images")
    scores = evaluate(model, test, args.batch_size)
    print(RESULT_FORMAT.format(accuracy=scores["accuracy"], n=scores["n"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
