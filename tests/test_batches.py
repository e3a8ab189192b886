"""In-memory batches: every image once per pass, a seeded order, normalised, augmented per batch."""

import pytest
import torch
from tiny_digits import tiny_digits

from vitlab.training.batches import TensorBatches, make_batches, num_images
from vitlab.training.data import MNIST_MEAN, MNIST_STD, augment_batch


def _order(batches):
    return torch.cat([labels for _, labels in batches])


def test_each_pass_sees_every_image_once_in_a_new_seeded_order():
    data = tiny_digits(50)
    data.labels = torch.arange(50)  # labels as image ids
    batches = make_batches(data, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert isinstance(batches, TensorBatches) and len(batches) == 4
    first_pass = list(batches)
    assert [len(labels) for _, labels in first_pass] == [16, 16, 16, 2]
    first, second = _order(first_pass), _order(batches)
    assert sorted(first.tolist()) == list(range(50)) and sorted(second.tolist()) == list(range(50))
    assert not torch.equal(first, second)
    again = make_batches(data, 16, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_order(again), first)


def test_batches_are_normalised_and_augmentation_moves_them():
    data = tiny_digits(8)
    (plain, labels), = make_batches(data, 8)
    assert plain.shape == (8, 1, 28, 28) and plain.dtype == torch.float32
    torch.testing.assert_close(plain[:, 0], (data.images.float() / 255 - MNIST_MEAN) / MNIST_STD)
    assert torch.equal(labels, data.labels)
    (moved, _), = make_batches(data, 8, augment=True, aug_generator=torch.Generator().manual_seed(0))
    assert moved.shape == plain.shape and not torch.allclose(moved, plain)
    (warped, _), = make_batches(data, 8, augment=True, elastic=1.0, aug_generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(warped, augment_batch(plain, torch.Generator().manual_seed(0), elastic=1.0))
    assert not torch.allclose(warped, moved)
    with pytest.raises(ValueError, match="elastic=1.0 distorts augmented batches only; got augment=False"):
        make_batches(data, 8, elastic=1.0)
    with pytest.raises(ValueError, match=r"elastic must be >= 0 pixels, e.g. 1.0; got -0.5"):
        make_batches(data, 8, augment=True, elastic=-0.5)


def test_a_dataloader_passes_through_untouched():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(10, 1, 28, 28), torch.zeros(10)))
    assert make_batches(loader, 4, shuffle=True, augment=True) is loader
    assert num_images(loader) == 10
    assert num_images(tiny_digits(7)) == 7


def test_drop_last_leaves_out_a_different_remainder_each_pass():
    data = tiny_digits(50)
    data.labels = torch.arange(50)
    batches = make_batches(data, 16, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True)
    assert len(batches) == 3
    passes = [list(batches) for _ in range(3)]
    for batches_of_pass in passes:
        assert [len(labels) for _, labels in batches_of_pass] == [16, 16, 16]
        assert len(set(_order(batches_of_pass).tolist())) == 48
    left_out = [set(range(50)) - set(_order(p).tolist()) for p in passes]
    assert len({frozenset(s) for s in left_out}) > 1  # reshuffled: not always the same two images


def test_drop_last_with_fewer_images_than_a_batch_says_so():
    with pytest.raises(ValueError, match="at least one full batch of 16 images; got 10"):
        make_batches(tiny_digits(10), 16, drop_last=True)
