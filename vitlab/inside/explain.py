"""Reading a trained ViT: attention rollout, attention distance, and the ViT paper's Fig. 7.

- ``attention_rollout`` / ``cls_rollout_map``: how much each input token flows into each output
  token through all layers (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").
- ``mean_attention_distance``: how far, in pixels, each head looks (ViT paper, Fig. 7 right).
- ``position_embedding_similarity``: which positions the position embeddings hold alike (Fig. 7 centre).
- ``patch_embedding_components``: the main patterns of the patch-embedding filters (Fig. 7 left).

Legend: B batch, L layers, h heads, N tokens (1 CLS + G*G patches, or G*G without CLS),
G grid side in patches, P patch size, C channels, D model dim, k components.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # matplotlib is imported by the two plotting functions only, not by `import vitlab`
    from matplotlib.figure import Figure

from ..model.config import check_choice
from ..model.patches import linear_to_conv_weight

HEAD_FUSIONS = ("mean", "max", "min")


def _check_attentions(attentions: torch.Tensor) -> None:
    if not isinstance(attentions, torch.Tensor) or attentions.ndim != 5:
        got = tuple(attentions.shape) if isinstance(attentions, torch.Tensor) else type(attentions).__name__
        raise ValueError(f"expected attentions of shape (B, L, h, N, N); got {got}")
    if attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(f"expected square (N, N) attention maps; got shape {tuple(attentions.shape)}")


def _has_cls(num_tokens: int, grid_size: int) -> bool:
    """Whether N tokens are 1 CLS + G*G patches (True) or just G*G patches (False)."""
    if num_tokens == grid_size * grid_size + 1:
        return True
    if num_tokens == grid_size * grid_size:
        return False
    raise ValueError(
        f"expected N = {grid_size * grid_size} + 1 tokens (CLS + {grid_size}x{grid_size} patches) "
        f"or N = {grid_size * grid_size} (patches only); got N = {num_tokens}"
    )


def _discard_lowest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """(B, L, N, N) -> (B, L, N, N): zero the floor(ratio * N*N) lowest entries of each matrix, never [0, 0]."""
    B, L, N, _ = fused.shape
    count = int(discard_ratio * N * N)  # <= N*N - 1 because discard_ratio < 1
    if count == 0:
        return fused
    flat = fused.reshape(B, L, N * N).clone()
    ranked = flat.clone()
    ranked[..., 0] = float("inf")  # the CLS token's attention to itself is never among the lowest
    lowest = ranked.topk(count, dim=-1, largest=False).indices  # (B, L, count), per sample and layer
    flat.scatter_(-1, lowest, 0.0)
    return flat.reshape(B, L, N, N)


def attention_rollout(
    attentions: torch.Tensor, head_fusion: str = "mean", discard_ratio: float = 0.0, add_residual: bool = True
) -> torch.Tensor:
    """(B, L, h, N, N) -> (B, N, N): attention rollout; row i says how much each input token reaches token i.

    For every sample and layer l:

    1. fuse the heads: A_l = mean, max or min over h (the paper averages);
    2. with ``discard_ratio`` > 0, set the floor(discard_ratio * N*N) lowest entries of A_l to 0.
       The CLS token's attention to itself, A_l[0, 0], is never discarded (as in the widely used
       vit-explain tool), so it is the lowest entries among the other N*N - 1;
    3. with ``add_residual``, account for the skip connection: A_l <- (A_l + I) / 2, the paper's
       0.5 W_att + 0.5 I;
    4. renormalise every row to sum to 1: Â_l = A_l / A_l.sum(-1, keepdim=True).

    Then R = Â_L @ ... @ Â_2 @ Â_1. Every row of R sums to 1. For ``head_fusion="mean"`` and no
    discarding, step 4 changes nothing and this is exactly the paper's rollout; after max/min
    fusion or discarding, the rows of A_l no longer sum to 1 and the renormalisation restores it
    (the residual's share is then 1 / (1 + row sum of A_l) rather than exactly 0.5).
    """
    _check_attentions(attentions)
    check_choice("head_fusion", head_fusion, HEAD_FUSIONS)
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1); got {discard_ratio!r}")
    B, L, h, N, _ = attentions.shape
    if head_fusion == "mean":
        fused = attentions.mean(dim=2)  # (B, L, N, N)
    elif head_fusion == "max":
        fused = attentions.amax(dim=2)
    else:
        fused = attentions.amin(dim=2)
    fused = _discard_lowest(fused, discard_ratio)
    eye = torch.eye(N, dtype=fused.dtype, device=fused.device)
    if add_residual:
        fused = (fused + eye) / 2
    sums = fused.sum(dim=-1, keepdim=True)  # (B, L, N, 1)
    if (sums <= 0).any():
        raise ValueError(
            f"a row of a fused attention matrix sums to 0 (discard_ratio={discard_ratio}, add_residual="
            f"{add_residual}); use a smaller discard_ratio or add_residual=True"
        )
    fused = fused / sums  # (B, L, N, N), rows sum to 1
    rollout = eye.expand(B, N, N)
    for layer in range(L):
        rollout = fused[:, layer] @ rollout  # (B, N, N)
    return rollout


def cls_rollout_map(rollout: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, N, N) -> (B, G, G): what the CLS token gathers from each patch, scaled so each map's maximum is 1.

    Takes row 0 (the CLS token) of the rollout, keeps the patch columns 1: (dropping what CLS
    takes from itself), lays them out on the G x G grid and divides each sample's map by its
    maximum, so the brightest patch is 1 and a colour map can use the fixed range [0, 1].
    """
    if not isinstance(rollout, torch.Tensor) or rollout.ndim != 3 or rollout.shape[1] != rollout.shape[2]:
        got = tuple(rollout.shape) if isinstance(rollout, torch.Tensor) else type(rollout).__name__
        raise ValueError(f"expected a rollout of shape (B, N, N); got {got}")
    if rollout.shape[-1] != grid_size * grid_size + 1:
        raise ValueError(
            f"expected N = 1 + {grid_size}*{grid_size} = {grid_size * grid_size + 1} tokens (CLS + patches); "
            f"got N = {rollout.shape[-1]}"
        )
    patches = rollout[:, 0, 1:]  # (B, G*G)
    peak = patches.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)
    return (patches / peak).reshape(-1, grid_size, grid_size)


def patch_distances(grid_size: int, patch_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-> (G*G, G*G): Euclidean distance in pixels between the centres of patches i and j (row-major order)."""
    coords = torch.arange(grid_size, dtype=dtype)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1) * patch_size  # (G*G, 2); offsets cancel
    return torch.cdist(centres, centres)


def mean_attention_distance(
    attentions: torch.Tensor, grid_size: int, patch_size: int, include_cls: bool = False
) -> torch.Tensor:
    """(B, L, h, N, N) -> (L, h): mean attention distance in pixels per layer and head (ViT paper, Fig. 7 right).

    For a query patch i: d_i = sum_j a_ij * ||centre_i - centre_j||, over the key patches j; the
    result is d_i averaged over all query patches and all samples. It is the attention-weighted
    analogue of a CNN's receptive field size.

    N is 1 + G*G (token 0 is CLS) or G*G (no CLS). The CLS token has no position, so its query
    row is always left out. Its key column:

    - ``include_cls=False`` (default): dropped, and each row's patch-to-patch weights are
      renormalised to sum to 1, so d_i is a weighted mean distance over patches;
    - ``include_cls=True``: kept as it is, i.e. the weight a patch puts on CLS counts as distance
      0 (the weights are not renormalised), which lowers the distance of heads that attend to CLS.
    """
    _check_attentions(attentions)
    with_cls = _has_cls(attentions.shape[-1], grid_size)
    if include_cls and not with_cls:
        raise ValueError(f"include_cls=True needs a CLS token (N = {grid_size * grid_size + 1}); got N = "
                         f"{attentions.shape[-1]}")
    weights = attentions[..., 1:, 1:] if with_cls else attentions  # (B, L, h, G*G, G*G)
    if not include_cls:
        sums = weights.sum(dim=-1, keepdim=True)
        if (sums <= 0).any():
            raise ValueError("expected every patch query to give some weight to the patches; a row's patch "
                             "weights sum to 0 (all on CLS?), so they cannot be renormalised; try include_cls=True")
        weights = weights / sums
    distances = patch_distances(grid_size, patch_size, dtype=attentions.dtype).to(attentions.device)
    per_query = (weights * distances).sum(dim=-1)  # (B, L, h, G*G)
    return per_query.mean(dim=(0, 3))  # (L, h)


def position_embedding_similarity(
    pos_embed: torch.Tensor, grid_size: int, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """(1, p+G*G, D) or (p+G*G, D) -> (G, G, G, G): cosine similarity of patch position embeddings.

    ``sim[r, c]`` is a G x G tile: the similarity of the embedding of the patch at row r, column c
    with the embedding of every patch (ViT paper, Fig. 7 centre). The ``num_prefix_tokens``
    leading entries (the CLS token's) are skipped.
    """
    if pos_embed is None:
        raise ValueError("expected position embeddings of shape (1, N, D); got None (a model with pos_embed='none')")
    table = pos_embed.detach()
    if table.ndim == 3 and table.shape[0] == 1:
        table = table[0]
    if table.ndim != 2:
        raise ValueError(f"expected position embeddings of shape (1, N, D) or (N, D); got {tuple(pos_embed.shape)}")
    expected = num_prefix_tokens + grid_size * grid_size
    if table.shape[0] != expected:
        raise ValueError(
            f"expected {expected} position embeddings ({num_prefix_tokens} prefix + {grid_size}x{grid_size} "
            f"patches); got {table.shape[0]}"
        )
    unit = F.normalize(table[num_prefix_tokens:], dim=-1)  # (G*G, D)
    return (unit @ unit.T).reshape(grid_size, grid_size, grid_size, grid_size)


def plot_position_similarity(
    sim: torch.Tensor, fig: Figure | None = None, cmap: str = "viridis", vmin: float = -1.0, vmax: float = 1.0
) -> Figure:
    """(G, G, G, G) -> Figure: a G x G grid of G x G tiles, all on one colour scale, by default -1 to 1.

    Tile (r, c) shows ``sim[r, c]``. Returns the figure (a new one unless ``fig`` is given).
    Narrow ``vmin`` for embeddings whose similarities are all high (e.g. sincos with a small D).
    """
    if sim.ndim != 4 or len(set(sim.shape)) != 1:
        raise ValueError(f"expected similarities of shape (G, G, G, G); got {tuple(sim.shape)}")
    G = sim.shape[0]
    from matplotlib.figure import Figure

    fig = fig if fig is not None else Figure(figsize=(6.5, 6))
    axes = fig.subplots(G, G, squeeze=False, gridspec_kw={"wspace": 0.05, "hspace": 0.05})
    values = sim.detach().cpu().float().numpy()
    for r in range(G):
        for c in range(G):
            ax = axes[r, c]
            image = ax.imshow(values[r, c], vmin=vmin, vmax=vmax, cmap=cmap)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(str(r + 1), rotation=0, labelpad=8, fontsize=7)
            if r == G - 1:
                ax.set_xlabel(str(c + 1), fontsize=7)
    fig.supylabel("input patch row")
    fig.supxlabel("input patch column")
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity")
    return fig


class PatchComponents(NamedTuple):
    """The principal components of the patch-embedding filters."""

    components: torch.Tensor  # (k, C, P, P), unit-norm and mutually orthogonal as P*P*C vectors
    explained_variance_ratio: torch.Tensor  # (k,), descending, sums to <= 1


def patch_embedding_components(weight: torch.Tensor, patch_size: int, channels: int, k: int = 28) -> PatchComponents:
    """(D, P*P*C) -> ((k, C, P, P), (k,)): the top-k principal components of the patch-embedding filters.

    ``weight`` is the patch projection E as a matrix acting on flattened patches ordered
    (p1 p2 c), e.g. ``model.patch_embed.linear_weight()``. Each of its D rows is one filter, a
    P*P*C vector: the patch pattern that one embedding dimension responds to. As in the ViT
    paper (Fig. 7 left), these are the principal components of that set of D filters: subtract
    the mean filter, take the SVD of the centred (D, P*P*C) matrix, and keep the first k right
    singular vectors, each reshaped into a C x P x P image. ``explained_variance_ratio`` is each
    component's share of the filters' total variance (squared singular value over the sum).

    A centred set of D filters spans at most min(D - 1, P*P*C) directions, so k may not exceed
    that. A component's sign is arbitrary; it is fixed so that its largest-magnitude entry is positive.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"expected a patch-embedding weight of shape (D, P*P*C); got {got}")
    D, width = weight.shape
    if width != patch_size * patch_size * channels:
        raise ValueError(
            f"expected filters of length P*P*C = {patch_size}*{patch_size}*{channels} = "
            f"{patch_size * patch_size * channels}; got {width}"
        )
    limit = min(D - 1, width)
    if not isinstance(k, int) or not 1 <= k <= limit:
        raise ValueError(f"k must be an int in [1, min(D - 1, P*P*C)] = [1, {limit}]; got {k!r}")
    filters = weight.detach().double()
    centred = filters - filters.mean(dim=0, keepdim=True)  # (D, P*P*C)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (min(D, P*P*C), P*P*C)
    variance = singular**2
    if variance.sum() == 0:
        raise ValueError("the filters are all identical, so there is no variance to decompose")
    top = vh[:k]  # (k, P*P*C)
    peaks = top.gather(1, top.abs().argmax(dim=1, keepdim=True))  # (k, 1)
    top = top * peaks.sign()
    components = linear_to_conv_weight(top, patch_size, channels).to(weight.dtype)  # (k, C, P, P)
    ratio = (variance[:k] / variance.sum()).to(weight.dtype)
    return PatchComponents(components, ratio)


def plot_components(
    components: torch.Tensor, explained_variance_ratio: torch.Tensor | None = None, ncols: int = 7,
    fig: Figure | None = None,
) -> Figure:
    """(k, C, P, P) -> Figure: one small image per component, C = 1 (grey) or 3 (RGB).

    Grey components share a symmetric colour scale around 0 (each scaled by its own largest
    magnitude); RGB components are min-max scaled to [0, 1] one by one. With
    ``explained_variance_ratio`` each image is titled with its share of the variance.
    """
    if components.ndim != 4 or components.shape[1] not in (1, 3):
        raise ValueError(f"expected components of shape (k, C, P, P) with C = 1 or 3; got {tuple(components.shape)}")
    if explained_variance_ratio is not None and explained_variance_ratio.shape != components.shape[:1]:
        raise ValueError(
            f"expected one explained-variance ratio per component, shape ({components.shape[0]},); got "
            f"{tuple(explained_variance_ratio.shape)}"
        )
    k = components.shape[0]
    ncols = max(1, min(ncols, k))
    nrows = -(-k // ncols)
    from matplotlib.figure import Figure

    fig = fig if fig is not None else Figure(figsize=(1.2 * ncols, 1.35 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    values = components.detach().cpu().float()
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= k:
            continue
        image = values[index]  # (C, P, P)
        if image.shape[0] == 1:
            scale = image.abs().max().clamp_min(1e-12).item()
            ax.imshow(image[0].numpy(), cmap="gray", vmin=-scale, vmax=scale)
        else:
            low, high = image.min(), image.max()
            ax.imshow(((image - low) / (high - low).clamp_min(1e-12)).permute(1, 2, 0).numpy())
        if explained_variance_ratio is not None:
            ax.set_title(f"{100 * float(explained_variance_ratio[index]):.1f}%", fontsize=7)
    return fig


def upsample_patch_map(patch_map: torch.Tensor, size: int | tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """(G, G) or (B, G, G) -> (H, W) or (B, H, W): a per-patch map stretched to pixels for overlaying on the image.

    ``mode="nearest"`` paints each patch's value over its whole patch (what the model saw);
    ``"bilinear"`` smooths between patch centres (a prettier, but invented, in-between).
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear'; got {mode!r}")
    if patch_map.ndim not in (2, 3):
        raise ValueError(f"expected a patch map of shape (G, G) or (B, G, G); got {tuple(patch_map.shape)}")
    batched = patch_map.ndim == 3
    maps = (patch_map if batched else patch_map[None]).unsqueeze(1).float()  # (B, 1, G, G)
    size = (size, size) if isinstance(size, int) else tuple(size)
    extra = {"align_corners": False} if mode == "bilinear" else {}
    pixels = F.interpolate(maps, size=size, mode=mode, **extra)[:, 0]  # (B, H, W)
    if patch_map.is_floating_point():
        pixels = pixels.to(patch_map.dtype)
    return pixels if batched else pixels[0]
