"""Callbacks behind the notebooks' widgets: plain functions from widget values to a figure.

Each ``*_view`` function takes the values of the widgets it is wired to, draws one matplotlib
figure with ``pyplot`` (so that ``ipywidgets.interactive_output`` shows it inline) and returns
``(figure, info)``, where ``info`` is a small dict of the numbers the figure shows. A notebook
wires them with ``functools.partial`` for the fixed arguments::

    out = widgets.interactive_output(partial(patch_grid_view, photo), {"patch_size": slider})

Legend: C channels, H/W height/width, P patch size, G grid side, N tokens, T keys in one row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from ..model.attention import local_window_mask
from ..model.patches import patchify

__all__ = ["attention_cost", "format_bytes", "patch_grid_view", "softmax_temperature_view", "window_mask_view"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """A byte count in binary units, e.g. 153664 -> '150.1 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def attention_cost(
    image_size: int | tuple[int, int], patch_size: int, channels: int = 3, cls_token: bool = True,
    bytes_per_score: int = 4,
) -> dict:
    """(image size, P) -> the sequence one image becomes, and the size of one attention map.

    Returns ``grid`` (rows, cols), ``num_patches``, ``patch_dim`` = P*P*C, ``seq_len`` (patches [+ CLS]),
    ``scores`` = seq_len**2 (one head, one layer) and ``attn_map_bytes`` = scores * bytes_per_score
    (4 for float32).
    """
    height, width = (image_size, image_size) if not isinstance(image_size, (tuple, list)) else image_size
    height, width = _positive_int("image height", height), _positive_int("image width", width)
    patch_size = _positive_int("patch_size", patch_size)
    channels = _positive_int("channels", channels)
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"patch_size must divide the image size; got patch_size={patch_size} for a {height}x{width} image "
            f"(divisors of {math.gcd(height, width)}: {_divisors(math.gcd(height, width))})"
        )
    grid = (height // patch_size, width // patch_size)
    num_patches = grid[0] * grid[1]
    seq_len = num_patches + int(bool(cls_token))
    return {
        "grid": grid,
        "num_patches": num_patches,
        "patch_dim": patch_size * patch_size * channels,
        "seq_len": seq_len,
        "scores": seq_len**2,
        "attn_map_bytes": seq_len**2 * bytes_per_score,
    }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _as_chw(image) -> torch.Tensor:
    """(H, W) or (C, H, W) tensor/array, C in {1, 3}, uint8 or float in [0, 1] -> float (C, H, W) in [0, 1]."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"expected an image tensor or array of shape (H, W) or (C, H, W); got {type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected an image of shape (H, W) or (C, H, W) with C = 1 or 3; got shape {tuple(image.shape)}"
        )
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image.float() / 255
    return image.float().clamp(0, 1)


def _show(ax, chw: torch.Tensor, **kwargs) -> None:
    """Draw a (C, H, W) image in [0, 1]: grayscale for C = 1, RGB for C = 3."""
    if chw.shape[0] == 1:
        ax.imshow(chw[0].numpy(), cmap="gray", vmin=0, vmax=1, **kwargs)
    else:
        ax.imshow(chw.permute(1, 2, 0).numpy(), **kwargs)


def _separated(chw: torch.Tensor, patch_size: int, gap: int) -> torch.Tensor:
    """(C, H, W) -> (C, H', W'): the patches laid out on a white canvas with ``gap`` pixels between them."""
    C, H, W = chw.shape
    rows, cols = H // patch_size, W // patch_size
    step = patch_size + gap
    canvas = torch.ones(C, rows * step - gap, cols * step - gap)
    for r in range(rows):
        for c in range(cols):
            canvas[:, r * step:r * step + patch_size, c * step:c * step + patch_size] = chw[
                :, r * patch_size:(r + 1) * patch_size, c * patch_size:(c + 1) * patch_size
            ]
    return canvas


def patch_grid_view(image, patch_size: int, cls_token: bool = True) -> tuple[plt.Figure, dict]:
    """(image (C, H, W) or (H, W), P) -> (figure, info): the image cut into P x P patches.

    Three panels: the image with the patch grid drawn on it; the patches pulled apart; the
    sequence ``vitlab.patchify`` makes of them, one row per patch (N rows of P*P*C values).
    ``info`` is ``attention_cost`` for this image and patch size (grid, num_patches, patch_dim,
    seq_len with the CLS token when ``cls_token``, scores, attn_map_bytes) plus patch_size.
    """
    chw = _as_chw(image)
    C, H, W = chw.shape
    info = attention_cost((H, W), patch_size, channels=C, cls_token=cls_token)
    P = info["patch_size"] = int(patch_size)
    rows, cols = info["grid"]
    sequence = patchify(chw[None], P)[0]  # (N, P*P*C)

    fig, (ax_grid, ax_parts, ax_seq) = plt.subplots(
        1, 3, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.75]}, layout="constrained"
    )
    _show(ax_grid, chw)
    line = {"colors": "tab:orange", "linewidth": 0.6 if rows > 32 else 1.2}
    ax_grid.vlines(np.arange(1, cols) * P - 0.5, -0.5, H - 0.5, **line)
    ax_grid.hlines(np.arange(1, rows) * P - 0.5, -0.5, W - 0.5, **line)
    ax_grid.set_title(f"{H}x{W} image, {P}x{P} patches")
    ax_grid.set_xticks([])
    ax_grid.set_yticks([])

    _show(ax_parts, _separated(chw, P, gap=max(1, P // 8)))
    ax_parts.set_title(f"{rows}x{cols} = {info['num_patches']} patches")
    ax_parts.axis("off")

    ax_seq.imshow(sequence.numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="antialiased")
    ax_seq.set_title(f"sequence: {info['num_patches']} x {info['patch_dim']}")
    ax_seq.set_xlabel("value in the patch vector (p1 p2 c)")
    ax_seq.set_ylabel("patch (token) index")

    cls = f"{info['seq_len']} tokens with CLS" if cls_token else f"{info['seq_len']} tokens"
    fig.suptitle(
        f"P = {P}: {cls}; attention scores per head and layer: {info['seq_len']}² = {info['scores']:,} "
        f"({format_bytes(info['attn_map_bytes'])} in float32)"
    )
    return fig, info


def _entropy(p: torch.Tensor) -> float:
    """Shannon entropy in nats; 0 * log 0 counts as 0."""
    return float(-(p * p.clamp_min(1e-30).log()).sum())


def softmax_temperature_view(
    scores, temperature: float, labels: Sequence[str] | None = None
) -> tuple[plt.Figure, dict]:
    """(scores (T,), temperature) -> (figure, info): the bar chart of softmax(scores / temperature).

    Dividing by a large temperature flattens the distribution towards uniform (entropy -> log T);
    a small one sharpens it towards the largest score (entropy -> 0). Attention's 1/sqrt(d) is a
    temperature of sqrt(d). ``info``: temperature, probs (T,), entropy and max_entropy (nats), max_prob.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim != 1 or scores.numel() < 2:
        raise ValueError(f"expected one row of at least 2 scores, shape (T,); got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("expected finite scores; got inf or nan")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0; got {temperature!r}")
    n = scores.numel()
    if labels is not None and len(labels) != n:
        raise ValueError(f"expected {n} labels, one per score; got {len(labels)}")
    probs = torch.softmax(scores / temperature, dim=0)
    info = {
        "temperature": float(temperature),
        "probs": probs,
        "entropy": _entropy(probs),
        "max_entropy": math.log(n),
        "max_prob": float(probs.max()),
    }

    fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    positions = np.arange(n)
    ax.bar(positions, probs.numpy(), color="tab:blue")
    ax.axhline(1 / n, color="gray", linestyle="--", linewidth=1, label=f"uniform, 1/{n}")
    ax.set_xticks(positions, labels if labels is not None else [str(i) for i in positions])
    ax.set_ylim(0, 1)
    ax.set_xlabel("key j")
    ax.set_ylabel("weight softmax(s_j / T)")
    ax.legend(loc="upper right")
    ax.set_title(
        f"T = {temperature:.3g}: entropy {info['entropy']:.3f} of at most {info['max_entropy']:.3f} nats, "
        f"largest weight {info['max_prob']:.3f}"
    )
    return fig, info


def window_mask_view(
    grid_size: int, window: int, query: int = 0, cls_token: bool = True
) -> tuple[plt.Figure, dict]:
    """(G, k, query patch) -> (figure, info): which keys a k x k local attention window lets each query see.

    Left: the (N, N) mask of ``vitlab.local_window_mask`` (white = may attend), the query's row
    outlined. Right: the G x G patch grid, the query patch and the patches in its window marked.
    ``query`` is a patch index, 0 .. G*G-1, row by row (the CLS token, if any, is not counted).
    ``info``: tokens, allowed_pairs, total_pairs, fraction, and query_sees (patches in the query's window).
    """
    grid_size = _positive_int("grid_size", grid_size)
    window = _positive_int("window", window)
    if window % 2 == 0:
        raise ValueError(f"window must be an odd k >= 1; got {window}")
    if isinstance(query, bool) or not isinstance(query, (int, np.integer)) or not 0 <= query < grid_size**2:
        raise ValueError(f"query must be a patch index in [0, {grid_size**2 - 1}]; got {query!r}")
    query = int(query)
    mask = local_window_mask(grid_size, window, cls_token=cls_token)  # (N, N)
    offset = int(bool(cls_token))
    row = mask[query + offset, offset:].reshape(grid_size, grid_size)  # the patches the query may attend to
    n = mask.shape[0]
    info = {
        "tokens": n,
        "allowed_pairs": int(mask.sum()),
        "total_pairs": n * n,
        "fraction": float(mask.sum()) / (n * n),
        "query_sees": int(row.sum()),
    }

    fig, (ax_mask, ax_grid) = plt.subplots(1, 2, figsize=(10, 4.6), layout="constrained")
    ax_mask.imshow(mask.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_mask.add_patch(Rectangle((-0.5, query + offset - 0.5), n, 1, fill=False, edgecolor="tab:red", linewidth=1.5))
    ax_mask.set_title(f"mask {n}x{n}: {info['allowed_pairs']:,} of {info['total_pairs']:,} pairs allowed "
                      f"({info['fraction']:.1%})")
    ax_mask.set_xlabel("key token" + (" (0 = CLS)" if cls_token else ""))
    ax_mask.set_ylabel("query token")

    picture = np.where(row.numpy(), 0.55, 0.0)
    picture[query // grid_size, query % grid_size] = 1.0
    ax_grid.imshow(picture, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax_grid.set_xticks(np.arange(grid_size))
    ax_grid.set_yticks(np.arange(grid_size))
    ax_grid.set_xticks(np.arange(grid_size + 1) - 0.5, minor=True)
    ax_grid.set_yticks(np.arange(grid_size + 1) - 0.5, minor=True)
    ax_grid.grid(which="minor", color="white", linewidth=1)
    ax_grid.tick_params(which="both", length=0, labelsize=7 if grid_size > 10 else 9)
    ax_grid.set_title(
        f"patch {query} (row {query // grid_size}, col {query % grid_size}) sees {info['query_sees']} patches"
        + (" + CLS" if cls_token else "")
    )
    return fig, info
