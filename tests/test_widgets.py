"""The widget callbacks: another widget value changes what they draw, and bad values are refused."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch.testing import assert_close  # noqa: E402

from vitlab import local_window_mask, patchify  # noqa: E402
from vitlab.lab.widgets import (  # noqa: E402
    attention_cost,
    format_bytes,
    patch_grid_view,
    softmax_temperature_view,
    window_mask_view,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def digit() -> torch.Tensor:
    torch.manual_seed(0)
    return (torch.rand(28, 28) * 255).to(torch.uint8)  # (H, W) uint8, like an MNIST digit


# --- attention_cost ----------------------------------------------------------------------------------


def test_attention_cost_matches_the_papers_numbers():
    pixels_as_tokens = attention_cost(224, 1, cls_token=False)
    assert pixels_as_tokens["num_patches"] == 50_176
    assert pixels_as_tokens["scores"] == 2_517_630_976  # about 2.5e9
    vit_b16 = attention_cost(224, 16)
    assert (vit_b16["grid"], vit_b16["patch_dim"], vit_b16["seq_len"]) == ((14, 14), 768, 197)
    assert vit_b16["scores"] == 197**2 and vit_b16["attn_map_bytes"] == 4 * 197**2
    assert attention_cost(224, 16, cls_token=False)["scores"] == 38_416


def test_attention_cost_rectangular_and_channels():
    info = attention_cost((28, 56), 7, channels=1)
    assert info["grid"] == (4, 8) and info["num_patches"] == 32 and info["patch_dim"] == 49


def test_attention_cost_refuses_a_patch_size_that_does_not_divide():
    with pytest.raises(ValueError, match=r"patch_size=5 for a 28x28 image \(divisors of 28: \[1, 2, 4, 7, 14, 28\]\)"):
        attention_cost(28, 5)
    with pytest.raises(ValueError, match="patch_size must be a positive int; got 0"):
        attention_cost(28, 0)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(4 * 197**2) == "151.6 KiB"
    assert format_bytes(4 * 50_176**2) == "9.4 GiB"


# --- patch_grid_view ---------------------------------------------------------------------------------


def test_patch_grid_view_info_follows_the_patch_size():
    _, info7 = patch_grid_view(digit(), 7)
    _, info14 = patch_grid_view(digit(), 14)
    assert (info7["num_patches"], info7["patch_dim"], info7["seq_len"]) == (16, 49, 17)
    assert (info14["num_patches"], info14["patch_dim"], info14["seq_len"]) == (4, 196, 5)
    _, no_cls = patch_grid_view(digit(), 7, cls_token=False)
    assert no_cls["seq_len"] == 16 and no_cls["scores"] == 256


def test_patch_grid_view_draws_the_grid_lines_and_the_sequence_of_the_chosen_patch_size():
    fig7, _ = patch_grid_view(digit(), 7)
    fig4, _ = patch_grid_view(digit(), 4)
    ax_grid, _, ax_seq = fig7.axes[:3]
    vlines = ax_grid.collections[0].get_segments()
    assert [seg[0][0] for seg in vlines] == [6.5, 13.5, 20.5]  # 3 inner lines for a 4 x 4 grid
    assert len(fig4.axes[0].collections[0].get_segments()) == 6  # 7 x 7 grid
    image = digit().float()[None] / 255
    assert_close(torch.as_tensor(ax_seq.images[0].get_array()), patchify(image[None], 7)[0])
    assert ax_seq.images[0].get_array().shape == (16, 49)
    assert fig4.axes[2].images[0].get_array().shape == (49, 16)
    assert not np.array_equal(pixels(fig7), pixels(fig4))


def test_patch_grid_view_accepts_rgb_and_lays_patches_apart():
    torch.manual_seed(0)
    photo = torch.rand(3, 32, 32)
    fig, info = patch_grid_view(photo, 8)
    assert (info["num_patches"], info["patch_dim"]) == (16, 192)
    separated = fig.axes[1].images[0].get_array()
    assert separated.shape == (4 * 8 + 3 * 1, 35, 3)  # 4 patches of 8 and 3 white gaps of 1 per side
    assert np.all(separated[8] == 1.0)  # a gap row
    assert_close(torch.as_tensor(np.asarray(separated[9:17, 9:17])).permute(2, 0, 1), photo[:, 8:16, 8:16])
    fig_np, _ = patch_grid_view(photo.numpy(), 8)  # a numpy (C, H, W) array works the same
    assert np.array_equal(pixels(fig), pixels(fig_np))


def test_patch_grid_view_validates_its_input():
    with pytest.raises(ValueError, match=r"patch_size=5 for a 28x28 image"):
        patch_grid_view(digit(), 5)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(C, H, W\) with C = 1 or 3; got shape \(2, 28, 28\)"):
        patch_grid_view(torch.rand(2, 28, 28), 7)
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 28, 28\)"):
        patch_grid_view(torch.rand(1, 1, 28, 28), 7)
    with pytest.raises(ValueError, match="got list"):
        patch_grid_view([[0.0]], 1)


# --- softmax_temperature_view ------------------------------------------------------------------------


SCORES = [2.0, 1.0, 0.0, -1.0]


def test_softmax_temperature_view_draws_the_softmax_of_the_scaled_scores():
    fig, info = softmax_temperature_view(SCORES, 2.0)
    expected = torch.softmax(torch.tensor(SCORES, dtype=torch.float64) / 2.0, dim=0)
    assert_close(info["probs"], expected)
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    assert_close(torch.tensor(heights, dtype=torch.float64), expected)
    assert math.isclose(info["entropy"], float(-(expected * expected.log()).sum()))
    assert math.isclose(info["max_entropy"], math.log(4))


def test_softmax_temperature_view_a_higher_temperature_flattens():
    _, cold = softmax_temperature_view(SCORES, 0.25)
    _, warm = softmax_temperature_view(SCORES, 1.0)
    _, hot = softmax_temperature_view(SCORES, 100.0)
    assert cold["entropy"] < warm["entropy"] < hot["entropy"] < hot["max_entropy"]
    assert cold["max_prob"] > 0.98 and hot["max_prob"] < 0.26
    fig_warm, _ = softmax_temperature_view(SCORES, 1.0)
    fig_hot, _ = softmax_temperature_view(SCORES, 100.0)
    assert not np.array_equal(pixels(fig_warm), pixels(fig_hot))


def test_softmax_temperature_view_labels():
    fig, _ = softmax_temperature_view(SCORES, 1.0, labels=["a", "b", "c", "d"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b", "c", "d"]


def test_softmax_temperature_view_validates_its_input():
    with pytest.raises(ValueError, match="temperature must be a number > 0; got 0"):
        softmax_temperature_view(SCORES, 0)
    with pytest.raises(ValueError, match="temperature must be a number > 0; got -1.0"):
        softmax_temperature_view(SCORES, -1.0)
    with pytest.raises(ValueError, match=r"shape \(T,\); got shape \(2, 2\)"):
        softmax_temperature_view([[1.0, 2.0], [3.0, 4.0]], 1.0)
    with pytest.raises(ValueError, match=r"got shape \(1,\)"):
        softmax_temperature_view([1.0], 1.0)
    with pytest.raises(ValueError, match="finite"):
        softmax_temperature_view([1.0, float("inf")], 1.0)
    with pytest.raises(ValueError, match="expected 4 labels, one per score; got 2"):
        softmax_temperature_view(SCORES, 1.0, labels=["a", "b"])


# --- window_mask_view --------------------------------------------------------------------------------


def test_window_mask_view_counts_come_from_the_library_mask():
    _, info = window_mask_view(7, 3, query=24)
    mask = local_window_mask(7, 3)
    assert info["tokens"] == 50 and info["total_pairs"] == 2500
    assert info["allowed_pairs"] == int(mask.sum()) == 460
    assert info["query_sees"] == 9
    _, corner = window_mask_view(7, 3, query=0)
    assert corner["query_sees"] == 4  # clipped at the border
    _, full = window_mask_view(7, 13, query=0)
    assert full["allowed_pairs"] == full["total_pairs"]


def test_window_mask_view_marks_the_query_and_its_window():
    fig, _ = window_mask_view(5, 3, query=12, cls_token=False)
    grid = fig.axes[1].images[0].get_array()
    assert grid[2, 2] == 1.0  # the query patch
    assert np.count_nonzero(grid == 0.55) == 8  # its 8 neighbours
    outline = fig.axes[0].patches[0]
    assert outline.get_xy() == (-0.5, 11.5)  # row 12 of the 25 x 25 mask (no CLS)
    fig_other, _ = window_mask_view(5, 3, query=0, cls_token=False)
    assert fig_other.axes[0].patches[0].get_xy() == (-0.5, -0.5)
    assert not np.array_equal(pixels(fig), pixels(fig_other))


def test_window_mask_view_validates_its_input():
    with pytest.raises(ValueError, match="window must be an odd k >= 1; got 4"):
        window_mask_view(7, 4)
    with pytest.raises(ValueError, match=r"query must be a patch index in \[0, 48\]; got 49"):
        window_mask_view(7, 3, query=49)
    with pytest.raises(ValueError, match="grid_size must be a positive int; got 0"):
        window_mask_view(0, 3)
