"""Pictures of the architecture, drawn from a ViTConfig, so that they never disagree with the code.

    display(pipeline_figure(ViTConfig(image_size=21, patch_size=7)))   # image -> 9 patches -> ... -> MLP head
    display(block_figure(ViTConfig()))                                 # pre-norm and post-norm blocks side by side
    display(heads_figure(ViTConfig()))                                 # one Linear(D, 3D), h heads, concatenate, proj

Each figure draws one box per step of a list (``pipeline_steps``, ``block_steps``, ``heads_steps``) whose
shapes are computed from the config; ``tests/test_diagrams.py`` runs a model of that config through
``vitlab.record`` and checks every shape against the recorded one. Every function returns a matplotlib
``Figure`` built without pyplot; a step's box carries ``gid="step"``, so its patch can be found again.

Legend: C channels, H/W height/width, P patch size, G patches along a side, N tokens (1 CLS + G*G),
D model dim, h heads, d head dim, M MLP width, L layers, K classes.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from ..model.config import ViTConfig

MAX_HEADS_DRAWN = 6  # more heads than this are drawn as the first ones, an ellipsis and the last one

COLOURS = {  # one colour per kind of step, the same in every figure
    "data": "#e8eef7", "linear": "#fde9c8", "token": "#f9d5d3", "norm": "#d9ecd0", "attention": "#e3d7f0",
    "mlp": "#fff3b0", "add": "#ffffff", "head": "#cfe7ea",
}


class Step(NamedTuple):
    """One box of a diagram: what it shows, the shape of its output for one image, and the recorder's step name."""

    title: str
    detail: str
    shape: tuple[int, ...]
    kind: str  # a key of COLOURS
    record: str | None = None  # the name of this step in ``vitlab.record``'s trace (block steps: inside block 0)


def fmt(shape: tuple[int, ...]) -> str:
    """(17, 64) -> '(17, 64)'; (64,) -> '(64,)': a shape as Python prints it."""
    return str(tuple(shape))


def _check_config(config) -> ViTConfig:
    if not isinstance(config, ViTConfig):
        raise ValueError(f"expected a vitlab ViTConfig; got {type(config).__name__}")  # noqa: TRY004 (as ViT does)
    return config


# --- The steps, from the config ---------------------------------------------------------------------------


def pipeline_steps(config: ViTConfig) -> list[Step]:
    """ViTConfig -> the steps from image to class scores, each with its output shape for one image."""
    c = _check_config(config)
    C, H, P, G, D = c.in_channels, c.image_size, c.patch_size, c.grid_size, c.dim
    n, N = c.num_patches, c.num_tokens
    steps = [
        Step("image", f"C x H x W = {C} x {H} x {H}", (C, H, H), "data", "input"),
        Step(f"{n} patches", f"{G} x {G} grid of {P} x {P} x {C}: x1 .. x{n}", (n, C, P, P), "data"),
        Step("flatten", f"x_i has P*P*C = {P * P * C} values", (n, P * P * C), "data", "patch_embed.patches"),
        Step("z_i = W x_i", f"W: D x P*P*C = {D} x {P * P * C}", (n, D), "linear", "patch_embed"),
        Step("+ class token", "z0 in front: N = G*G + 1", (N, D), "token", "cls_token"),
        Step("+ positions", f"z_i + p_i, i = 0 .. {n}", (N, D), "token", "pos_embed"),
        Step("encoder", f"L = {c.depth} {c.norm}-norm blocks, {c.heads} heads", (N, D), "attention",
             "norm" if c.norm == "pre" else f"blocks.{c.depth - 1}"),
    ]
    if c.pool == "cls":
        steps.append(Step("o0", "the class token's output", (D,), "token", "pool"))
    else:
        steps.append(Step(f"mean of o1 .. o{n}", "the patch tokens' outputs, averaged", (D,), "token", "pool"))
    if c.num_classes:
        steps.append(Step("MLP head", f"Linear(D, K) = Linear({D}, {c.num_classes})", (c.num_classes,), "head",
                          "head"))
    return steps


def block_steps(config: ViTConfig, norm: str | None = None) -> list[Step]:
    """ViTConfig -> the steps of one encoder block, pre-norm or post-norm (``norm``, default the config's)."""
    c = _check_config(config)
    norm = c.norm if norm is None else norm
    if norm not in ("pre", "post"):
        raise ValueError(f"norm must be 'pre' or 'post'; got {norm!r}")
    N, D, M = c.num_tokens, c.dim, c.mlp_dim
    x = Step("x", "the block's input tokens", (N, D), "data")
    attn = Step("multi-head attention", f"h = {c.heads} heads of d = {c.head_dim}", (N, D), "attention", "attn")
    mlp = Step("MLP", f"Linear {D} -> {M}, GELU, Linear {M} -> {D}", (N, D), "mlp", "mlp")
    if norm == "pre":
        return [x, Step("LayerNorm", "norm1", (N, D), "norm", "norm1"), attn,
                Step("+", "x + attention(norm1(x))", (N, D), "add", "residual1"),
                Step("LayerNorm", "norm2", (N, D), "norm", "norm2"), mlp,
                Step("+", "x + MLP(norm2(x))", (N, D), "add")]
    return [x, attn, Step("+", "x + attention(x)", (N, D), "add", "residual1"),
            Step("LayerNorm", "norm1", (N, D), "norm", "norm1"), mlp,
            Step("+", "x + MLP(x)", (N, D), "add"), Step("LayerNorm", "norm2", (N, D), "norm", "norm2")]


def heads_steps(config: ViTConfig) -> list[Step]:
    """ViTConfig -> the steps of multi-head attention; the per-head steps have a head's shape, (N, d) or (N, N)."""
    c = _check_config(config)
    N, D, h, d = c.num_tokens, c.dim, c.heads, c.head_dim
    return [
        Step("tokens", "the attention's input", (N, D), "data"),
        Step("qkv = Linear(D, 3D)", f"one Linear({D}, {3 * D}) for q, k and v", (N, 3 * D), "linear", "attn.qkv"),
        Step("q_i, k_i, v_i", f"3D = 3 x h x d = 3 x {h} x {d}", (N, d), "linear", "attn.q"),
        Step("softmax(q_i k_i^T / sqrt d)", f"scaled by 1/sqrt({d}); rows sum to 1", (N, N), "attention",
             "attn.attend"),
        Step("weights @ v_i", "per token: weighted mean of values", (N, d), "attention"),
        Step("concatenate", f"the heads side by side: h*d = {h}*{d} = {D}", (N, D), "data", "attn.merge"),
        Step("proj = Linear(D, D)", f"Linear({D}, {D}) mixes the heads", (N, D), "linear", "attn.proj"),
    ]


PER_HEAD = ("q_i, k_i, v_i", "softmax(q_i k_i^T / sqrt d)", "weights @ v_i")  # titles of heads_steps drawn per head


def drawn_heads(heads: int) -> list[int | None]:
    """h -> the heads drawn, numbered from 1, with None for the ellipsis: 4 -> [1, 2, 3, 4]; 12 -> [1, .., 5, None, 12]."""
    if heads <= MAX_HEADS_DRAWN:
        return list(range(1, heads + 1))
    return list(range(1, MAX_HEADS_DRAWN)) + [None, heads]


# --- Drawing ----------------------------------------------------------------------------------------------


def _box(ax, x: float, y: float, w: float, h: float, step: Step, fontsize: float = 8, title: str | None = None):
    """Draw ``step`` as a rounded box centred at (x, y): its title, its detail and its shape."""
    box = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                         facecolor=COLOURS[step.kind], edgecolor="#444444", linewidth=1.0, gid="step")
    ax.add_patch(box)
    ax.text(x, y + h * 0.2, title or step.title, ha="center", va="center", fontsize=fontsize, weight="bold")
    ax.text(x, y - h * 0.05, step.detail, ha="center", va="center", fontsize=fontsize - 1.5, color="#333333")
    ax.text(x, y - h * 0.3, fmt(step.shape), ha="center", va="center", fontsize=fontsize - 0.5,
            family="monospace", color="#1f3b73")
    return box


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], **kwargs) -> None:
    style = {"arrowstyle": "-|>", "mutation_scale": 10, "color": "#444444", "linewidth": 1.0, "shrinkA": 0, "shrinkB": 0}
    style.update(kwargs)
    ax.add_patch(FancyArrowPatch(start, end, **style))


def _axes(fig: Figure, xlim: tuple[float, float], ylim: tuple[float, float]):
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("auto")
    ax.axis("off")
    return ax


def pipeline_figure(config: ViTConfig) -> Figure:
    """ViTConfig -> Figure: image -> patches -> flatten -> W -> + class token -> + positions -> encoder -> o0 -> head.

    One box per ``pipeline_steps(config)``, each with its output shape for one image, in two rows. Under the
    boxes, the token sequence that enters the encoder: z0 (the class token) and z1 .. z(G*G), each + p_i.
    """
    c = _check_config(config)
    steps = pipeline_steps(c)
    top = (len(steps) + 1) // 2
    w, h, gap = 2.3, 1.15, 0.45
    width = top * (w + gap) + gap
    fig = Figure(figsize=(width * 0.78, 4.6))
    ax = _axes(fig, (0, width), (-2.55, 2.35))
    rows = [(steps[:top], 1.55), (steps[top:], -0.05)]
    centres = []
    for row, y in rows:
        for i, step in enumerate(row):
            x = gap + w / 2 + i * (w + gap)
            _box(ax, x, y, w, h, step)
            centres.append((x, y))
    for (x0, y0), (x1, y1) in pairwise(centres):
        if y0 == y1:
            _arrow(ax, (x0 + w / 2, y0), (x1 - w / 2, y1))
        else:  # from the end of the first row down to the start of the second
            _arrow(ax, (x0, y0 - h / 2), (x1, y1 + h / 2), connectionstyle="angle,angleA=-90,angleB=180,rad=0")
    _token_strip(ax, c, y=-1.65, x0=gap, x1=width - gap)
    fig.text(0.005, 0.99, f"ViT, {c.image_size} px images, {c.patch_size} px patches: N = {c.num_tokens} tokens "
             f"of D = {c.dim}", ha="left", va="top", fontsize=9)
    return fig


def _token_strip(ax, c: ViTConfig, y: float, x0: float, x1: float) -> None:
    """The encoder's input as a row of small boxes: z0 + p0 (the class token), then z_i + p_i for each patch."""
    n = c.num_patches
    shown = list(range(n + 1)) if n <= 16 else list(range(9)) + [None] + [n - 1, n]
    size = min(0.9, (x1 - x0) / (len(shown) * 1.15))
    start = (x0 + x1) / 2 - len(shown) * size * 1.15 / 2
    for j, i in enumerate(shown):
        x = start + j * size * 1.15
        if i is None:
            ax.text(x + size / 2, y, "...", ha="center", va="center", fontsize=9)
            continue
        colour = COLOURS["token"] if i == 0 else COLOURS["linear"]
        ax.add_patch(Rectangle((x, y - size / 2), size, size, facecolor=colour, edgecolor="#444444", linewidth=0.8))
        ax.text(x + size / 2, y, f"z{i}\n+p{i}", ha="center", va="center", fontsize=6.5)
    ax.text((x0 + x1) / 2, y - size / 2 - 0.18, f"the encoder's input: {c.num_tokens} tokens, each a vector of "
            f"D = {c.dim}; z0 is the class token, whose output o0 the head reads" if c.pool == "cls" else
            f"the encoder's input: {c.num_tokens} tokens of D = {c.dim}; the head reads the mean of o1 .. o{n}",
            ha="center", va="top", fontsize=7.5, color="#333333")


def block_figure(config: ViTConfig) -> Figure:
    """ViTConfig -> Figure: a pre-norm block (ViT) and a post-norm block (the 2017 Transformer) side by side.

    One box per ``block_steps(config, norm)`` in each column, from the input at the top to the output at
    the bottom; the residual connections are drawn on the left of each column.
    """
    c = _check_config(config)
    w, h, dy = 3.0, 0.78, 1.08
    fig = Figure(figsize=(9.0, 7.4))
    ax = _axes(fig, (0, 10), (-7.6, 0.9))
    for column, (norm, title) in enumerate((("pre", "pre-norm (ViT):  x + f(LN(x))"),
                                            ("post", "post-norm (2017):  LN(x + f(x))"))):
        x = 3.0 + column * 5.0
        steps = block_steps(c, norm)
        ys = [-i * dy for i in range(len(steps))]
        ax.text(x, 0.65, title, ha="center", va="center", fontsize=10, weight="bold")
        for step, y in zip(steps, ys):
            _box(ax, x, y, w, h, step)
        for y0, y1 in pairwise(ys):
            _arrow(ax, (x, y0 - h / 2), (x, y1 + h / 2))
        adds = [i for i, step in enumerate(steps) if step.kind == "add"]
        # each residual starts where its branch starts: the block's input, then the first sum (pre-norm) or
        # the LayerNorm after it (post-norm)
        sources = [0, adds[0] if norm == "pre" else adds[0] + 1]
        for k, (src, dst) in enumerate(zip(sources, adds)):
            left = x - w / 2 - 0.3 - 0.25 * k
            y0, y1 = ys[src] - 0.15, ys[dst]
            ax.plot([x - w / 2, left, left], [y0, y0, y1], color="#b03030", linewidth=1.1)
            _arrow(ax, (left, y1), (x - w / 2, y1), color="#b03030", linewidth=1.1)
            ax.text(left - 0.05, (y0 + y1) / 2, "residual", rotation=90, ha="right", va="center",
                    fontsize=7, color="#b03030")
    note = ("pre-norm: the residual path is only additions, so a pre-norm ViT ends with one more LayerNorm; "
            "post-norm ends every block with one")
    ax.text(5.0, -7.35, note, ha="center", va="center", fontsize=8, color="#333333")
    return fig


def heads_figure(config: ViTConfig) -> Figure:
    """ViTConfig -> Figure: multi-head attention split into h heads and merged again.

    Tokens (N, D) -> one Linear(D, 3D) -> per head: q_i, k_i, v_i (N, d), the weights softmax(q k^T/sqrt(d))
    (N, N) and their mean of the values (N, d) -> the heads concatenated (N, D) -> Linear(D, D). The per-head
    steps get one box per head (``drawn_heads``: with more than MAX_HEADS_DRAWN heads, an ellipsis).
    """
    c = _check_config(config)
    steps = heads_steps(c)
    heads = drawn_heads(c.heads)
    w, h, dy = 2.5, 0.82, 1.12
    width = max(len(heads) * (w + 0.3) + 0.3, 8.0)
    fig = Figure(figsize=(width * 0.85, 7.6))
    ax = _axes(fig, (0, width), (-7.3, 0.8))
    ys = [-i * dy for i in range(len(steps))]
    mid = width / 2
    xs_heads = [0.3 + w / 2 + j * (w + 0.3) + (width - (len(heads) * (w + 0.3) + 0.3)) / 2
                for j in range(len(heads))]
    previous: list[float] = []  # the x of the boxes one row up: nothing above the first
    for step, y in zip(steps, ys):
        if step.title in PER_HEAD:
            xs = []
            for x, head in zip(xs_heads, heads):
                if head is None:
                    ax.text(x, y, "...", ha="center", va="center", fontsize=14)
                    continue
                _box(ax, x, y, w, h, step, fontsize=7, title=f"head {head}: " + step.title.replace("_i", ""))
                xs.append(x)
            for x in xs:  # one arrow into each head, from the box above it (or from the single box above)
                x_from = x if len(previous) > 1 else previous[0]
                _arrow(ax, (x_from, y + dy - h / 2), (x, y + h / 2))
            previous = xs
        else:
            _box(ax, mid, y, max(w * 1.6, 3.4), h, step)
            for x in previous:
                _arrow(ax, (x, y + dy - h / 2), (mid, y + h / 2))
            previous = [mid]
    ax.text(mid, 0.6, f"multi-head attention: h = {c.heads} heads of d = D / h = {c.dim} / {c.heads} = "
            f"{c.head_dim}, N = {c.num_tokens} tokens", ha="center", va="center", fontsize=10, weight="bold")
    return fig


MASK_COLOURS = {"blocked": "#e6e6e6", "patch": "#3b6fb6", "cls": "#d1495b"}  # grey, blue, red: none of them white


def mask_colours(mask, cls_token: bool = True):
    """(N, N) bool -> (N, N, 3) RGB floats: allowed patch pairs blue, the CLS token's row and column red, blocked grey."""
    import numpy as np
    from matplotlib.colors import to_rgb

    allowed = np.asarray(mask, dtype=bool)
    if allowed.ndim != 2 or allowed.shape[0] != allowed.shape[1]:
        raise ValueError(f"expected a square (N, N) mask; got shape {tuple(allowed.shape)}")
    image = np.empty(allowed.shape + (3,))
    image[:] = to_rgb(MASK_COLOURS["blocked"])
    image[allowed] = to_rgb(MASK_COLOURS["patch"])
    if cls_token:
        cls = np.zeros_like(allowed)
        cls[0, :], cls[:, 0] = True, True
        image[cls & allowed] = to_rgb(MASK_COLOURS["cls"])
    return image


def mask_figure(mask, grid_size: int, query: int | None = None, cls_token: bool = True) -> Figure:
    """(N, N) bool mask, N = [1+] G*G -> Figure: the mask, CLS row and column in their own colour, and on the right
    the patches that patch ``query`` (numbered from 0, without CLS) may attend to, on the G x G grid."""
    import numpy as np

    allowed = np.asarray(mask, dtype=bool)
    n = grid_size**2 + (1 if cls_token else 0)
    if allowed.shape != (n, n):
        raise ValueError(f"expected a ({n}, {n}) mask for a {grid_size} x {grid_size} grid"
                         f"{' plus CLS' if cls_token else ''}; got shape {tuple(allowed.shape)}")
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
    left.imshow(mask_colours(allowed, cls_token), interpolation="nearest")
    for spine in left.spines.values():
        spine.set_visible(True)
    ticks = [0] + list(range(1, n, grid_size)) if cls_token else list(range(0, n, grid_size))
    labels = (["CLS"] + [f"p{t - 1}" for t in ticks[1:]]) if cls_token else [f"p{t}" for t in ticks]
    left.set_xticks(ticks, labels, fontsize=7, rotation=90)
    left.set_yticks(ticks, labels, fontsize=7)
    left.set(xlabel="key j", ylabel="query i")
    allowed_pairs = int(allowed.sum())
    left.set_title(f"{n} x {n} mask: {allowed_pairs:,} of {n * n:,} pairs allowed", fontsize=10)
    from matplotlib.patches import Patch
    left.legend(handles=[Patch(color=MASK_COLOURS["patch"], label="patch -> patch, allowed"),
                         Patch(color=MASK_COLOURS["cls"], label="to or from CLS, allowed"),
                         Patch(color=MASK_COLOURS["blocked"], label="blocked")],
                loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8)
    if query is None:
        right.axis("off")
        return fig
    if not 0 <= query < grid_size**2:
        raise ValueError(f"query must be a patch index in [0, {grid_size**2 - 1}]; got {query}")
    row = allowed[query + (1 if cls_token else 0), (1 if cls_token else 0):].reshape(grid_size, grid_size)
    sees = np.where(row, 1.0, 0.0)
    sees_image = np.empty(row.shape + (3,))
    from matplotlib.colors import to_rgb
    sees_image[:] = to_rgb(MASK_COLOURS["blocked"])
    sees_image[row] = to_rgb(MASK_COLOURS["patch"])
    right.imshow(sees_image, interpolation="nearest")
    r, c = divmod(query, grid_size)
    right.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor=MASK_COLOURS["cls"], linewidth=2.5))
    right.set_xticks(range(grid_size))
    right.set_yticks(range(grid_size))
    right.set_title(f"patch {query} (red frame) sees {int(sees.sum())} patches"
                    f"{' + CLS' if cls_token and allowed[query + 1, 0] else ''}", fontsize=10)
    return fig
