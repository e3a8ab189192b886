"""The attention explorer: every control changes what is drawn, one recorded pass per digit, mistakes, the panel,
the traps of attention capture and the pretrained-photo helpers."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.testing import assert_close  # noqa: E402

import vitlab  # noqa: E402
from vitlab.lab import explorer as explorer_module  # noqa: E402
from vitlab.lab.explorer import (  # noqa: E402
    ALL_HEADS,
    VIEWS,
    AttentionExplorer,
    build_panel,
    count_hooks,
    find_mistakes,
    head_weights,
    leaky_hooks,
    load_photo_vit,
    naive_attend_hook,
    photo_batch,
    view_labels,
    view_maps,
)

SMALL = dict(image_size=12, patch_size=4, in_channels=1, num_classes=5, dim=16, depth=3, heads=2, mlp_dim=24)
L, H, G, N, K, M = 3, 2, 3, 10, 5, 12


def small_model(**overrides):
    """A tiny ViT whose attention is far from uniform (large q, k weights), so every map is distinct."""
    torch.manual_seed(0)
    model = vitlab.ViT(**{**SMALL, **overrides}).eval()
    with torch.no_grad():
        for block in model.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.6)
    return model


def small_set(m=M):
    images = torch.randn(m, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(m) % K
    return images, labels


@pytest.fixture
def explorer():
    return AttentionExplorer(small_model(), *small_set())


def map_arrays(fig):
    """The attention maps drawn: the last image of every axes that shows one."""
    return [np.asarray(ax.images[-1].get_array()) for ax in fig.axes if ax.images]


def bar_heights(fig):
    return [patch.get_height() for ax in fig.axes if not ax.images for patch in ax.patches]


def differs(a, b):
    return len(a) != len(b) or any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, b))


# --- view_maps ------------------------------------------------------------------------------------


def test_view_maps_shapes_and_values(explorer):
    att = explorer.recorded(0).attentions
    assert att.shape == (L, H, N, N)
    assert view_maps(att, G, "cls", layer=1, head=1).shape == (1, G, G)
    assert view_maps(att, G, "cls", layer=1, head=ALL_HEADS).shape == (H, G, G)
    assert view_maps(att, G, "matrix", layer=2, head=ALL_HEADS).shape == (H, N, N)
    assert view_maps(att, G, "rollout").shape == (1, G, G)
    assert_close(view_maps(att, G, "cls", layer=1, head=1)[0], att[1, 1, 0, 1:].reshape(G, G))
    assert_close(view_maps(att, G, "query", layer=2, head=0, query=4)[0], att[2, 0, 5, 1:].reshape(G, G))
    assert_close(view_maps(att, G, "matrix", layer=0, head=1)[0], att[0, 1])


@pytest.mark.parametrize("bad, message", [
    (dict(view="heads"), "view must be one of"), (dict(layer=L), "layer must be one of"),
    (dict(head=H), "head must be one of"), (dict(view="query", query=G * G), "query must be one of"),
])
def test_view_maps_names_the_bad_setting(explorer, bad, message):
    with pytest.raises(ValueError, match=message):
        view_maps(explorer.recorded(0).attentions, G, **bad)


def test_explorer_rejects_images_the_model_cannot_take():
    with pytest.raises(ValueError, match=r"expected images of shape \(M, 1, 12, 12\)"):
        AttentionExplorer(small_model(), torch.zeros(3, 1, 28, 28), torch.zeros(3))


def test_explorer_rejects_a_model_without_a_head():
    with pytest.raises(ValueError, match=r"expected a classifier.*got a model with num_classes=0"):
        AttentionExplorer(small_model(num_classes=0), *small_set())


# --- the figure -------------------------------------------------------------------------------------


def test_figure_shows_the_digit_under_the_map_and_the_probabilities(explorer):
    fig = explorer.figure(3, view="cls", layer=0, head=0)
    (ax,) = [ax for ax in fig.axes if ax.images]
    digit = explorer.images[3, 0]
    drawn = torch.as_tensor(np.asarray(ax.images[0].get_array()))
    assert_close(drawn, (digit - digit.min()) / (digit.max() - digit.min()))
    assert np.asarray(ax.images[-1].get_array()).shape == (12, 12)  # the 3x3 map painted over its patches
    probs = explorer.recorded(3).probs
    assert_close(torch.tensor(bar_heights(fig), dtype=torch.float32), probs)
    assert_close(probs.sum(), torch.tensor(1.0))


def test_query_view_outlines_the_query_patch(explorer):
    fig = explorer.figure(0, view="query", head=0, query=5)  # row 1, col 2 of the 3 x 3 grid of 4 px patches
    (ax,) = [ax for ax in fig.axes if ax.images]
    (outline,) = ax.patches
    assert outline.get_xy() == (2 * 4 - 0.5, 1 * 4 - 0.5) and outline.get_width() == outline.get_height() == 4


def test_all_heads_draws_one_map_per_head(explorer):
    assert len(map_arrays(explorer.figure(0, head=ALL_HEADS))) == H
    assert len(map_arrays(explorer.figure(0, view="matrix", head=ALL_HEADS))) == H
    assert len(map_arrays(explorer.figure(0, view="rollout", head=ALL_HEADS))) == 1  # rollout fuses the heads


BASE = dict(index=0, view="cls", layer=0, head=0, query=0, head_fusion="mean", discard_ratio=0.0)


@pytest.mark.parametrize("change", [
    dict(layer=2), dict(head=1), dict(head=ALL_HEADS), dict(index=5), dict(view="matrix"), dict(view="query"),
    dict(view="rollout"),
])
def test_each_setting_changes_the_maps(explorer, change):
    before = map_arrays(explorer.figure(**BASE))
    assert differs(before, map_arrays(explorer.figure(**{**BASE, **change})))


@pytest.mark.parametrize("base, change", [
    (dict(view="query", query=0), dict(query=7)),
    (dict(view="rollout"), dict(head_fusion="max")),
    (dict(view="rollout"), dict(head_fusion="min")),
    (dict(view="rollout"), dict(discard_ratio=0.5)),
])
def test_query_fusion_and_discard_change_their_views(explorer, base, change):
    before = map_arrays(explorer.figure(**{**BASE, **base}))
    assert differs(before, map_arrays(explorer.figure(**{**BASE, **base, **change})))


def test_another_digit_changes_the_bars(explorer):
    assert not np.allclose(bar_heights(explorer.figure(0)), bar_heights(explorer.figure(1)))


def test_one_recorded_forward_pass_per_digit(explorer, monkeypatch):
    recordings = []
    real_record = explorer_module.record

    def counting_record(model):
        recordings.append(model)
        return real_record(model)

    monkeypatch.setattr(explorer_module, "record", counting_record)
    for view in VIEWS:
        for layer in range(L):
            explorer.figure(2, view=view, layer=layer, head=ALL_HEADS, query=3, head_fusion="max")
    assert len(recordings) == explorer.forward_passes == 1
    explorer.figure(4)
    explorer.figure(2, layer=1)  # still cached
    assert len(recordings) == explorer.forward_passes == 2


def test_the_cache_is_bounded():
    explorer = AttentionExplorer(small_model(), *small_set(), cache_size=2)
    for index in (0, 1, 2, 0):  # 0 was evicted by 2
        explorer.recorded(index)
    assert explorer.forward_passes == 4 and len(explorer._cache) == 2


def test_recording_restores_the_fused_path_and_leaves_no_hooks(explorer):
    explorer.model.set_attention(True)
    explorer.recorded(0)
    assert all(block.attn.fused for block in explorer.model.blocks)
    assert count_hooks(explorer.model) == 0


def test_rgb_photo_with_many_classes_draws_the_top_classes():
    model = small_model(in_channels=3, num_classes=20)
    images = torch.randn(2, 3, 12, 12)
    shown = torch.rand(2, 12, 12, 3)
    explorer = AttentionExplorer(model, images, class_names=[f"class {i}" for i in range(20)], display_images=shown)
    fig = explorer.figure(1, view="rollout")
    (ax,) = [ax for ax in fig.axes if ax.images]
    drawn = torch.as_tensor(np.asarray(ax.images[0].get_array()))
    assert_close(drawn, (shown[1] - shown[1].min()) / (shown[1].max() - shown[1].min()))
    widths = [patch.get_width() for axis in fig.axes if not axis.images for patch in axis.patches]
    assert_close(sorted(widths, reverse=True), explorer.recorded(1).probs.topk(5).values.tolist())


# --- mistakes ------------------------------------------------------------------------------------------


def planted():
    """A tiny untrained model, and labels that agree with its predictions except at indices 2, 5 and 9."""
    model = small_model()
    images, _ = small_set()
    with torch.no_grad():
        labels = model(images).argmax(-1)
    labels[[2, 5, 9]] = (labels[[2, 5, 9]] + 1) % K
    return model, images, labels


def test_find_mistakes_finds_the_planted_ones():
    model, images, labels = planted()
    assert find_mistakes(model, images, labels, batch_size=5).tolist() == [2, 5, 9]


def test_next_mistake_walks_and_wraps():
    explorer = AttentionExplorer(*planted())
    assert [explorer.next_mistake(i) for i in (-1, 2, 5, 9, 11)] == [2, 5, 9, 2, 2]


def test_no_mistakes():
    model, images, labels = planted()
    labels[[2, 5, 9]] = (labels[[2, 5, 9]] - 1) % K
    assert AttentionExplorer(model, images, labels).next_mistake(0) is None


# --- the widget panel ------------------------------------------------------------------------------------


def test_panel_controls_redraw_the_picture():
    panel = build_panel(AttentionExplorer(*planted()))
    assert panel.renders == 1 and panel.png.startswith(b"\x89PNG") and bytes(panel.out.value) == panel.png
    assert bytes(panel.bars.value).startswith(b"\x89PNG")
    assert not (panel.digit.continuous_update or panel.layer.continuous_update or panel.discard.continuous_update)
    assert [value for _, value in panel.head.options] == [ALL_HEADS, 0, 1]
    changes = [(panel.layer, 2), (panel.head, 1), (panel.digit, 4), (panel.view, "query"), (panel.query, 8),
               (panel.view, "matrix"), (panel.view, "rollout"), (panel.fusion, "max"), (panel.discard, 0.4)]
    for renders, (control, value) in enumerate(changes, start=2):
        before, png = panel.shown.clone(), panel.png
        control.value = value
        assert panel.renders == renders, control
        assert (before.shape != panel.shown.shape or differs([before.numpy()], [panel.shown.numpy()])), control
        assert panel.png != png and bytes(panel.out.value) == panel.png, control


def test_panel_scale_toggle_changes_the_colours_not_the_maps():
    panel = build_panel(AttentionExplorer(*planted()), head=ALL_HEADS)
    maps, png = panel.shown.clone(), panel.png
    panel.scale.value = "panel"
    assert_close(panel.shown, maps)
    assert panel.png != png


def test_panel_caption_gives_each_heads_cls_to_itself_share():
    explorer = AttentionExplorer(*planted())
    panel = build_panel(explorer, view="cls", layer=1, head=ALL_HEADS)
    share = explorer.recorded(0).attentions[1, :, 0, 0]
    for k in range(H):
        assert f"head {k} {float(share[k]):.2f}" in panel.caption.value


def test_map_limits_shared_and_per_panel():
    maps = torch.tensor([[[0.1, 0.2]], [[0.4, 0.3]]])
    assert explorer_module.map_limits(maps, "shared") == pytest.approx([0.4, 0.4])
    assert explorer_module.map_limits(maps, "panel") == pytest.approx([0.2, 0.4])
    with pytest.raises(ValueError, match="scale"):
        explorer_module.map_limits(maps, "global")


def test_render_view_colours_equal_values_alike_only_on_a_shared_scale():
    maps = torch.tensor([[[0.2, 0.0], [0.0, 0.0]], [[0.2, 0.8], [0.0, 0.0]]])  # the same 0.2 in both top-left cells
    picture = np.zeros((8, 8))
    shared = explorer_module.render_view(picture, maps, "cls", ["a", "b"], "shared")
    per_panel = explorer_module.render_view(picture, maps, "cls", ["a", "b"], "panel")
    step = explorer_module.PANEL_SIDE + explorer_module.PANEL_GAP
    y = explorer_module.PANEL_TITLE + 10
    assert np.array_equal(shared[y, 10], shared[y, step + 10])  # equal weights, equal colours
    assert not np.array_equal(per_panel[y, 10], per_panel[y, step + 10])  # 0.2 is panel a's peak, not b's


def test_panel_greys_out_what_the_view_ignores():
    panel = AttentionExplorer(*planted()).widget(view="query")
    assert not panel.query.disabled and panel.fusion.disabled and not panel.layer.disabled
    panel.view.value = "rollout"
    assert panel.query.disabled and not panel.fusion.disabled and not panel.discard.disabled and panel.layer.disabled


def test_mistake_button_shows_the_next_mistake():
    panel = AttentionExplorer(*planted()).widget()
    panel.mistake.click()
    assert panel.digit.value == 2 and panel.status.value == "mistake 1 of 3" and panel.renders == 2
    assert "<b>#2</b>" in panel.caption.value
    panel.mistake.click()
    assert panel.digit.value == 5 and panel.status.value == "mistake 2 of 3"


# --- the traps of attention capture --------------------------------------------------------------------


def test_multihead_attention_averages_heads_by_default():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    averaged, per_head = head_weights(mha, torch.randn(2, 5, 16))
    assert averaged.shape == (2, 5, 5) and per_head.shape == (2, 4, 5, 5)
    assert_close(per_head.mean(dim=1), averaged)
    assert (per_head - averaged[:, None]).abs().amax() > 1e-3  # the heads differ: averaging loses that


def test_a_hook_on_the_fused_path_sees_nothing_and_record_sees_everything():
    model, images, _ = planted()
    assert len(naive_attend_hook(model, images)) == L  # explicit path: one (B, h, N, N) per layer
    model.set_attention(True)
    assert naive_attend_hook(model, images) == []
    with vitlab.record(model) as rec:
        model(images)
    assert rec.attentions.shape == (M, L, H, N, N)
    assert all(block.attn.fused for block in model.blocks)
    assert count_hooks(model) == 0


def test_leaky_hooks_stay_and_match_too_much():
    model, images, _ = planted()
    first = leaky_hooks(model, images)
    per_call = count_hooks(model)
    assert per_call > L  # "attn" matches q, k, v, the scores, the softmax, the dropout, ...
    assert len(first) == per_call and sum(t.shape == (M, H, N, N) for t in first) > L  # scores look like probabilities
    leaky_hooks(model, images)
    assert count_hooks(model) == 2 * per_call  # the first call's hooks never went away
    assert len(first) == 2 * per_call  # and keep appending to a list nobody reads
    fresh = planted()[0]
    with vitlab.record(fresh):
        fresh(images)
    assert count_hooks(fresh) == 0


# --- bring a pretrained ViT -----------------------------------------------------------------------------


def test_photo_batch_crops_resizes_and_normalises():
    photo = np.full((30, 50, 3), 255, dtype=np.uint8)
    photo[:, :10] = 0  # cropped away: the centre square is columns 10..39
    x, shown = photo_batch(photo, size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert x.shape == (1, 3, 16, 16) and shown.shape == (1, 16, 16, 3)
    assert_close(shown, torch.ones(1, 16, 16, 3))
    assert_close(x, torch.full((1, 3, 16, 16), 2.0))


def test_load_photo_vit_offline_with_an_empty_cache_says_so(tmp_path):
    photo, message = load_photo_vit(online=False, cache_dir=tmp_path)
    assert photo is None and message.startswith("Skipping") and "\n" not in message


def test_load_photo_vit_uses_a_cached_timm_model(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    monkeypatch.setattr(explorer_module, "PHOTO_TIMM_MODELS", ("test_vit",))
    torch.manual_seed(0)
    peer = timm.create_model("test_vit", pretrained=False).eval()
    revision = "0" * 40
    repo = tmp_path / "models--timm--test_vit.r160_in1k"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    safetensors.save_file(peer.state_dict(), str(repo / "snapshots" / revision / "model.safetensors"))
    photo, message = load_photo_vit(online=False, cache_dir=tmp_path)
    assert message == "Using timm test_vit (from the local cache)"
    assert photo.mean == (0.5, 0.5, 0.5) and len(photo.class_names) == 1000
    x, _ = photo_batch(np.zeros((40, 40, 3), dtype=np.uint8), size=160, mean=photo.mean, std=photo.std)
    with torch.no_grad():
        assert_close(photo.model(x), peer(x), atol=1e-4, rtol=1e-4)


def test_view_labels_name_the_heads_drawn_and_the_view():
    assert view_labels("cls", 2, ALL_HEADS, 4) == (
        [0, 1, 2, 3], ["head 0", "head 1", "head 2", "head 3"], "layer 2, all heads: CLS → patches")
    assert view_labels("query", 0, 3, 4, what="query patch (row 1, col 2)") == (
        [3], ["head 3"], "layer 0, head 3: query patch (row 1, col 2)")
    assert view_labels("rollout", 5, 0, 4, "max", 0.25) == (
        [], ["max over heads, discard 0.25"], "attention rollout through all layers: what reaches CLS")
