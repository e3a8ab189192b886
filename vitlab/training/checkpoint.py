"""Checkpoints: a plain dict of tensors and numbers, written atomically and read without running code.

A checkpoint holds ``format`` ("vitlab-checkpoint"), ``version`` (2), ``config`` (``ViTConfig.to_dict()``),
``model`` (the state dict), ``optimizer`` and ``scheduler`` state (or None), ``history``
(``History.to_dict()`` or None), ``data_source``, ``rng`` (python, numpy, torch and CUDA generator
states, to resume exactly) and ``extra`` (whatever the caller adds; ``fit`` keeps its own state there).
Version 2 stores the history's step rows as columns; version 1 files, with step rows, still load.

Reading uses ``torch.load(weights_only=True)``: a file that holds anything but tensors and plain
containers (a pickled class, a function) is refused, so a downloaded checkpoint cannot run code.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
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
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path, map_location) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    size = path.stat().st_size
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"{path} ({size} bytes) is truncated or not a torch file: {err}") from err
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"a {found.group(1)} object" if found else "objects other than tensors and plain containers"
        raise ValueError(
            f"refusing to load {path}: it holds {what}, and vitlab loads only tensors and plain containers "
            "(torch.load with weights_only=True) so that a checkpoint cannot run code"
        ) from err
    except Exception as err:  # torch reports a cut or foreign file as EOFError, RuntimeError, OSError, KeyError...
        raise ValueError(
            f"{path} ({size} bytes) is truncated or not a torch file: {type(err).__name__}: {str(err)[:200]}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not a vitlab checkpoint: expected a dict, found a {type(checkpoint).__name__}")
    if checkpoint.get("format") != FORMAT:
        if "format" in checkpoint:
            found = f"format tag {checkpoint['format']!r}"
        else:
            found = f"keys {sorted(map(str, checkpoint))}"
        raise ValueError(f"{path} is not a vitlab checkpoint: expected format {FORMAT!r}, found {found}")
    if checkpoint.get("version") not in READS:
        raise ValueError(
            f"{path} is a vitlab checkpoint of version {checkpoint.get('version')!r}; "
            f"this vitlab reads versions {list(READS)}"
        )
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
    a missing file and ``ValueError`` for a truncated or non-torch file (with its size), a file that is
    not a vitlab checkpoint (naming its format tag or keys), a file holding code, a ``model`` whose config
    differs (naming each field: model vs checkpoint), or a missing optimizer/scheduler state. The global
    random generators are not touched; ``set_rng_state(checkpoint["rng"])`` restores them.
    """
    path = Path(path)
    checkpoint = _read(path, map_location)
    if model is None:
        model = ViT(ViTConfig.from_dict(checkpoint["config"]))
    else:
        differences = config_differences(_vit_config(model), checkpoint["config"])
        if differences:
            raise ValueError(f"{path} was saved from a different model: " + "; ".join(differences))
    model.load_state_dict(checkpoint["model"])
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        if checkpoint.get(name) is None:
            raise ValueError(f"{path} holds no {name} state (it was saved without one); cannot restore the {name}")
        target.load_state_dict(checkpoint[name])
    return model, checkpoint
