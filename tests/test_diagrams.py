"""The diagrams draw one box per step of the config they are given, and every shape they print is the
shape the model really produces (checked against ``vitlab.record``)."""

import re

import pytest
import torch

import vitlab
from vitlab.lab import diagrams

CONFIGS = [
    vitlab.ViTConfig(image_size=21, patch_size=7, dim=16, depth=2, heads=2, mlp_dim=32),  # seed 000's 9 patches
    vitlab.ViTConfig(depth=2),  # MNIST: 16 patches, 4 heads
    vitlab.ViTConfig(image_size=32, patch_size=4, in_channels=3, dim=48, depth=1, heads=12, mlp_dim=96,
                     pool="mean", norm="post", num_classes=5),  # 64 patches, more heads than are drawn
]


def step_boxes(fig):
    return [patch for ax in fig.axes for patch in ax.patches if patch.get_gid() == "step"]


def texts(fig):
    return [text.get_text() for ax in fig.axes for text in ax.texts]


def recorded_shapes(config, prefix=""):
    """{step name: shape for one image} of one forward pass of a model built from ``config``."""
    torch.manual_seed(0)
    model = vitlab.ViT(config, patch_embed="linear").eval()
    with torch.no_grad(), vitlab.record(model, every_step=True) as rec:
        model(torch.zeros(2, config.in_channels, config.image_size, config.image_size))
    shapes = {}
    for name, shape in rec.shapes:
        shapes.setdefault(name.removeprefix(prefix), tuple(shape[1:]))
    return shapes, [name for name, _ in rec.shapes]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.image_size}px-p{c.patch_size}-h{c.heads}")
def test_pipeline_has_one_box_per_step_with_the_recorded_shapes(config):
    steps = diagrams.pipeline_steps(config)
    fig = diagrams.pipeline_figure(config)
    assert len(step_boxes(fig)) == len(steps)
    shown = texts(fig)
    shapes, _ = recorded_shapes(config)
    for step in steps:
        assert step.title in shown and diagrams.fmt(step.shape) in shown
        if step.record is not None:
            assert step.shape == shapes[step.record], step
    assert steps[1].title == f"{config.num_patches} patches"
    assert steps[1].shape == (config.num_patches, config.in_channels, config.patch_size, config.patch_size)
    # the token strip: the class token and every patch (or an ellipsis when there are many)
    tokens = [t for t in shown if re.fullmatch(r"z\d+\n\+p\d+", t)]
    assert tokens[0] == "z0\n+p0" and tokens[-1] == f"z{config.num_patches}\n+p{config.num_patches}"
    assert len(tokens) == (config.num_tokens if config.num_patches <= 16 else 9 + 2)  # z0 .. z8, ..., the last two


def test_the_nine_patch_walk_is_seed_000s():
    config = CONFIGS[0]  # a 3n x 3n image with n = 7
    titles = [step.title for step in diagrams.pipeline_steps(config)]
    assert titles == ["image", "9 patches", "flatten", "z_i = W x_i", "+ class token", "+ positions", "encoder",
                      "o0", "MLP head"]


def test_a_model_without_head_or_with_mean_pooling_changes_the_last_steps():
    steps = diagrams.pipeline_steps(vitlab.ViTConfig(num_classes=0, pool="mean"))
    assert steps[-1].title == "mean of o1 .. o16" and steps[-1].shape == (64,)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("config", CONFIGS[:2], ids=["9-patches", "mnist"])
def test_block_steps_follow_the_block_in_the_order_it_runs(config, norm):
    config = vitlab.ViTConfig(**{**config.to_dict(), "norm": norm, "depth": 1})
    steps = diagrams.block_steps(config)
    shapes, order = recorded_shapes(config, prefix="blocks.0.")
    named = [step.record for step in steps if step.record is not None]
    ran = [name[len("blocks.0."):] for name in order if name[len("blocks.0."):] in named]
    assert ran == named
    for step in steps:
        assert step.shape == (config.num_tokens, config.dim)
        if step.record:
            assert shapes[step.record] == step.shape
    assert [s.kind for s in steps].count("add") == 2 and [s.kind for s in steps].count("norm") == 2


def test_block_figure_draws_both_blocks():
    config = vitlab.ViTConfig(dim=32, mlp_dim=80)
    fig = diagrams.block_figure(config)
    assert len(step_boxes(fig)) == len(diagrams.block_steps(config, "pre")) + len(diagrams.block_steps(config, "post"))
    shown = texts(fig)
    assert "Linear 32 -> 80, GELU, Linear 80 -> 32" in shown
    assert shown.count("(17, 32)") == 14
    with pytest.raises(ValueError, match="'middle'"):
        diagrams.block_steps(config, "middle")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"h{c.heads}")
def test_heads_figure_has_a_box_per_head_and_step(config):
    steps = diagrams.heads_steps(config)
    heads = diagrams.drawn_heads(config.heads)
    drawn = [head for head in heads if head is not None]
    fig = diagrams.heads_figure(config)
    per_head = [step for step in steps if step.title in diagrams.PER_HEAD]
    assert len(per_head) == 3
    assert len(step_boxes(fig)) == len(steps) - 3 + 3 * len(drawn)
    shown = texts(fig)
    assert f"head {config.heads}: q, k, v" in shown
    assert ("..." in shown) == (config.heads > diagrams.MAX_HEADS_DRAWN)
    shapes, _ = recorded_shapes(config, prefix="blocks.0.")
    for step in steps:
        if step.record is None:
            continue
        recorded = shapes[step.record]
        if step.title in diagrams.PER_HEAD:  # the recorder holds all heads: (h, N, d) or (h, N, N)
            assert recorded == (config.heads, *step.shape)
        else:
            assert recorded == step.shape
    assert steps[2].shape == (config.num_tokens, config.head_dim)


def test_drawn_heads():
    assert diagrams.drawn_heads(4) == [1, 2, 3, 4]
    assert diagrams.drawn_heads(12) == [1, 2, 3, 4, 5, None, 12]


def test_a_figure_needs_a_config():
    with pytest.raises(ValueError, match="expected a vitlab ViTConfig; got dict"):
        diagrams.pipeline_figure({"image_size": 28})


def test_mask_colours_show_the_cls_row_and_column_apart_from_blocked_and_patch_pairs():
    from matplotlib.colors import to_rgb

    mask = vitlab.local_window_mask(4, 3)  # (17, 17)
    image = diagrams.mask_colours(mask)
    red, blue, grey = (to_rgb(diagrams.MASK_COLOURS[k]) for k in ("cls", "patch", "blocked"))
    assert all(tuple(image[0, j]) == red for j in range(17)) and all(tuple(image[i, 0]) == red for i in range(17))
    assert tuple(image[1, 1]) == blue and tuple(image[1, 16]) == grey  # patch 0 sees itself, not patch 15
    assert all(colour != (1.0, 1.0, 1.0) for colour in (red, blue, grey))  # nothing is white on a white page
    assert int((image == blue).all(-1).sum()) == int(mask[1:, 1:].sum())


def test_mask_figure_checks_its_mask_and_query():
    mask = vitlab.local_window_mask(7, 3)
    fig = diagrams.mask_figure(mask, 7, query=24)
    assert "patch 24 (red frame) sees 9 patches + CLS" in [ax.get_title() for ax in fig.axes]
    with pytest.raises(ValueError, match=r"expected a \(50, 50\) mask .* got shape \(17, 17\)"):
        diagrams.mask_figure(vitlab.local_window_mask(4, 3), 7)
    with pytest.raises(ValueError, match="got 49"):
        diagrams.mask_figure(mask, 7, query=49)
