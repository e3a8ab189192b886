"""ViTConfig: derived sizes, the auto attention choice, dict round-trip, and every validation error."""

import pytest

from vitlab.model.config import EXPLICIT_ATTENTION_MAX_TOKENS, ViTConfig


def test_defaults_are_mnist_sized_and_derived_sizes_follow():
    c = ViTConfig()
    assert (c.image_size, c.patch_size, c.in_channels, c.num_classes) == (28, 7, 1, 10)
    assert c.grid_size == 4
    assert c.num_patches == 16
    assert c.num_tokens == 17
    assert c.head_dim == 16


def test_seed_numbers_for_a_224_image_with_16_pixel_patches():
    c = ViTConfig(image_size=224, patch_size=16, in_channels=3, dim=768, heads=12)
    assert (c.grid_size, c.num_patches, c.num_tokens, c.head_dim) == (14, 196, 197, 64)


def test_auto_attention_is_explicit_up_to_the_crossover(monkeypatch):
    import vitlab.model.config

    c = ViTConfig()  # 17 tokens
    monkeypatch.setattr(vitlab.model.config, "EXPLICIT_ATTENTION_MAX_TOKENS", 17)
    assert c.fused_attention is False  # at the crossover: still explicit
    monkeypatch.setattr(vitlab.model.config, "EXPLICIT_ATTENTION_MAX_TOKENS", 16)
    assert c.fused_attention is True


def test_auto_attention_with_the_shipped_crossover():
    assert ViTConfig().fused_attention is False  # 17 tokens: the explicit path
    assert ViTConfig(image_size=112, patch_size=16, in_channels=3, dim=768, heads=12).fused_attention is False  # 50
    assert ViTConfig(image_size=224, patch_size=16, in_channels=3, dim=768, heads=12).fused_attention is True  # 197
    assert ViTConfig(image_size=32, patch_size=1).fused_attention is True  # 1025 tokens


@pytest.mark.parametrize(("impl", "fused"), [("fused", True), ("explicit", False)])
def test_attn_impl_overrides_auto(impl, fused):
    assert ViTConfig(attn_impl=impl).fused_attention is fused
    assert ViTConfig(image_size=16, patch_size=1, attn_impl=impl).fused_attention is fused


def test_dict_round_trip():
    c = ViTConfig(dim=32, heads=2, pool="mean", norm="post", window=3)
    d = c.to_dict()
    assert d["dim"] == 32 and d["pool"] == "mean" and d["window"] == 3
    assert ViTConfig.from_dict(d) == c


def test_from_dict_names_unknown_keys_and_the_fields():
    expected = r"unknown ViTConfig fields \['colour', 'layers'\]; expected a subset of .*'depth'"
    with pytest.raises(ValueError, match=expected):
        ViTConfig.from_dict({"dim": 32, "layers": 3, "colour": "red"})


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="pool must be one of"):
        ViTConfig.from_dict({"pool": "max"})


def test_image_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match=r"image_size=30, patch_size=7 \(remainder 2\)"):
        ViTConfig(image_size=30, patch_size=7)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"dim must be divisible by heads: got dim=30, heads=4"):
        ViTConfig(dim=30, heads=4)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("pool", "max", r"\('cls', 'mean'\)"),
        ("pos_embed", "rope", r"\('learned', 'sincos', 'none'\)"),
        ("norm", "sandwich", r"\('pre', 'post'\)"),
        ("final_norm", "both", r"\('tokens', 'pooled'\)"),
        ("patch_embed", "mlp", r"\('conv', 'linear'\)"),
        ("attn_impl", "flash", r"\('auto', 'fused', 'explicit'\)"),
    ],
)
def test_unknown_kind_names_allowed_and_received(field, value, allowed):
    with pytest.raises(ValueError, match=rf"{field} must be one of {allowed}; got '{value}'"):
        ViTConfig(**{field: value})


@pytest.mark.parametrize("field", ["image_size", "patch_size", "in_channels", "dim", "depth", "heads", "mlp_dim"])
@pytest.mark.parametrize("value", [0, -1, 2.0, True])
def test_sizes_must_be_positive_ints(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive int; got {value!r}"):
        ViTConfig(**{field: value})


@pytest.mark.parametrize("value", [-1, 2.0, True])
def test_num_classes_is_an_int_from_zero(value):
    assert ViTConfig(num_classes=0).num_classes == 0  # no head: a feature extractor
    with pytest.raises(ValueError, match=rf"num_classes must be an int >= 0 \(0: no head\); got {value!r}"):
        ViTConfig(num_classes=value)


def test_a_pooled_final_norm_needs_the_pre_norm_model():
    assert ViTConfig(final_norm="pooled").final_norm == "pooled"
    with pytest.raises(ValueError, match="final_norm='pooled' needs norm='pre'.*got norm='post'"):
        ViTConfig(final_norm="pooled", norm="post")


def test_sincos_needs_dim_divisible_by_four():
    with pytest.raises(ValueError, match="dim divisible by 4; got dim=18"):
        ViTConfig(dim=18, heads=2, pos_embed="sincos")
    ViTConfig(dim=18, heads=2, pos_embed="learned")  # only sincos cares


@pytest.mark.parametrize("field", ["dropout", "attn_dropout", "drop_path"])
@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_rates_must_be_in_unit_interval(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a number in \[0, 1\); got {value}"):
        ViTConfig(**{field: value})


@pytest.mark.parametrize("window", [-1, 2, 4])
def test_window_must_be_zero_or_odd(window):
    with pytest.raises(ValueError, match=rf"window must be 0 \(full attention\) or an odd k >= 1; got {window}"):
        ViTConfig(window=window)


def test_valid_windows_are_accepted():
    assert ViTConfig(window=0).window == 0
    assert ViTConfig(window=1).window == 1
    assert ViTConfig(window=3).window == 3
