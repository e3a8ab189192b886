"""The ViT: features/head split, pooling, fused vs explicit, resampling to a new image size, input checks."""

import pytest
import torch
from torch.testing import assert_close

from vitlab.model import ViT
from vitlab.model.attention import local_window_mask
from vitlab.model.config import ViTConfig
from vitlab.model.embeddings import sincos_2d

SMALL = dict(image_size=12, patch_size=4, in_channels=2, num_classes=5, dim=16, depth=2, heads=4, mlp_dim=24)


def small(**overrides):
    torch.manual_seed(0)
    return ViT(**{**SMALL, **overrides}).eval()


def images(b=3, c=2, size=12):
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(1))


def test_forward_shapes():
    model = small()
    x = images()
    feats = model.forward_features(x)
    assert feats.shape == (3, 10, 16)  # (B, N, D): 1 CLS + 3x3 patches
    assert model(x).shape == (3, 5)
    assert model.forward_head(feats, pre_logits=True).shape == (3, 16)


def test_forward_is_forward_head_of_forward_features():
    model = small()
    x = images()
    assert torch.equal(model(x), model.forward_head(model.forward_features(x)))


def test_cls_pooling_takes_token_zero():
    model = small(pool="cls")
    tokens = torch.randn(3, 10, 16)
    assert torch.equal(model.forward_head(tokens, pre_logits=True), tokens[:, 0])
    assert_close(model.forward_head(tokens), model.head(tokens[:, 0]))


def test_mean_pooling_averages_the_patch_tokens_without_cls():
    model = small(pool="mean")
    tokens = torch.randn(3, 10, 16)
    tokens[:, 0] = 1000.0  # a CLS token that would dominate a mean including it
    pooled = model.forward_head(tokens, pre_logits=True)
    manual = sum(tokens[:, i] for i in range(1, 10)) / 9
    assert_close(pooled, manual)
    assert_close(model.forward_head(tokens), model.head(manual))


def test_pre_norm_features_are_normalised_and_post_norm_has_no_extra_norm():
    pre = small(norm="pre")
    assert isinstance(pre.norm, torch.nn.LayerNorm)
    feats = pre.forward_features(images())
    assert_close(feats.mean(-1), torch.zeros(3, 10), atol=1e-5, rtol=0)
    post = small(norm="post")
    assert isinstance(post.norm, torch.nn.Identity)
    assert not any(n.startswith("norm.") for n, _ in post.named_parameters())


def test_a_pooled_final_norm_normalises_the_pooled_token_with_the_same_weights():
    tokens_model, pooled_model = small(pool="mean"), small(pool="mean", final_norm="pooled")
    assert tokens_model.state_dict().keys() == pooled_model.state_dict().keys()  # one norm, at another place
    x = images()
    feats = pooled_model.forward_features(x)
    assert feats.mean(-1).abs().max() > 0.01  # the tokens are not normalised
    pooled = pooled_model.forward_head(feats, pre_logits=True)
    assert_close(pooled, pooled_model.norm(feats[:, 1:].mean(dim=1)))
    assert_close(pooled_model(x), pooled_model.head(pooled))
    assert not torch.allclose(pooled_model(x), tokens_model(x), atol=1e-3)  # norm-then-pool differs from pool-then-norm


def test_no_head_returns_the_pooled_features():
    model = small(num_classes=0)
    assert isinstance(model.head, torch.nn.Identity)
    assert not any(n.startswith("head.") for n, _ in model.named_parameters())
    x = images()
    assert model(x).shape == (3, 16)
    assert torch.equal(model(x), model.forward_head(model.forward_features(x), pre_logits=True))


def count_by_hand(c, pos_params, final_norm):
    D, M = c["dim"], c["mlp_dim"]
    patch = D * c["in_channels"] * c["patch_size"] ** 2 + D
    block = 2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (D * M + M) + (M * D + D)
    head = D * c["num_classes"] + c["num_classes"]
    return patch + D + pos_params + c["depth"] * block + (2 * D if final_norm else 0) + head


def test_num_parameters_by_hand():
    grid = SMALL["image_size"] // SMALL["patch_size"]
    assert small().num_parameters() == count_by_hand(SMALL, (1 + grid * grid) * SMALL["dim"], True)
    assert small(pos_embed="sincos").num_parameters() == count_by_hand(SMALL, 0, True)
    assert small(norm="post").num_parameters() == count_by_hand(SMALL, (1 + grid * grid) * SMALL["dim"], False)


def test_num_parameters_trainable_only():
    model = small()
    total = model.num_parameters()
    model.head.requires_grad_(False)
    frozen = model.head.weight.numel() + model.head.bias.numel()
    assert model.num_parameters() == total - frozen
    assert model.num_parameters(trainable_only=False) == total


def test_dropout_is_off_in_eval():
    model = small(dropout=0.3, attn_dropout=0.3, drop_path=0.3)
    x = images()
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


def test_drop_path_rises_linearly_to_the_configured_rate():
    model = small(depth=3, drop_path=0.2)
    rates = [block.drop_path1.p for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert [block.drop_path2.p for block in model.blocks] == rates


def test_config_and_overrides():
    config = ViTConfig(**SMALL)
    assert ViT(config).config is config
    model = ViT(config, pool="mean")
    assert model.config.pool == "mean" and config.pool == "cls"
    with pytest.raises(ValueError, match="dim must be divisible by heads: got dim=16, heads=3"):
        ViT(config, heads=3)
    with pytest.raises(ValueError, match="expected a ViTConfig; got dict"):
        ViT(dict(SMALL))


@pytest.mark.parametrize(
    ("field", "value"),
    [("pool", "max"), ("pos_embed", "rope"), ("norm", "sandwich"), ("patch_embed", "mlp"), ("attn_impl", "flash")],
)
def test_unknown_kinds_raise_from_the_model_constructor(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be one of .*; got '{value}'"):
        ViT(**{**SMALL, field: value})


def test_config_image_size_not_divisible():
    with pytest.raises(ValueError, match="image_size=13, patch_size=4"):
        ViT(**{**SMALL, "image_size": 13})


@pytest.mark.parametrize("patch_embed", ["conv", "linear"])
def test_linear_and_conv_models_agree_after_loading_weights(patch_embed):
    other = "linear" if patch_embed == "conv" else "conv"
    a, b = small(patch_embed=patch_embed), small(patch_embed=other)
    state = {k: v for k, v in a.state_dict().items() if not k.startswith("patch_embed.")}
    b.load_state_dict(state, strict=False)
    b.patch_embed.load_from(a.patch_embed)
    assert_close(b(images()), a(images()))


def test_both_patch_embeddings_start_alike():
    """Same seed, one channel: the conv and linear models are the same function; both keep PyTorch's init."""
    one = {**SMALL, "in_channels": 1}
    torch.manual_seed(0)
    conv = ViT(**one, patch_embed="conv").eval()
    torch.manual_seed(0)
    linear = ViT(**one, patch_embed="linear").eval()
    assert_close(linear(images(c=1)), conv(images(c=1)))
    for model in (small(patch_embed="conv"), small(patch_embed="linear")):  # two channels: same spread
        weight = model.patch_embed.proj.weight
        # PyTorch's default: uniform within +-1/sqrt(fan_in), std 1/sqrt(3 * fan_in) = 0.10 for fan_in 32;
        # not the 0.02 of the other Linears
        assert 0.09 < weight.std().item() < 0.115 and weight.abs().max().item() <= 32**-0.5
        assert model.patch_embed.proj.bias.abs().max().item() > 0.02
        assert 0.015 < model.head.weight.std().item() < 0.025 and not model.head.bias.any()


# fused vs explicit at model level


def fused_and_explicit(model, x, mask=None):
    results = []
    for fused in (True, False):
        model.set_attention(fused)
        assert all(block.attn.fused is fused for block in model.blocks)
        model.zero_grad()
        xg = x.clone().requires_grad_(True)
        out = model(xg, mask)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.detach(), xg.grad, grads))
    return results


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("window", [0, 1, 3])
def test_fused_and_explicit_models_agree(norm, window):
    model = small(norm=norm, window=window)
    (out_f, gx_f, g_f), (out_e, gx_e, g_e) = fused_and_explicit(model, images())
    assert_close(out_f, out_e)
    assert_close(gx_f, gx_e)
    assert g_f.keys() == g_e.keys() and len(g_e) == len(list(model.parameters()))
    for name in g_e:
        assert_close(g_f[name], g_e[name], msg=name)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_fused_and_explicit_agree_with_a_per_batch_mask(norm):
    model = small(norm=norm)
    x = images()
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(3, 1, 10, 10, generator=g) > 0.5
    mask[..., 0] = True
    (out_f, gx_f, _), (out_e, gx_e, _) = fused_and_explicit(model, x, mask)
    assert_close(out_f, out_e)
    assert_close(gx_f, gx_e)
    assert not torch.allclose(out_e, model(x), atol=1e-4)  # the mask did something


def test_attn_impl_sets_the_path_of_every_block():
    assert all(b.attn.fused for b in small(attn_impl="fused").blocks)
    assert not any(b.attn.fused for b in small(attn_impl="explicit").blocks)
    assert not any(b.attn.fused for b in small().blocks)  # 10 tokens: auto picks explicit


def test_window_config_builds_the_mask_and_a_passed_mask_replaces_it():
    model = small(window=1)
    assert torch.equal(model.attn_mask, local_window_mask(3, 1))
    assert small().attn_mask is None
    x = images()
    full = torch.ones(10, 10, dtype=torch.bool)
    assert torch.equal(model(x, full), small(window=0)(x))
    assert not torch.allclose(model(x), model(x, full), atol=1e-4)
    assert "attn_mask" not in model.state_dict()


# resampling to a new image size


def test_set_image_size_learned_runs_on_the_new_size_and_keeps_cls():
    torch.manual_seed(0)
    model = ViT(image_size=28, patch_size=7, dim=16, depth=1, heads=2, mlp_dim=16).eval()
    cls_entry = model.pos_embed.weight[0, 0].clone()
    model.set_image_size(56)
    assert model.config.image_size == 56 and model.config.grid_size == 8
    assert model.pos_embed.weight.shape == (1, 65, 16)
    assert torch.equal(model.pos_embed.weight[0, 0], cls_entry)
    assert model(torch.randn(2, 1, 56, 56)).shape == (2, 10)
    assert model.forward_features(torch.randn(2, 1, 56, 56)).shape == (2, 65, 16)
    with pytest.raises(ValueError, match=r"expected 56x56 images .*; got 28x28.*set_image_size\(28\)"):
        model(torch.randn(2, 1, 28, 28))


def test_set_image_size_sincos_equals_a_fresh_table():
    model = small(pos_embed="sincos")
    model.set_image_size(20)
    assert torch.equal(model.pos_embed.weight, sincos_2d(5, 16))
    fresh = small(pos_embed="sincos", image_size=20)
    assert torch.equal(model.pos_embed.weight, fresh.pos_embed.weight)
    assert model(images(size=20)).shape == (3, 5)


def test_set_image_size_rebuilds_the_window_mask_on_the_models_device():
    model = small(window=3)
    model.set_image_size(20)
    assert torch.equal(model.attn_mask, local_window_mask(5, 3))
    assert model(images(size=20)).shape == (3, 5)
    meta = small(window=3, pos_embed="sincos").to("meta")  # stands in for an accelerator: anything but the CPU
    meta.set_image_size(20)
    assert meta.attn_mask.device.type == "meta"
    assert meta.pos_embed.weight.device.type == "meta"


def test_set_image_size_not_divisible_leaves_the_model_unchanged():
    model = small()
    before = model.pos_embed.weight.clone()
    with pytest.raises(ValueError, match="image_size=18, patch_size=4"):
        model.set_image_size(18)
    assert model.config.image_size == 12
    assert torch.equal(model.pos_embed.weight, before)


# bad inputs


def test_wrong_channel_count():
    expected = r"expected 2 channel\(s\) \(config.in_channels\); got 3 in shape \(1, 3, 12, 12\)"
    with pytest.raises(ValueError, match=expected):
        small()(torch.randn(1, 3, 12, 12))


def test_input_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="divisible by patch_size=4; got 14x14"):
        small()(torch.randn(1, 2, 14, 14))


def test_input_of_another_size_without_resampling():
    expected = r"expected 12x12 images \(config.image_size\); got 16x16.*set_image_size\(16\)"
    with pytest.raises(ValueError, match=expected):
        small()(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match=r"expected 12x12 images \(config.image_size\); got 12x16"):
        small()(torch.randn(1, 2, 12, 16))


@pytest.mark.parametrize(("bad", "got"), [(torch.randn(2, 12, 12), r"\(2, 12, 12\)"), ([[1.0]], "list")])
def test_input_not_a_batch_of_images(bad, got):
    with pytest.raises(ValueError, match=rf"expected images of shape \(B, 2, 12, 12\); got {got}"):
        small()(bad)
