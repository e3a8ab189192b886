"""The packaged MNIST weights: loaded through importlib.resources, or a FileNotFoundError saying how to make them."""

import pytest
import torch
from tiny_digits import tiny_vit

import vitlab.pretrained
from vitlab.checkpoint import save_checkpoint
from vitlab.pretrained import load_pretrained_mnist


def test_missing_weights_raise_with_the_command_that_creates_them(monkeypatch):
    monkeypatch.setattr(vitlab.pretrained, "WEIGHTS", ("weights", "no_such_file.pt"))
    with pytest.raises(FileNotFoundError, match=r"no pretrained weights at .*no_such_file\.pt.*-m vitlab\.train"):
        load_pretrained_mnist()


def test_the_packaged_file_loads_as_a_model_in_eval_mode(monkeypatch, tmp_path):
    model = tiny_vit(dropout=0.1)
    (tmp_path / "weights").mkdir()
    save_checkpoint(tmp_path / "weights" / "mnist_vit.pt", model)
    monkeypatch.setattr(vitlab.pretrained.resources, "files", lambda package: tmp_path)  # stands in for the package
    loaded = load_pretrained_mnist()
    assert not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
