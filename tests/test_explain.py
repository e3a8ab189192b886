import io
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

import vitlab
from vitlab.inside.explain import (
    attention_rollout,
    cls_rollout_map,
    mean_attention_distance,
    patch_distances,
    patch_embedding_components,
    plot_components,
    plot_position_similarity,
    position_embedding_similarity,
    upsample_patch_map,
)


def random_attention(B=2, L=3, h=2, N=5, seed=0, dtype=torch.float64) -> torch.Tensor:
    """(B, L, h, N, N), rows sum to 1."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, h, N, N, generator=generator, dtype=dtype).mul(2).softmax(dim=-1)


def small_vit(**overrides) -> vitlab.ViT:
    torch.manual_seed(0)
    config = dict(image_size=28, patch_size=7, dim=32, depth=2, heads=2, mlp_dim=32)
    return vitlab.ViT(**{**config, **overrides}).eval()


def recorded_attentions(model: vitlab.ViT) -> torch.Tensor:
    torch.manual_seed(1)
    with vitlab.record(model) as rec:
        model(torch.randn(2, 1, 28, 28))
    return rec.attentions


def render(fig) -> None:
    fig.savefig(io.BytesIO(), format="png")


# Attention rollout

def rollout_by_loops(attentions: torch.Tensor) -> list[list[list[float]]]:
    """Abnar & Zuidema's equations for one sample, written out: A = mean over heads, Â = 0.5 A + 0.5 I,
    R = Â_L ... Â_1."""
    _, L, h, N, _ = attentions.shape
    a = attentions[0].tolist()
    rollout = [[1.0 if i == j else 0.0 for j in range(N)] for i in range(N)]
    for layer in range(L):
        mixed = [
            [0.5 * sum(a[layer][head][i][j] for head in range(h)) / h + 0.5 * (i == j) for j in range(N)]
            for i in range(N)
        ]
        rollout = [[sum(mixed[i][m] * rollout[m][j] for m in range(N)) for j in range(N)] for i in range(N)]
    return rollout


def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5, dtype=torch.float64)
    attentions = eye.expand(2, 3, 2, 5, 5)
    for fusion in ("mean", "max", "min"):
        torch.testing.assert_close(attention_rollout(attentions, fusion), eye.expand(2, 5, 5))


def test_rollout_matches_the_papers_equations_by_loops():
    attentions = random_attention(B=1, L=3, h=2, N=5)
    expected = torch.tensor(rollout_by_loops(attentions), dtype=torch.float64)
    torch.testing.assert_close(attention_rollout(attentions)[0], expected)


def test_rollout_rows_sum_to_one():
    attentions = random_attention(B=2, L=4, h=3, N=6, seed=3)
    # Without the residual, discarding can empty a whole row (an error, tested below), so only ratio 0 there.
    settings = [(ratio, True) for ratio in (0.0, 0.5, 0.9)] + [(0.0, False)]
    for fusion in ("mean", "max", "min"):
        for ratio, residual in settings:
            rollout = attention_rollout(attentions, fusion, ratio, residual)
            torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 6, dtype=torch.float64))
            assert torch.all(rollout >= 0)


def test_rollout_order_is_last_layer_on_the_left():
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # every token copies token 0
    second = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # every token copies token 1
    attentions = torch.stack([first, second])[None, :, None]  # (1, 2, 1, 2, 2)
    rollout = attention_rollout(attentions, add_residual=False)
    # R = A2 @ A1: token 1 after layer 2 holds what token 1 held after layer 1, i.e. input token 0.
    torch.testing.assert_close(rollout[0], second @ first)
    assert not torch.allclose(second @ first, first @ second)


def test_head_fusions_differ_when_heads_differ():
    attentions = random_attention(B=1, L=2, h=3, N=5, seed=4)
    results = {fusion: attention_rollout(attentions, fusion) for fusion in ("mean", "max", "min")}
    assert not torch.allclose(results["mean"], results["max"])
    assert not torch.allclose(results["mean"], results["min"])
    assert not torch.allclose(results["max"], results["min"])
    same_heads = attentions[:, :, :1].expand(1, 2, 3, 5, 5)
    torch.testing.assert_close(attention_rollout(same_heads, "max"), attention_rollout(same_heads, "mean"))


def test_discard_by_hand():
    # floor(0.5 * 4) = 2 lowest entries go: 0.1 and 0.3; what remains is diagonal, so R = I.
    attentions = torch.tensor([[0.9, 0.1], [0.3, 0.7]], dtype=torch.float64).reshape(1, 1, 1, 2, 2)
    torch.testing.assert_close(attention_rollout(attentions, discard_ratio=0.5)[0], torch.eye(2, dtype=torch.float64))
    # The CLS self-entry 0.05 is the lowest but is kept; the next lowest, 0.4, goes.
    attentions = torch.tensor([[0.05, 0.95], [0.6, 0.4]], dtype=torch.float64).reshape(1, 1, 1, 2, 2)
    expected = torch.tensor([[0.525, 0.475], [0.375, 0.625]], dtype=torch.float64)  # ((A + I) / 2) renormalised
    torch.testing.assert_close(attention_rollout(attentions, discard_ratio=0.25)[0], expected)


def test_discard_changes_result_and_is_per_sample():
    attentions = random_attention(B=2, L=3, h=2, N=5, seed=5)
    kept = attention_rollout(attentions)
    discarded = attention_rollout(attentions, discard_ratio=0.6)
    assert not torch.allclose(kept, discarded)
    for b in range(2):
        torch.testing.assert_close(discarded[b : b + 1], attention_rollout(attentions[b : b + 1], discard_ratio=0.6))


def test_rollout_rejects_bad_arguments():
    attentions = random_attention()
    with pytest.raises(ValueError, match=r"head_fusion must be one of .*got 'median'"):
        attention_rollout(attentions, "median")
    for ratio in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"discard_ratio must be in \[0, 1\)"):
            attention_rollout(attentions, discard_ratio=ratio)
    with pytest.raises(ValueError, match=r"\(B, L, h, N, N\); got \(3, 2, 5, 5\)"):
        attention_rollout(attentions[0])
    with pytest.raises(ValueError, match="square"):
        attention_rollout(attentions[..., :4])
    # Without the residual, discarding both entries of token 1's row leaves nothing to normalise.
    empties = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64).reshape(1, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="sums to 0"):
        attention_rollout(empties, discard_ratio=0.75, add_residual=False)


def test_cls_rollout_map():
    rollout = torch.zeros(1, 5, 5)
    rollout[0, 0] = torch.tensor([0.2, 0.1, 0.4, 0.2, 0.1])  # CLS row: self, then patches 1..4
    rollout[0, 1:, 1] = 1.0  # other rows must not matter
    expected = torch.tensor([[[0.25, 1.0], [0.5, 0.25]]])  # patches over their maximum 0.4
    torch.testing.assert_close(cls_rollout_map(rollout, 2), expected)
    with pytest.raises(ValueError, match=r"N = 1 \+ 3\*3 = 10 .*got N = 5"):
        cls_rollout_map(rollout, 3)


def test_rollout_on_a_recorded_vit():
    model = small_vit()
    attentions = recorded_attentions(model)
    rollout = attention_rollout(attentions, "max", discard_ratio=0.3)
    assert rollout.shape == (2, 17, 17)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 17))
    cls_map = cls_rollout_map(rollout, model.config.grid_size)
    assert cls_map.shape == (2, 4, 4)
    torch.testing.assert_close(cls_map.flatten(1).amax(-1), torch.ones(2))


# Mean attention distance

def test_patch_distances():
    distances = patch_distances(2, 7)
    side, diagonal = 7.0, 7.0 * math.sqrt(2)
    expected = torch.tensor([[0, side, side, diagonal], [side, 0, diagonal, side],
                             [side, diagonal, 0, side], [diagonal, side, side, 0]])
    torch.testing.assert_close(distances, expected)


def test_distance_of_attention_to_self_is_zero():
    attentions = torch.eye(9, dtype=torch.float64).expand(2, 3, 2, 9, 9)  # no CLS, 3x3 grid
    torch.testing.assert_close(mean_attention_distance(attentions, 3, 16), torch.zeros(3, 2, dtype=torch.float64))
    with_cls = torch.eye(10, dtype=torch.float64).expand(1, 1, 1, 10, 10)
    torch.testing.assert_close(mean_attention_distance(with_cls, 3, 16), torch.zeros(1, 1, dtype=torch.float64))


def test_distance_of_uniform_attention_on_2x2_grid():
    # From any patch of a 2x2 grid, patch 7: distances 0, 7, 7 and 7*sqrt(2), averaged.
    expected = (0 + 7 + 7 + 7 * math.sqrt(2)) / 4
    no_cls = torch.full((1, 1, 1, 4, 4), 1 / 4, dtype=torch.float64)
    assert mean_attention_distance(no_cls, 2, 7).item() == pytest.approx(expected)
    with_cls = torch.full((1, 1, 1, 5, 5), 1 / 5, dtype=torch.float64)
    assert mean_attention_distance(with_cls, 2, 7).item() == pytest.approx(expected)  # patch weights renormalised
    # include_cls=True: the 1/5 on CLS counts as distance 0 and nothing is renormalised.
    assert mean_attention_distance(with_cls, 2, 7, include_cls=True).item() == pytest.approx(4 / 5 * expected)


def test_distance_of_attention_to_farthest_corner():
    grid, patch = 3, 4
    attentions = torch.zeros(1, 1, 1, grid * grid, grid * grid, dtype=torch.float64)
    for row in range(grid):
        for col in range(grid):
            corner = (0 if row >= 1 else 2, 0 if col >= 1 else 2)  # a corner farthest from (row, col)
            attentions[0, 0, 0, row * grid + col, corner[0] * grid + corner[1]] = 1.0
    # 4 corners reach the opposite corner (2*sqrt(2) patches away), 4 edge centres a far corner
    # (sqrt(5) away), the centre any corner (sqrt(2) away).
    expected = patch * (4 * 2 * math.sqrt(2) + 4 * math.sqrt(5) + math.sqrt(2)) / 9
    assert mean_attention_distance(attentions, grid, patch).item() == pytest.approx(expected)


def test_distance_is_per_layer_and_head():
    uniform = torch.full((4, 4), 1 / 4, dtype=torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    attentions = torch.stack([torch.stack([eye, uniform]), torch.stack([uniform, eye])])[None]  # (1, 2, 2, 4, 4)
    distance = mean_attention_distance(attentions, 2, 7)
    far = (14 + 7 * math.sqrt(2)) / 4
    torch.testing.assert_close(distance, torch.tensor([[0.0, far], [far, 0.0]], dtype=torch.float64))


def test_distance_on_a_recorded_vit():
    model = small_vit()
    attentions = recorded_attentions(model)
    distance = mean_attention_distance(attentions, model.config.grid_size, model.config.patch_size)
    assert distance.shape == (model.config.depth, model.config.heads)
    # Between the nearest (0) and the farthest (3*sqrt(2) patches of 7 px) possible.
    assert torch.all(distance > 0) and torch.all(distance < 3 * math.sqrt(2) * 7)


def test_distance_rejects_wrong_token_count():
    with pytest.raises(ValueError, match=r"N = 9 \+ 1 tokens .* got N = 7"):
        mean_attention_distance(random_attention(N=7), 3, 16)
    with pytest.raises(ValueError, match="include_cls=True needs a CLS token"):
        mean_attention_distance(random_attention(N=9), 3, 16, include_cls=True)


# Position-embedding similarity

def test_position_similarity_basics():
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 1 + 9, 16)
    sim = position_embedding_similarity(pos_embed, 3)
    assert sim.shape == (3, 3, 3, 3)
    flat = sim.reshape(9, 9)
    torch.testing.assert_close(flat.diagonal(), torch.ones(9))
    torch.testing.assert_close(flat, flat.T)
    # Entry (r, c, r2, c2) is patch (r, c) against patch (r2, c2); the CLS entry is skipped.
    patches = pos_embed[0, 1:]
    expected = torch.nn.functional.cosine_similarity(patches[1 * 3 + 2], patches[2 * 3 + 0], dim=0)
    torch.testing.assert_close(sim[1, 2, 2, 0], expected)
    assert torch.all(flat.abs() <= 1 + 1e-6)


def test_sincos_neighbours_are_more_similar_than_far_patches():
    model = small_vit(pos_embed="sincos")
    grid = model.config.grid_size
    sim = position_embedding_similarity(model.pos_embed.weight, grid).reshape(grid * grid, grid * grid)
    distances = patch_distances(grid, 1)
    assert sim[distances == 1].min() > sim[distances >= 2].max()
    assert sim[0, grid * grid - 1] == sim[0].min()  # the far corner is the least alike


def test_position_similarity_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected 10 position embeddings .*got 17"):
        position_embedding_similarity(torch.randn(1, 17, 8), 3)
    with pytest.raises(ValueError, match="pos_embed='none'"):
        position_embedding_similarity(small_vit(pos_embed="none").pos_embed.weight, 4)


def test_plot_position_similarity():
    sim = position_embedding_similarity(torch.randn(1, 10, 8), 3)
    fig = plot_position_similarity(sim)
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 9  # one tile per patch
    assert all(image.get_clim() == (-1.0, 1.0) for image in images)
    assert len(fig.axes) == 9 + 1  # the tiles and one colour bar
    torch.testing.assert_close(torch.as_tensor(images[5].get_array().data), sim[1, 2])  # row-major tiles
    render(fig)


# Patch-embedding principal components

def test_components_are_orthonormal_with_descending_variance():
    torch.manual_seed(0)
    spread = torch.diag(torch.linspace(3, 0.1, 48, dtype=torch.float64))
    weight = torch.randn(40, 4 * 4 * 3, dtype=torch.float64) @ spread
    components, ratio = patch_embedding_components(weight, patch_size=4, channels=3, k=10)
    assert components.shape == (10, 3, 4, 4)
    flat = components.reshape(10, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(10, dtype=torch.float64))
    assert ratio.shape == (10,)
    assert torch.all(ratio[:-1] >= ratio[1:]) and torch.all(ratio > 0)
    assert ratio.sum() <= 1
    all_ratios = patch_embedding_components(weight, 4, 3, k=39).explained_variance_ratio
    assert all_ratios.sum().item() == pytest.approx(1.0)  # 40 centred filters span 39 directions


def test_components_are_principal_directions_in_patch_layout():
    # Filters that vary along one known patch pattern: the first component is that pattern.
    torch.manual_seed(0)
    pattern = torch.zeros(2, 3, 3, dtype=torch.float64)  # (C, P, P)
    pattern[1, 0, 2] = 0.6
    pattern[0, 2, 1] = -0.8
    flat_pattern = pattern.permute(1, 2, 0).reshape(-1)  # (p1 p2 c) order, as patchify
    noise = 0.01 * torch.randn(50, 18, dtype=torch.float64)
    weight = torch.randn(50, 1, dtype=torch.float64) * 5 * flat_pattern + noise
    weight += torch.randn(18, dtype=torch.float64)  # a shared mean filter, removed by centring
    components, ratio = patch_embedding_components(weight, patch_size=3, channels=2, k=2)
    # The sign is fixed so the largest-magnitude entry (-0.8 in the pattern) is positive.
    torch.testing.assert_close(components[0], -pattern, atol=1e-2, rtol=0)
    assert ratio[0] > 0.99


def test_components_on_a_vit_and_bad_k():
    model = small_vit()
    weight = model.patch_embed.linear_weight()  # (32, 49)
    components, ratio = patch_embedding_components(weight, 7, 1)
    assert components.shape == (28, 1, 7, 7) and ratio.shape == (28,)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, min\(D - 1, P\*P\*C\)\] = \[1, 31\]; got 32"):
        patch_embedding_components(weight, 7, 1, k=32)
    with pytest.raises(ValueError, match=r"P\*P\*C = 7\*7\*3 = 147; got 49"):
        patch_embedding_components(weight, 7, 3)


def test_plot_components():
    weight = torch.randn(20, 4 * 4 * 3)
    components, ratio = patch_embedding_components(weight, 4, 3, k=9)
    fig = plot_components(components, ratio, ncols=4)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 9 and len(fig.axes) == 12  # 3 rows of 4, the last 3 empty
    assert shown[0].get_title() == f"{100 * ratio[0].item():.1f}%"
    rgb = shown[0].images[0].get_array()
    assert rgb.shape == (4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    render(fig)


# Overlay helper

def test_upsample_patch_map():
    patch_map = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    nearest = upsample_patch_map(patch_map, 4)
    expected = torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    torch.testing.assert_close(nearest, expected)
    smooth = upsample_patch_map(patch_map[None].expand(3, 2, 2), (4, 6), mode="bilinear")
    assert smooth.shape == (3, 4, 6)
    assert smooth.min() >= 1 and smooth.max() <= 4 and not torch.equal(smooth[0], upsample_patch_map(patch_map, (4, 6)))
    with pytest.raises(ValueError, match="'nearest' or 'bilinear'; got 'cubic'"):
        upsample_patch_map(patch_map, 4, mode="cubic")
