"""The attention explorer: pick a digit, a layer, a head and a view, and see where the ViT looks.

    explorer = AttentionExplorer(model, images, labels)    # images (M, C, H, W), as the model takes them
    fig = explorer.figure(index=3, view="cls", layer=2, head="all")
    display(explorer.widget())                              # the same, driven by ipywidgets

Every figure shows the view on the left and the model's softmax probabilities as bars on the right.
The views (``VIEWS``):

- ``"cls"``: what the CLS token attends to, row 0 of a layer's attention, over the image;
- ``"matrix"``: the whole N x N attention matrix of a layer (token 0 is CLS);
- ``"query"``: where one query patch looks, its row of the attention, over the image;
- ``"rollout"``: attention rollout through all layers (``vitlab.explain.attention_rollout``).

``head`` is a head index or ``"all"``, a grid of every head of the layer (like bertviz's model view).
A digit is recorded once (one ``vitlab.record`` per digit, kept in a small cache); redrawing with
another layer, head or view reuses the recording.

Also here, for the notebook's "traps of attention capture": ``head_weights`` (nn.MultiheadAttention
averages the heads by default), ``naive_attend_hook`` (a hook on the fused path sees nothing) and
``leaky_hooks`` / ``count_hooks`` (hooks registered without keeping their handles never go away);
and, for "Bring a pretrained ViT", ``load_photo_vit`` and ``photo_batch``.

Legend: M images in the set, B batch, C channels, H/W height/width, P patch size, G grid side in
patches, N tokens (1 CLS + G*G patches), D model dim, L layers, h heads, K classes.
"""

from __future__ import annotations

import io
import json
import math
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import ipywidgets as widgets
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import nn

from ..inside.explain import HEAD_FUSIONS, attention_rollout, cls_rollout_map, upsample_patch_map
from ..inside.record import record
from ..model.config import check_choice
from ..training.devices import device_of
from .plots import figure_png

VIEWS = ("cls", "matrix", "query", "rollout")
VIEW_LABELS = {
    "cls": "CLS \u2192 patches", "matrix": "attention matrix", "query": "one query patch", "rollout": "rollout",
}
VIEW_TIPS = {
    "cls": "row 0: what the CLS token takes from each patch",
    "matrix": "the whole N x N attention of the layer; rows are queries, columns keys",
    "query": "the row of one query patch: where that patch looks",
    "rollout": "attention rollout through all layers, heads fused",
}
ALL_HEADS = "all"
MAX_BARS = 10  # up to this many classes get one bar each; with more, the top TOP_CLASSES are shown
TOP_CLASSES = 5


# --- Predictions and mistakes -------------------------------------------------------------------


@torch.no_grad()
def predict_proba(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(M, C, H, W) -> (M, K): the model's softmax probabilities, computed batch by batch without gradients."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape (M, C, H, W); got {got}")
    device = device_of(model)
    chunks = [model(images[i:i + batch_size].to(device)).softmax(dim=-1).cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def find_mistakes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(M, C, H, W), (M,) -> (k,) int64: the indices, ascending, of the images whose predicted class is not their label.

    The model runs as it is: call ``model.eval()`` first so that dropout does not change the answer.
    """
    labels = torch.as_tensor(labels)
    if labels.shape != images.shape[:1]:
        raise ValueError(f"expected one label per image, shape ({len(images)},); got {tuple(labels.shape)}")
    predicted = predict_proba(model, images, batch_size).argmax(dim=-1)  # (M,)
    return torch.nonzero(predicted != labels.cpu()).flatten()


# --- What a view shows ---------------------------------------------------------------------------


def view_maps(
    attentions: torch.Tensor, grid_size: int, view: str = "cls", layer: int = 0, head: int | str = 0,
    query: int = 0, head_fusion: str = "mean", discard_ratio: float = 0.0,
) -> torch.Tensor:
    """(L, h, N, N) -> (k, G, G), or (k, N, N) for ``view="matrix"``: the maps a view shows, one per head.

    k is h for ``head="all"`` and 1 otherwise (and 1 for ``"rollout"``, which fuses the heads of
    every layer with ``head_fusion`` and ``discard_ratio`` and ignores ``layer`` and ``head``).
    ``query`` is a patch index, row-major over the G x G grid (token ``query + 1``).
    """
    if not isinstance(attentions, torch.Tensor) or attentions.ndim != 4:
        got = tuple(attentions.shape) if isinstance(attentions, torch.Tensor) else type(attentions).__name__
        raise ValueError(f"expected one image's attentions of shape (L, h, N, N); got {got}")
    L, h, N, _ = attentions.shape
    if N != grid_size * grid_size + 1:
        raise ValueError(f"expected N = 1 + {grid_size}*{grid_size} = {grid_size ** 2 + 1} tokens (CLS + patches); "
                         f"got N = {N}")
    check_choice("view", view, VIEWS)
    if view == "rollout":
        rollout = attention_rollout(attentions[None], head_fusion, discard_ratio)  # (1, N, N)
        return cls_rollout_map(rollout, grid_size)  # (1, G, G)
    check_choice("layer", layer, range(L))
    check_choice("head", head, (ALL_HEADS, *range(h)))
    maps = attentions[layer] if head == ALL_HEADS else attentions[layer, head][None]  # (k, N, N)
    if view == "matrix":
        return maps
    if view == "cls":
        rows = maps[:, 0, 1:]  # (k, G*G)
    else:
        check_choice("query", query, range(grid_size * grid_size))
        rows = maps[:, query + 1, 1:]
    return rows.reshape(-1, grid_size, grid_size)  # (k, G, G)


def _as_picture(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) or (H, W[, 3]) -> (H, W) or (H, W, 3) floats in [0, 1] for imshow, min-max scaled."""
    image = torch.as_tensor(image).detach().float().cpu()
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image[0] if image.shape[0] == 1 else image.permute(1, 2, 0)
    low, high = image.min(), image.max()
    return ((image - low) / (high - low).clamp_min(1e-12)).numpy()


SCALES = ("shared", "panel")  # one colour scale for all maps of a figure, or each map scaled to its own peak


def map_limits(maps: torch.Tensor, scale: str = "shared") -> list[float]:
    """(k, ...) maps -> k upper colour limits: the largest value of all maps ("shared"), or each map's own ("panel").

    With "shared", equally bright means equally strong in every panel, so heads can be compared; with
    "panel", each map uses the whole colour range, which shows the pattern of a weak head but hides
    how weak it is. The lower limit is always 0.
    """
    check_choice("scale", scale, SCALES)
    peaks = [max(float(values.max()), 1e-12) for values in maps.float()]
    return [max(peaks)] * len(peaks) if scale == "shared" else peaks


def cls_self_share(attentions: torch.Tensor, layer: int) -> torch.Tensor:
    """(L, h, N, N) -> (h,): the CLS token's attention to itself, A[layer, head, 0, 0], per head of ``layer``.

    Row 0 sums to 1 over CLS and the patches, so 1 minus this share is what the CLS -> patches maps show.
    """
    return attentions[layer, :, 0, 0]


def view_labels(view: str, layer: int, head: int | str, num_heads: int, head_fusion: str = "mean",
                discard_ratio: float = 0.0, what: str | None = None) -> tuple[list[int], list[str], str]:
    """-> (heads drawn, one title per map, heading) for ``view_maps``'s settings; ``what`` names the view in
    the heading (default ``VIEW_LABELS[view]``). The figure and the panel add what each shows of CLS."""
    if view == "rollout":
        return [], [f"{head_fusion} over heads, discard {discard_ratio:.2f}"], \
            "attention rollout through all layers: what reaches CLS"
    heads = list(range(num_heads)) if head == ALL_HEADS else [head]
    heading = f"layer {layer}, {'all heads' if head == ALL_HEADS else f'head {head}'}: {what or VIEW_LABELS[view]}"
    return heads, [f"head {k}" for k in heads], heading


def _draw_maps(fig: Figure, picture: np.ndarray, maps: torch.Tensor, view: str, titles: list[str],
               query: int | None, scale: str = "shared") -> None:
    """Draw the k maps in a grid on the left 62% of ``fig`` (a fixed layout: no layout engine, so redraws are fast).

    A colour bar to the right of the grid gives the scale: the shared one, or (``scale="panel"``) 0 to
    each map's own peak, written in the map's title.
    """
    k = len(maps)
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    matrix = view == "matrix"
    bottom, top, gap = (0.1, 0.86, 0.35) if matrix else (0.03, 0.86, 0.2)
    width, height = fig.get_size_inches()
    side = (top - bottom) * height / (rows + gap * (rows - 1))  # inches per square map
    span = min(0.56, (cols + gap * (cols - 1)) * side / width)  # centre the grid on the left part
    left = max(0.02, 0.31 - span / 2) + (0.04 if matrix else 0.0)
    grid = fig.add_gridspec(rows, cols, left=left, right=left + span, bottom=bottom, top=top, wspace=gap, hspace=gap)
    size = picture.shape[:2]
    limits = map_limits(maps, scale)
    mappable = None
    for index, (values, title, peak) in enumerate(zip(maps.float(), titles, limits)):
        ax = fig.add_subplot(grid[index // cols, index % cols])
        if scale == "panel" and k > 1:
            title = f"{title}\npeak {peak:.2f}"
        ax.set_title(title, fontsize=7, pad=2)
        if matrix:
            mappable = ax.imshow(values.numpy(), cmap="viridis", vmin=0.0, vmax=peak)
            n = values.shape[-1]
            ticks = [0] + list(range(4, n, 4)) if n <= 32 else [0]
            labels = ["CLS" if t == 0 else str(t) for t in ticks]
            ax.set_xticks(ticks, labels, fontsize=6)
            ax.set_yticks(ticks, labels, fontsize=6)
            if index % cols == 0:
                ax.set_ylabel("query token", fontsize=7)
            if index // cols == rows - 1:
                ax.set_xlabel("key token", fontsize=7)
            continue
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        mappable = ax.imshow(upsample_patch_map(values, size).numpy(), cmap="inferno", alpha=0.6, vmin=0.0, vmax=peak)
        if query is not None:  # outline the query patch, in the picture's pixels
            grid_size = values.shape[-1]
            row, col = divmod(query, grid_size)
            cell_h, cell_w = size[0] / grid_size, size[1] / grid_size
            ax.add_patch(Rectangle((col * cell_w - 0.5, row * cell_h - 0.5), cell_w, cell_h,
                                   fill=False, edgecolor="cyan", linewidth=2))
        ax.set_xticks([])
        ax.set_yticks([])
    bar = fig.add_axes((left + span + 0.015, bottom, 0.012, top - bottom))
    colorbar = fig.colorbar(mappable, cax=bar)
    colorbar.ax.tick_params(labelsize=6)
    if scale == "panel" and k > 1:
        colorbar.set_ticks([0.0, limits[-1]], labels=["0", "peak"])
    colorbar.set_label("attention" if view != "rollout" else "share of the peak", fontsize=7)


def _draw_bars(ax, probs: torch.Tensor, label: int | None, class_names: list[str]) -> None:
    probs = probs.float()
    predicted = int(probs.argmax())
    if len(probs) <= MAX_BARS:
        colors = ["#b0b0b0"] * len(probs)
        if label is not None and label != predicted:
            colors[predicted] = "#d62728"  # a wrong prediction in red
        if label is not None:
            colors[label] = "#2ca02c"  # the right answer in green
        ax.bar(range(len(probs)), probs.numpy(), color=colors)
        ax.set_xticks(range(len(probs)), class_names, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
    else:
        top = probs.topk(TOP_CLASSES)
        names = [class_names[i][:22] for i in top.indices.tolist()][::-1]
        colors = ["#2ca02c" if i == label else "#b0b0b0" for i in top.indices.tolist()][::-1]
        ax.barh(range(TOP_CLASSES), top.values.numpy()[::-1], color=colors)
        ax.set_yticks(range(TOP_CLASSES), names, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability")
    verdict = f"predicted {class_names[predicted]} ({100 * float(probs[predicted]):.0f}%)"
    ax.set_title(verdict if label is None else f"label {class_names[label]}, {verdict}", fontsize=9)


# --- A fast picture for the panel ----------------------------------------------------------------------

PANEL_SIDE = 140  # pixels per map in the panel's picture
PANEL_GAP = 10
PANEL_TITLE = 14  # pixels above each map for its title


def render_view(picture: np.ndarray, maps: torch.Tensor, view: str, titles: list[str], scale: str = "shared",
                query: int | None = None, alpha: float = 0.6) -> np.ndarray:
    """(H, W[, 3]) picture in [0, 1], (k, G, G) or (k, N, N) maps -> (height, width, 3) uint8: maps in a row, colour bar.

    The panel's picture, drawn with numpy and PIL instead of a matplotlib figure (a few milliseconds
    instead of a few hundred): each map upsampled to PANEL_SIDE pixels, coloured with inferno over
    the picture (viridis, alone, for the matrix view), its title above it, and a colour bar with its
    limits on the right. ``scale`` as in ``map_limits``.
    """
    from matplotlib import colormaps
    from PIL import Image as PILImage
    from PIL import ImageDraw

    k = len(maps)
    limits = map_limits(maps, scale)
    matrix = view == "matrix"
    cmap = colormaps["viridis" if matrix else "inferno"]
    side, gap, head = PANEL_SIDE, PANEL_GAP, PANEL_TITLE
    bar_width, bar_room = 12, 48
    width = k * side + (k - 1) * gap + gap + bar_width + bar_room
    canvas = np.full((head + side + 4, width, 3), 255, dtype=np.uint8)
    base = None
    if not matrix:
        grey = torch.as_tensor(picture).float()
        grey = grey if grey.ndim == 3 else grey[..., None].expand(*grey.shape, 3)
        base = F.interpolate(grey.permute(2, 0, 1)[None], size=(side, side), mode="nearest")[0].permute(1, 2, 0).numpy()
    for index, (values, peak) in enumerate(zip(maps.float(), limits)):
        scaled = F.interpolate(values[None, None], size=(side, side), mode="nearest")[0, 0].numpy() / peak
        colour = cmap(np.clip(scaled, 0, 1))[..., :3]
        if base is not None:
            colour = (1 - alpha) * base + alpha * colour
        x = index * (side + gap)
        canvas[head:head + side, x:x + side] = np.round(colour * 255).astype(np.uint8)
        if query is not None and not matrix:
            grid = values.shape[-1]
            row, col = divmod(query, grid)
            cell = side / grid
            y0, x0 = head + round(row * cell), x + round(col * cell)
            y1, x1 = head + round((row + 1) * cell) - 1, x + round((col + 1) * cell) - 1
            canvas[y0:y1 + 1, [x0, x0 + 1, x1 - 1, x1]] = (0, 255, 255)
            canvas[[y0, y0 + 1, y1 - 1, y1], x0:x1 + 1] = (0, 255, 255)
    bar_x = k * side + (k - 1) * gap + gap
    ramp = cmap(np.linspace(1, 0, side))[:, :3]
    canvas[head:head + side, bar_x:bar_x + bar_width] = np.round(ramp[:, None] * 255).astype(np.uint8)
    image = PILImage.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for index, title in enumerate(titles):
        if scale == "panel" and k > 1:
            title = f"{title} (peak {limits[index]:.2f})"
        draw.text((index * (side + gap), 1), title, fill=(0, 0, 0))
    top_label = f"{limits[0]:.2f}" if scale == "shared" or k == 1 else "peak"
    draw.text((bar_x + bar_width + 3, head), top_label, fill=(0, 0, 0))
    draw.text((bar_x + bar_width + 3, head + side - 11), "0", fill=(0, 0, 0))
    return np.asarray(image)


def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (fast zlib level: the panel redraws on every change)."""
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(rgb).save(buffer, format="png", compress_level=1)
    return buffer.getvalue()


# --- The explorer ----------------------------------------------------------------------------------


class Recorded(NamedTuple):
    """One image's recorded forward pass."""

    attentions: torch.Tensor  # (L, h, N, N), rows sum to 1
    probs: torch.Tensor  # (K,), the softmax of the logits


class AttentionExplorer:
    """Figures of where a vitlab ViT attends, for one image of a set at a time.

    ``images`` (M, C, H, W) are what the model takes (normalised); ``labels`` (M,) may be None
    (then there are no mistakes to find). ``display_images`` ((M, H, W) or (M, H, W, 3)) are drawn
    instead of the min-max scaled inputs, e.g. a photo before its normalisation. ``class_names``
    default to "0", "1", ... The model runs as it is: call ``model.eval()`` first.
    """

    def __init__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
        class_names: list[str] | None = None, display_images: torch.Tensor | None = None, cache_size: int = 16,
    ) -> None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "blocks"):
            raise ValueError(f"expected a vitlab ViT (convert others with vitlab.interop); got {type(model).__name__}")
        expected = f"(M, {config.in_channels}, {config.image_size}, {config.image_size})"
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1:] != (
                config.in_channels, config.image_size, config.image_size):
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape {expected}, as the model takes them; got {got}")
        if labels is not None:
            labels = torch.as_tensor(labels).long()
            if labels.shape != images.shape[:1]:
                raise ValueError(f"expected one label per image, shape ({len(images)},); got {tuple(labels.shape)}")
        if display_images is not None and len(display_images) != len(images):
            raise ValueError(f"expected one display image per image ({len(images)}); got {len(display_images)}")
        if config.num_classes == 0:
            raise ValueError("expected a classifier, whose predictions the explorer shows; got a model with "
                             "num_classes=0 (no head)")
        names = [str(i) for i in range(config.num_classes)] if class_names is None else list(class_names)
        if len(names) != config.num_classes:
            raise ValueError(f"expected {config.num_classes} class names (config.num_classes); got {len(names)}")
        self.model = model
        self.images = images
        self.labels = labels
        self.class_names = names
        self.display_images = display_images
        self.grid_size = config.grid_size
        self.patch_size = config.patch_size
        self.num_layers = config.depth
        self.num_heads = config.heads
        self.cache_size = cache_size
        self.forward_passes = 0  # recorded forward passes so far: one per digit not in the cache
        self._cache: OrderedDict[int, Recorded] = OrderedDict()
        self._mistakes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def _check_index(self, index: int) -> None:
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self):
            raise ValueError(f"index must be an int in [0, {len(self) - 1}]; got {index!r}")

    def recorded(self, index: int) -> Recorded:
        """-> Recorded(attentions (L, h, N, N), probs (K,)) of image ``index``: recorded once, then cached."""
        self._check_index(index)
        index = int(index)
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        with torch.no_grad(), record(self.model) as rec:
            logits = self.model(self.images[index:index + 1].to(device_of(self.model)))  # (1, K)
        self.forward_passes += 1
        result = Recorded(rec.attentions[0].float().cpu(), logits[0].softmax(dim=-1).float().cpu())
        self._cache[index] = result
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def maps(self, index: int, view: str = "cls", layer: int = 0, head: int | str = 0, query: int = 0,
             head_fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
        """-> (k, G, G) or (k, N, N): what ``figure`` draws for these settings (see ``view_maps``)."""
        return view_maps(self.recorded(index).attentions, self.grid_size, view, layer, head, query, head_fusion,
                         discard_ratio)

    def picture(self, index: int) -> np.ndarray:
        """-> (H, W) or (H, W, 3) floats in [0, 1]: image ``index`` as the figures draw it."""
        self._check_index(index)
        source = self.display_images if self.display_images is not None else self.images
        return _as_picture(source[index])

    def figure(self, index: int = 0, view: str = "cls", layer: int = 0, head: int | str = 0, query: int = 0,
               head_fusion: str = "mean", discard_ratio: float = 0.0, scale: str = "shared",
               fig: Figure | None = None) -> Figure:
        """-> Figure: the view of image ``index`` (left) beside the model's probabilities (right).

        In the view's axes the attention map is the last image (``ax.images[-1]``); over a picture it
        is drawn on top of it. ``scale``: "shared" (one colour scale for all heads) or "panel" (each
        head to its own peak); a colour bar shows it. In the CLS view each head's title gives the CLS
        token's attention to itself (``cls_self_share``), the part of row 0 the map does not show.
        Returns ``fig``, or a new Figure (not registered with pyplot).
        """
        check_choice("scale", scale, SCALES)
        maps = self.maps(index, view, layer, head, query, head_fusion, discard_ratio)
        probs = self.recorded(index).probs
        fig = fig if fig is not None else Figure(figsize=(9, 4.2))
        what = f"query patch (row {query // self.grid_size}, col {query % self.grid_size})" if view == "query" else None
        heads, titles, heading = view_labels(view, layer, head, self.num_heads, head_fusion, discard_ratio, what)
        if view == "cls":
            share = cls_self_share(self.recorded(index).attentions, layer)
            titles = [f"{title}, CLS\u2192CLS {float(share[k]):.2f}" for title, k in zip(titles, heads)]
        _draw_maps(fig, self.picture(index), maps, view, titles, query if view == "query" else None, scale)
        fig.text(0.33, 0.97, f"#{index}  {heading}", ha="center", va="top", fontsize=10)
        label = None if self.labels is None else int(self.labels[index])
        many = len(probs) > MAX_BARS  # horizontal bars with class names need room on the left
        _draw_bars(fig.add_axes((0.8 if many else 0.7, 0.12, 0.18 if many else 0.28, 0.76)), probs, label,
                   self.class_names)
        return fig

    def png(self, index: int = 0, dpi: int = 80, **settings) -> bytes:
        """-> PNG bytes of ``figure(index, **settings)``."""
        return figure_png(self.figure(index, **settings), dpi=dpi)

    @property
    def mistakes(self) -> torch.Tensor:
        """(k,) int64: the indices of the misclassified images (``find_mistakes``, computed once)."""
        if self.labels is None:
            raise ValueError("expected labels to find mistakes; this explorer was made with labels=None")
        if self._mistakes is None:
            self._mistakes = find_mistakes(self.model, self.images, self.labels)
        return self._mistakes

    def next_mistake(self, after: int = -1) -> int | None:
        """-> the first misclassified index after ``after``, wrapping around to the start; None if there is none."""
        mistakes = self.mistakes
        if len(mistakes) == 0:
            return None
        later = mistakes[mistakes > after]
        return int(later[0] if len(later) else mistakes[0])

    def widget(self, **initial) -> "ExplorerPanel":
        """-> the ipywidgets panel driving this explorer (``build_panel``); display it with ``display(...)``."""
        return build_panel(self, **initial)


# --- The widget panel --------------------------------------------------------------------------------


def build_panel(explorer: AttentionExplorer, index: int = 0, view: str = "cls", layer: int = 0,
                head: int | str = ALL_HEADS, query: int = 0, head_fusion: str = "mean", discard_ratio: float = 0.0,
                scale: str = "shared") -> "ExplorerPanel":
    """-> an ipywidgets VBox: the controls above a caption, the view's picture and the probabilities.

    The controls are attributes of the panel: ``digit``, ``mistake`` (the "Show me a mistake"
    button), ``layer``, ``head``, ``view``, ``scale`` (shared / per panel), ``query``, ``fusion``,
    ``discard``, ``status``. The picture is the Image widget ``out`` (drawn by ``render_view``, PNG in
    ``png``, the maps it shows in ``shown``), the caption ``caption`` (the heading and, in the CLS
    view, each head's CLS-to-itself share), and the probabilities ``bars`` (a matplotlib chart drawn
    once per digit).
    """
    return ExplorerPanel(explorer, index, view, layer, head, query, head_fusion, discard_ratio, scale)


class ExplorerPanel(widgets.VBox):
    """The attention explorer's controls above its picture; a change redraws only the picture, from the cached recording."""

    def __init__(self, explorer: AttentionExplorer, index: int = 0, view: str = "cls", layer: int = 0,
                 head: int | str = ALL_HEADS, query: int = 0, head_fusion: str = "mean", discard_ratio: float = 0.0,
                 scale: str = "shared") -> None:
        super().__init__()
        self.explorer = explorer
        self.png = b""  # the picture shown, as PNG bytes
        self.shown: torch.Tensor | None = None  # the maps it shows, (k, G, G) or (k, N, N)
        self.renders = 0
        self._bars: OrderedDict[int, bytes] = OrderedDict()  # digit -> PNG of its probabilities
        G = explorer.grid_size
        wide = {"description_width": "initial"}
        self.digit = widgets.IntSlider(value=index, min=0, max=len(explorer) - 1, description="digit",
                                       continuous_update=False)
        self.mistake = widgets.Button(description="Show me a mistake", icon="search",
                                      disabled=explorer.labels is None, layout=widgets.Layout(width="auto"))
        self.layer = widgets.IntSlider(value=layer, min=0, max=explorer.num_layers - 1, description="layer",
                                       continuous_update=False)
        self.head = widgets.Dropdown(
            options=[("all heads", ALL_HEADS)] + [(f"head {k}", k) for k in range(explorer.num_heads)],
            value=head, description="head")
        self.view = widgets.ToggleButtons(options=[(VIEW_LABELS[v], v) for v in VIEWS], value=view,
                                          tooltips=[VIEW_TIPS[v] for v in VIEWS], style={"button_width": "auto"})
        self.scale = widgets.ToggleButtons(options=[("shared scale", "shared"), ("per panel", "panel")], value=scale,
                                           tooltips=["one colour scale for every head: compare their strength",
                                                     "each head to its own peak: see a weak head's pattern"],
                                           style={"button_width": "auto"})
        self.query = widgets.Dropdown(options=[(f"row {r}, col {c}", r * G + c) for r in range(G) for c in range(G)],
                                      value=query, description="query patch", style=wide)
        self.fusion = widgets.Dropdown(options=HEAD_FUSIONS, value=head_fusion, description="head fusion",
                                       style=wide)
        self.discard = widgets.FloatSlider(value=discard_ratio, min=0.0, max=0.95, step=0.05,
                                           description="discard ratio", readout_format=".2f",
                                           continuous_update=False, style=wide)
        self.status = widgets.Label()
        self.caption = widgets.HTML()
        self.out = widgets.Image(format="png")
        self.bars = widgets.Image(format="png", layout=widgets.Layout(width="260px"))
        for name in ("digit", "mistake", "layer", "head", "view", "scale", "query", "fusion", "discard", "status",
                     "caption", "out", "bars"):
            getattr(self, name).add_class(f"vitlab-explorer-{name}")  # stable handles for the browser test
        self.mistake.on_click(self._next_mistake)
        for control in (self.digit, self.layer, self.head, self.view, self.scale, self.query, self.fusion,
                        self.discard):
            control.observe(self._redraw, "value")
        self._redraw()
        ui = widgets.VBox([
            widgets.HBox([self.digit, self.mistake, self.status]),
            widgets.HBox([self.layer, self.head]),
            widgets.HBox([self.view, self.scale]),
            widgets.HBox([self.query, self.fusion, self.discard]),
        ])
        self.children = [ui, self.caption, widgets.HBox([self.out, self.bars])]
        self.add_class("vitlab-explorer")

    def settings(self) -> dict:
        """-> the controls' values, as ``AttentionExplorer.figure`` takes them."""
        return dict(index=self.digit.value, view=self.view.value, layer=self.layer.value, head=self.head.value,
                    query=self.query.value, head_fusion=self.fusion.value, discard_ratio=self.discard.value,
                    scale=self.scale.value)

    def _redraw(self, change=None) -> None:
        """Grey out what the view ignores, then draw the picture (and, for a new digit, the bars)."""
        explorer, view = self.explorer, self.view.value
        self.layer.disabled = self.head.disabled = view == "rollout"
        self.query.disabled = view != "query"
        self.fusion.disabled = self.discard.disabled = view != "rollout"
        index, layer, head = self.digit.value, self.layer.value, self.head.value
        maps = explorer.maps(index, view, layer, head, self.query.value, self.fusion.value, self.discard.value)
        heads, titles, heading = view_labels(view, layer, head, explorer.num_heads, self.fusion.value,
                                             self.discard.value)
        if view == "rollout":
            heading += " (its own share left out)"
        if view == "cls":
            share = cls_self_share(explorer.recorded(index).attentions, layer)
            heading += "; CLS\u2192CLS (not drawn): " + ", ".join(f"head {k} {float(share[k]):.2f}" for k in heads)
        self.caption.value = f"<b>#{index}</b> {heading}"
        query = self.query.value if view == "query" else None
        self.shown = maps
        self.png = png_bytes(render_view(explorer.picture(index), maps, view, titles, self.scale.value, query))
        self.out.value = self.png
        if index not in self._bars:
            self._bars[index] = self._bars_png(index)
            while len(self._bars) > explorer.cache_size:
                self._bars.popitem(last=False)
        self.bars.value = self._bars[index]
        self.renders += 1

    def _bars_png(self, index: int) -> bytes:
        fig = Figure(figsize=(3.2, 2.4))
        label = None if self.explorer.labels is None else int(self.explorer.labels[index])
        _draw_bars(fig.add_axes((0.18, 0.15, 0.78, 0.72)), self.explorer.recorded(index).probs, label,
                   self.explorer.class_names)
        return figure_png(fig)

    def _next_mistake(self, button=None) -> None:
        found = self.explorer.next_mistake(self.digit.value)
        if found is None:
            self.status.value = f"no mistakes: the model gets all {len(self.explorer)} right"
            return
        mistakes = self.explorer.mistakes
        self.status.value = f"mistake {int((mistakes < found).sum()) + 1} of {len(mistakes)}"
        self.digit.value = found  # redraws through the digit slider's observer


# --- The traps of attention capture -----------------------------------------------------------------


@torch.no_grad()
def head_weights(mha: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, D) -> ((B, N, N), (B, h, N, N)): nn.MultiheadAttention's weights with its defaults, and per head.

    With its defaults (``need_weights=True, average_attn_weights=True``) the module returns the
    weights averaged over the heads; ``average_attn_weights=False`` keeps one map per head.
    ``mha`` must be ``batch_first=True``; this is self-attention (query = key = value = x).
    """
    if not mha.batch_first:
        raise ValueError("expected nn.MultiheadAttention(..., batch_first=True), to take x as (B, N, D); got "
                         "batch_first=False")
    _, averaged = mha(x, x, x)  # the defaults: need_weights=True, average_attn_weights=True
    _, per_head = mha(x, x, x, need_weights=True, average_attn_weights=False)
    return averaged, per_head


def count_hooks(model: nn.Module) -> int:
    """-> the number of forward and forward-pre hooks registered on ``model`` and all its submodules."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def naive_attend_hook(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """-> what a plain forward hook on each block's ``attn.attend`` (the softmax) saw during one forward pass.

    The hooks' handles are kept and removed afterwards, so this leaves the model as it was. On the
    explicit path it captures L tensors (B, h, N, N); on the fused path
    (``model.set_attention(True)``) the softmax module never runs, and it captures nothing.
    """
    captured = []
    handles = [block.attn.attend.register_forward_hook(lambda module, args, out: captured.append(out))
               for block in model.blocks]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def leaky_hooks(model: nn.Module, images: torch.Tensor, pattern: str = "attn") -> list[torch.Tensor]:
    """-> what hooks on every module whose name contains ``pattern`` captured in one forward pass. LEAKS HOOKS.

    The pattern of many public snippets: the handles that ``register_forward_hook`` returns are
    dropped, so the hooks stay on the model for good (``count_hooks`` grows with every call, and
    every later forward pass keeps appending to lists nobody reads), and a name substring matches
    far more than the attention probabilities (q, k, v, the scores before the softmax, ...).
    Use it on a throwaway copy of a model.
    """
    captured = []
    for name, module in model.named_modules():
        if pattern in name:
            module.register_forward_hook(lambda module, args, out: captured.append(out))  # handle dropped
    model(images)
    return captured


# --- Bring a pretrained ViT ----------------------------------------------------------------------------

PHOTO_TIMM_MODELS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
PHOTO_HF_MODELS = ("google/vit-base-patch16-224",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class PhotoViT:
    """A pretrained ImageNet ViT converted to vitlab, with what its inputs need."""

    model: nn.Module  # a vitlab ViT in eval mode
    mean: tuple[float, float, float]  # the normalisation it was trained with
    std: tuple[float, float, float]
    class_names: list[str]
    source: str  # e.g. "timm vit_tiny_patch16_224 (from the local cache)"


def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` seconds (name lookup included)."""
    result = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)  # a name lookup ignores socket timeouts
    thread.start()
    thread.join(timeout)
    return bool(result)


def _cached_file(repo_id: str, filenames: tuple[str, ...], cache_dir) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(path, str):
            return path
    return None


def _timm_photo_vit(name: str, weights: str | None, source: str) -> PhotoViT:
    import timm
    from timm.data import ImageNetInfo

    from ..inside.interop import from_timm

    if weights is None:  # download through timm (the Hugging Face hub)
        peer = timm.create_model(name, pretrained=True)
    else:
        peer = timm.create_model(name, pretrained=False)
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        peer.load_state_dict(state)
    cfg = peer.pretrained_cfg
    info = ImageNetInfo()
    names = [info.index_to_description(i) for i in range(peer.num_classes)]
    return PhotoViT(from_timm(peer.eval()).eval(), tuple(cfg.get("mean", IMAGENET_MEAN)),
                    tuple(cfg.get("std", IMAGENET_STD)), names, source)


def _hf_photo_vit(repo_id: str, cache_dir) -> PhotoViT:
    from transformers import ViTForImageClassification

    from ..inside.interop import from_huggingface

    peer = ViTForImageClassification.from_pretrained(repo_id, local_files_only=True, cache_dir=cache_dir)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    processor = _cached_file(repo_id, ("preprocessor_config.json",), cache_dir)
    if processor is not None:
        settings = json.loads(open(processor).read())
        mean, std = tuple(settings.get("image_mean", mean)), tuple(settings.get("image_std", std))
    names = [peer.config.id2label[i] for i in range(peer.config.num_labels)]
    return PhotoViT(from_huggingface(peer.eval()).eval(), mean, std, names,
                    f"Hugging Face {repo_id} (from the local cache)")


def load_photo_vit(online: bool | None = None, cache_dir=None, timeout: float = 3.0) -> tuple[PhotoViT | None, str]:
    """-> (PhotoViT or None, one line saying which model, or why none): a pretrained ImageNet ViT, without waiting.

    Looks first in the local Hugging Face cache (no network), for the timm models
    ``PHOTO_TIMM_MODELS`` and then the transformers models ``PHOTO_HF_MODELS``. With nothing cached
    it downloads timm's ``vit_tiny_patch16_224`` (23 MB), but only if ``online`` is True, or is None,
    HF_HUB_OFFLINE is not set and huggingface.co answers within ``timeout`` seconds. ``cache_dir`` is
    the hub cache to search (default: the usual one). Needs ``timm`` (or ``transformers``) and ``huggingface_hub``.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return None, "Skipping: a pretrained ViT needs huggingface_hub and timm (pip install 'vitlab[interop]')"
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE)
    for name in PHOTO_TIMM_MODELS:
        if not any(cache.glob(f"models--timm--{name}*")):
            continue  # not cached: no need to import timm to look closer
        try:
            import timm
        except ImportError:
            break
        repo_id = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None)
        weights = _cached_file(repo_id, ("model.safetensors", "pytorch_model.bin"), cache_dir) if repo_id else None
        if weights is not None:
            try:
                photo = _timm_photo_vit(name, weights, f"timm {name} (from the local cache)")
            except (OSError, RuntimeError, ValueError):
                continue  # an unreadable or incompatible file: try the next model
            return photo, f"Using {photo.source}"
    for repo_id in PHOTO_HF_MODELS:
        if _cached_file(repo_id, ("config.json",), cache_dir) is not None:
            try:
                photo = _hf_photo_vit(repo_id, cache_dir)
                return photo, f"Using {photo.source}"
            except (ImportError, OSError, RuntimeError, ValueError):
                pass  # transformers missing, the weights not cached beside the config, or unconvertible
    if online is None:  # HF_HUB_OFFLINE=1 means: do not even try
        online = not constants.HF_HUB_OFFLINE and _reachable("huggingface.co", 443, timeout)
    if not online:
        return None, ("Skipping: no pretrained ViT in the local Hugging Face cache and no network "
                      f"(run timm.create_model('{PHOTO_TIMM_MODELS[0]}', pretrained=True) once online)")
    name = PHOTO_TIMM_MODELS[0]
    try:
        import timm  # noqa: F401
    except ImportError:
        return None, "Skipping: downloading a pretrained ViT needs timm (pip install 'vitlab[interop]')"
    try:
        photo = _timm_photo_vit(name, None, f"timm {name} (downloaded)")
    except Exception as err:  # noqa: BLE001 - any download failure means: skip this section
        return None, f"Skipping: downloading timm {name} failed ({type(err).__name__})"
    return photo, f"Using {photo.source}"


def photo_batch(photo: np.ndarray, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W, 3) uint8 -> ((1, 3, size, size) normalised, (1, size, size, 3) in [0, 1]): a photo as a ViT takes it.

    The photo is centre-cropped to a square, resized (bilinear, antialiased) and normalised
    with ``mean`` and ``std``; the second tensor is the resized photo for drawing.
    """
    array = np.asarray(photo)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB photo of shape (H, W, 3); got {array.shape}")
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / (255.0 if array.dtype == np.uint8 else 1.0)
    H, W = image.shape[-2:]
    side = min(H, W)
    top, left = (H - side) // 2, (W - side) // 2
    image = image[:, top:top + side, left:left + side]  # (3, side, side)
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)  # (1, 3, size, size)
    shown = image.permute(0, 2, 3, 1).clone()  # (1, size, size, 3)
    normalised = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return normalised, shown
