"""Checkpoints: a plain dict of tensors and numbers, written atomically and read without running code.

A checkpoint holds ``format`` ("vitlab-checkpoint"), ``version`` (2), ``config`` (``ViTConfig.to_dict()``),
``model`` (the state dict), ``optimizer`` and ``scheduler`` state (or None), ``history``
(``History.to_dict()`` or None), ``data_source``, ``rng`` (python, numpy, torch and CUDA generator
states, to resume exactly) and ``extra`` (whatever the caller adds; ``fit`` keeps its own state there).
Version 2 stores the history's step rows as columns; version 1 files, with step rows, still load.

Reading uses ``torch.load(weights_only=True)``: a file that holds anything but tensors and plain
containers (a pickled class, a function) is refused, so a downloaded checkpoint cannot run code.
Every other bad file gets its own error, saying what the file is: empty, truncated, not a torch file
(with its size in bytes), a torch file that is not a vitlab checkpoint, a vitlab checkpoint without a
field it needs, or one of a version this vitlab does not read.

Files are written with the permissions the umask gives any new file (``0o666 & ~umask``, e.g. 0644), so
that a shared course folder can read them.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..model.config import ViTConfig
from ..model.vit import ViT
from .history import History

FORMAT = "vitlab-checkpoint"
VERSION = 2  # what save_checkpoint writes
READS = (1, 2)  # what load_checkpoint accepts: 1 differs only in its history's step rows
REQUIRED = ("config", "model")  # the fields every version holds and load_checkpoint needs
ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of a zip archive, which is what torch.save writes
# Config fields that change no weight: a model may differ from its checkpoint in these (e.g. fine-tuning
# with another dropout). Every other field must match.
RUNTIME_FIELDS = ("dropout", "attn_dropout", "drop_path", "attn_impl")


def rng_state() -> dict:
    """-> {"python", "numpy", "torch"[, "cuda"]}: every global random generator's state, as tensors and tuples."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the global generators from ``rng_state()``'s dict (CUDA only where it was saved and is present)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _vit_config(model: nn.Module) -> ViTConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ViTConfig):
        raise ValueError(f"expected a vitlab ViT (with a ViTConfig in .config); got {type(model).__name__}")
    return config


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    history: History | dict | None = None,
    data_source: str | dict | None = None,
    extra: dict | None = None,
) -> Path:
    """model (+ optimizer, scheduler, history) -> ``path``, replaced atomically; returns the path.

    The dict is written to a temporary file in the same folder, flushed and fsynced, then moved onto
    ``path`` with ``os.replace``: a crash or an exception mid-write leaves any earlier file at ``path`` as
    it was, and no temporary file behind.
    """
    from .. import __version__

    path = Path(path)
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "vitlab_version": __version__,
        "config": _vit_config(model).to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": history.to_dict() if isinstance(history, History) else history,
        "data_source": data_source,
        "rng": rng_state(),
        "extra": extra if extra is not None else {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with mode 0o666 lets the umask decide the permissions, as for any new file (mkstemp's 0o600
    # would hide the checkpoint from everyone else); O_EXCL makes sure the temporary name is ours alone.
    temp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike, folder: bool = False) -> Path:
    """Raise ValueError unless a file (``folder=False``) or a folder of files can be written at ``path``.

    Run before training, so that a bad output path fails in a second rather than after the run. A missing
    folder counts as writable when the nearest folder above it is (it will be created); a test file is
    made and removed there, so a read-only disk is caught whoever runs it."""
    path = Path(path)
    what = "folder" if folder else "file"
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"cannot write checkpoints into {path}: it is a file, expected a folder")
    if not folder and path.is_dir():
        raise ValueError(f"cannot write a checkpoint to {path}: it is a folder, expected a file name such as model.pt")
    existing = path if folder else path.parent
    existing = existing.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write the {what} {path}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"cannot write the {what} {path}: the folder {existing} is not writable ({err.strerror})"
        ) from err
    return path


def _describe_bytes(path: Path) -> str:
    """-> "it starts with b'...'": the file's first 8 bytes, which tell a text, an image or a pickle apart."""
    with path.open("rb") as f:
        head = f.read(8)
    return f"it starts with {head!r}" if head else "it is empty"


def _read(path: Path, map_location) -> dict:
    if not path.is_file():
        what = "a folder" if path.is_dir() else "nothing"
        raise FileNotFoundError(f"no checkpoint file at {path}: there is {what} there")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a torch file")
    with path.open("rb") as f:
        is_zip = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} ({size} bytes) is truncated: it starts as a torch file (a zip archive) but its end is missing"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises loading with weights_only=False, which is exactly what must not be done
        # with a file of unknown origin: it is never passed on. Only a GLOBAL (a class or a function to
        # import and call) is a sign of code; anything else the unpickler cannot parse is not a torch file.
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found is None:
            raise ValueError(
                f"{path} ({size} bytes) is not a torch file: torch.load cannot parse it ({_describe_bytes(path)})"
            ) from None
        raise ValueError(
            f"{path} refused: it could run code. It holds a {found.group(1).rstrip('.,;:')} object, and vitlab "
            "loads only tensors, numbers, strings and plain containers from a checkpoint"
        ) from None
    except Exception:  # torch reports a foreign file as EOFError, RuntimeError, OSError, KeyError, IndexError...
        kind = "a zip archive that torch.save did not write" if is_zip else _describe_bytes(path)
        raise ValueError(f"{path} ({size} bytes) is not a torch file: {kind}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(
            f"{path} is a torch file but not a vitlab checkpoint: expected a dict, found a {type(checkpoint).__name__}"
        )
    if checkpoint.get("format") != FORMAT:
        if "format" in checkpoint:
            found = f"format tag {checkpoint['format']!r}"
        else:
            found = f"keys {sorted(map(str, checkpoint))[:20]}"
        raise ValueError(
            f"{path} is a torch file but not a vitlab checkpoint: expected format {FORMAT!r}, found {found}"
        )
    if checkpoint.get("version") not in READS:
        raise ValueError(
            f"{path} is a vitlab checkpoint of unknown version {checkpoint.get('version')!r}; "
            f"this vitlab reads versions {list(READS)}"
        )
    for field in REQUIRED:
        if not isinstance(checkpoint.get(field), dict):
            found = "missing" if field not in checkpoint else f"a {type(checkpoint[field]).__name__}, not a dict"
            raise ValueError(f"{path} is a vitlab checkpoint without its {field!r} field ({found})")
    return checkpoint


def config_differences(model_config: ViTConfig, stored: dict) -> list[str]:
    """-> ["dim: model has 64, checkpoint has 96", ...] for every weight-shaping field that differs.

    A field newer than the checkpoint (absent from ``stored``) counts as its default, which is what the
    models saved before it existed did."""
    mine = model_config.to_dict()
    stored = {**ViTConfig().to_dict(), **stored}
    return [
        f"{name}: model has {mine[name]!r}, checkpoint has {stored.get(name)!r}"
        for name in mine
        if name not in RUNTIME_FIELDS and stored.get(name) != mine[name]
    ]


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    map_location: str | torch.device | None = "cpu",
) -> tuple[ViT, dict]:
    """file -> (model, checkpoint dict): the weights loaded into ``model``, or into a ViT built from the stored config.

    ``optimizer`` and ``scheduler``, when given, get their stored state. Raises ``FileNotFoundError`` for
    a missing file and ``ValueError`` for an empty, truncated or non-torch file (with its size), a torch
    file that is not a vitlab checkpoint (naming its format tag or keys), an unknown version (naming the
    versions read), a missing field (naming it), a file holding objects other than tensors ("refused: it
    could run code"), a ``model`` whose config differs (naming each field: model vs checkpoint), or a
    missing optimizer/scheduler state. The global
    random generators are not touched; ``set_rng_state(checkpoint["rng"])`` restores them.
    """
    path = Path(path)
    checkpoint = _read(path, map_location)
    if model is None:
        try:
            config = ViTConfig.from_dict(checkpoint["config"])
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{path} is a vitlab checkpoint whose 'config' field is not a valid ViTConfig: {err}"
            ) from None
        model = ViT(config)
    else:
        differences = config_differences(_vit_config(model), checkpoint["config"])
        if differences:
            raise ValueError(f"{path} was saved from a different model: " + "; ".join(differences))
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:  # missing, unexpected or mis-shaped weights, listed by load_state_dict
        details = " ".join(str(err).split("\n\t", 1)[-1].split())
        raise ValueError(f"{path} is a vitlab checkpoint whose weights do not fit its config: {details}") from None
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if checkpoint.get(name) is None:
            raise ValueError(f"{path} holds no {name} state (it was saved without one); cannot restore the {name}")
        target.load_state_dict(checkpoint[name])
    return model, checkpoint
