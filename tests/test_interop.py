"""Converting timm, torchvision and Hugging Face ViTs: the same logits, the inferred config, and named errors."""

import re
from functools import partial

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import vitlab
from vitlab import ViTConfig
from vitlab.inside.interop import from_huggingface, from_state_dict, from_timm, from_torchvision


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, LayerNorm scales around 1; returns the model in eval mode.

    The peers' own inits leave LayerNorms at 1 and 0 (a swapped scale and shift would go unseen), and
    torchvision zeroes its head and class token (every logit would be 0, whatever the conversion did).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                p.copy_(1 + 0.2 * noise if isinstance(module, nn.LayerNorm) and name == "weight" else 0.1 * noise)
    return model.eval()


def timm_vit(**kwargs) -> nn.Module:
    module = pytest.importorskip("timm.models.vision_transformer")
    args = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2)
    return randomise(module.VisionTransformer(**{**args, **kwargs}))


def torchvision_vit(**kwargs) -> nn.Module:
    module = pytest.importorskip("torchvision.models.vision_transformer")
    args = dict(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)
    return randomise(module.VisionTransformer(**{**args, **kwargs}))


def huggingface_config(**kwargs):
    transformers = pytest.importorskip("transformers")
    args = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=128, num_labels=10)
    return transformers.ViTConfig(**{**args, **kwargs})


def huggingface_vit(**kwargs) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return randomise(transformers.ViTForImageClassification(huggingface_config(**kwargs)))


PEERS = {
    "timm": (timm_vit, from_timm),
    "torchvision": (torchvision_vit, from_torchvision),
    "huggingface": (huggingface_vit, from_huggingface),
}
EPS = {"timm": 1e-6, "torchvision": 1e-6, "huggingface": 1e-12}
SMALL = dict(image_size=32, patch_size=8, in_channels=3, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128)


def images(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return getattr(out, "logits", out)  # Hugging Face returns an ImageClassifierOutput


def assert_same_logits(peer: nn.Module, vit: vitlab.ViT, x: torch.Tensor) -> None:
    expected = logits_of(peer, x)
    assert expected.std() > 0.1  # a real signal: a zero head or lost weights could not pass by accident
    assert_close(logits_of(vit, x), expected, atol=1e-5, rtol=1e-5)


# --- the three peers -----------------------------------------------------------------------------


@pytest.mark.parametrize("source", PEERS)
def test_converted_model_gives_the_peers_logits_and_config(source):
    build, convert = PEERS[source]
    peer = build()
    vit = convert(peer)
    assert isinstance(vit, vitlab.ViT)
    assert not vit.training
    assert vit.config == ViTConfig(**SMALL, pool="cls", pos_embed="learned", qkv_bias=True, layer_norm_eps=EPS[source],
                                   patch_embed="conv")
    assert_same_logits(peer, vit, images())


@pytest.mark.parametrize("source", PEERS)
def test_record_works_on_a_converted_model(source):
    build, convert = PEERS[source]
    peer = build()
    vit = convert(peer)
    x = images()
    with vitlab.record(vit) as rec:
        logits = vit(x)
    assert rec.attentions.shape == (2, 2, 4, 17, 17)  # (B, L, h, N, N)
    assert_close(rec.attentions.sum(-1), torch.ones(2, 2, 4, 17))
    assert torch.equal(rec.logits, logits.detach())
    assert_close(logits.detach(), logits_of(peer, x), atol=1e-5, rtol=1e-5)


def test_the_converted_model_owns_its_weights():
    peer = timm_vit()
    vit = from_timm(peer)
    before = logits_of(vit, images())
    with torch.no_grad():
        peer.head.weight.add_(1.0)
    assert torch.equal(logits_of(vit, images()), before)


# --- timm ----------------------------------------------------------------------------------------


def test_timm_one_channel_mnist_sized():
    peer = timm_vit(img_size=28, patch_size=7, in_chans=1)
    vit = from_timm(peer)
    assert (vit.config.image_size, vit.config.patch_size, vit.config.in_channels) == (28, 7, 1)
    assert vit.config.num_tokens == 17
    assert_same_logits(peer, vit, images(channels=1, size=28))


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        (dict(global_pool="avg", fc_norm=False), "pool", "mean"),  # norm every token, then mean: vitlab's "mean"
        (dict(global_pool="avg"), "final_norm", "pooled"),  # timm's default for 'avg': mean, then fc_norm
        (dict(fc_norm=True), "final_norm", "pooled"),  # the CLS token, then fc_norm
        (dict(num_classes=0), "num_classes", 0),  # a feature extractor: the pooled (B, D) features
        (dict(num_classes=0, global_pool="avg"), "num_classes", 0),
        (dict(pos_embed="none"), "pos_embed", "none"),
        (dict(qkv_bias=False), "qkv_bias", False),
        (dict(norm_layer=partial(nn.LayerNorm, eps=1e-5)), "layer_norm_eps", 1e-5),
    ],
)
def test_timm_variants_vitlab_can_represent(kwargs, field, value):
    peer = timm_vit(**kwargs)
    vit = from_timm(peer)
    assert getattr(vit.config, field) == value
    assert_same_logits(peer, vit, images())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_pool="map"), "global_pool='map'"),
        (dict(global_pool="max", fc_norm=False), "global_pool='max'"),
        (dict(init_values=1e-5), "init_values (blocks.0.ls1 is a LayerScale)"),
        (dict(qk_norm=True), "qk_norm (blocks.0.attn.q_norm is a LayerNorm)"),
        (dict(reg_tokens=4), "reg_tokens=4"),
        (dict(class_token=False, global_pool="avg", fc_norm=False), "class_token=False"),
        (dict(no_embed_class=True), "no_embed_class=True"),
        (dict(pre_norm=True), "pre_norm=True"),
        (dict(img_size=(32, 48)), "img_size=(32, 48)"),
        (dict(act_layer="gelu_tanh"), "act_layer=GELUTanh"),
        (dict(final_norm=False), "norm=Identity"),
        (dict(proj_bias=False), "proj_bias=False (blocks.0.attn.proj has no bias)"),
        (dict(norm_layer=partial(nn.LayerNorm, bias=False)), "a LayerNorm without a gain or a bias (blocks.0.norm1)"),
        (dict(scale_attn_norm=True), "scale_attn_norm (blocks.0.attn.norm is a LayerNorm)"),
    ],
)
def test_timm_feature_vitlab_lacks_is_named(kwargs, message):
    peer = timm_vit(**kwargs)
    with pytest.raises(ValueError, match=re.escape(f"timm model uses {message}")):
        from_timm(peer)


def test_timm_layer_norms_with_different_eps_are_named():
    peer = timm_vit()
    peer.blocks[1].norm2.eps = 1e-5
    with pytest.raises(ValueError, match=re.escape("timm model uses LayerNorm eps=[1e-06, 1e-05]")):
        from_timm(peer)


def test_timm_swiglu_mlp_is_named():
    layers = pytest.importorskip("timm.layers")
    with pytest.raises(ValueError, match=re.escape("timm model uses mlp_layer=SwiGLU; vitlab supports timm's Mlp")):
        from_timm(timm_vit(mlp_layer=layers.SwiGLU))


def test_a_peer_of_the_wrong_library_is_named():
    expected = "expected a {}.models.vision_transformer.VisionTransformer; got {}"
    with pytest.raises(ValueError, match=expected.format("timm", "torchvision")):
        from_timm(torchvision_vit())
    with pytest.raises(ValueError, match=expected.format("torchvision", "timm")):
        from_torchvision(timm_vit())


# --- torchvision ---------------------------------------------------------------------------------


def test_torchvision_one_channel_conv_proj_and_other_eps():
    peer = torchvision_vit(norm_layer=partial(nn.LayerNorm, eps=1e-5))
    peer.conv_proj = nn.Conv2d(1, 64, kernel_size=8, stride=8)  # torchvision hard-codes 3 channels
    randomise(peer)
    vit = from_torchvision(peer)
    assert (vit.config.in_channels, vit.config.layer_norm_eps) == (1, 1e-5)
    assert_same_logits(peer, vit, images(channels=1))


def test_torchvision_features_vitlab_lacks_are_named():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    with pytest.raises(ValueError, match=re.escape("torchvision model uses representation_size=32")):
        from_torchvision(torchvision_vit(representation_size=32))
    stem = [tv.ConvStemConfig(out_channels=16, kernel_size=3, stride=8)]
    with pytest.raises(ValueError, match=r"torchvision model uses conv_stem_configs \(a convolutional stem\)"):
        from_torchvision(torchvision_vit(conv_stem_configs=stem))
    peer = torchvision_vit()
    peer.encoder.layers[1].mlp[1] = nn.GELU(approximate="tanh")
    message = "torchvision model uses encoder_layer_1.mlp.1=GELU(approximate='tanh'); vitlab supports exact (erf) GELU"
    with pytest.raises(ValueError, match=re.escape(message)):
        from_torchvision(peer)


# --- Hugging Face --------------------------------------------------------------------------------


def test_huggingface_without_qkv_bias():
    peer = huggingface_vit(qkv_bias=False)
    vit = from_huggingface(peer)
    assert vit.config.qkv_bias is False
    assert vit.blocks[0].attn.qkv.bias is None
    assert_same_logits(peer, vit, images())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_act="gelu_new"), "hidden_act='gelu_new'"),
        (dict(image_size=(32, 48)), "image_size=(32, 48)"),
        (dict(patch_size=(8, 4)), "patch_size=(8, 4)"),
    ],
)
def test_huggingface_feature_vitlab_lacks_is_named(kwargs, message):
    peer = huggingface_vit(**kwargs)
    with pytest.raises(ValueError, match=re.escape(f"huggingface model uses {message}")):
        from_huggingface(peer)


def huggingface_encoder(add_pooling_layer: bool = False) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    return randomise(transformers.ViTModel(huggingface_config(), add_pooling_layer=add_pooling_layer))


def test_huggingface_vit_model_becomes_a_model_without_a_head():
    peer = huggingface_encoder()
    vit = from_huggingface(peer)
    assert (vit.config.num_classes, vit.config.pool) == (0, "cls")
    x = images()
    with torch.no_grad():
        expected = peer(x).last_hidden_state[:, 0]  # the CLS token of the final layernorm's output
    assert expected.std() > 0.1
    assert_close(vit(x), expected, atol=1e-5, rtol=1e-5)
    from_keys = from_state_dict(peer.state_dict(), "huggingface", heads=4)  # keys without the "vit." prefix
    assert from_keys.config == vit.config
    assert_close(from_keys(x), expected, atol=1e-5, rtol=1e-5)


def test_huggingface_vit_model_with_a_pooler_is_refused():
    pooler = "huggingface model uses a pooler (ViTModel's add_pooling_layer=True"
    with pytest.raises(ValueError, match=re.escape(pooler)):
        from_huggingface(huggingface_encoder(add_pooling_layer=True))
    named = "the huggingface model uses a pooler, a Linear and tanh on the CLS token (Hugging Face add_pooling_layer"
    with pytest.raises(ValueError, match=re.escape(named)) as info:
        from_state_dict(huggingface_encoder(add_pooling_layer=True).state_dict(), "huggingface", heads=4)
    assert "unexpected keys" not in str(info.value)  # a recognised feature is named, not listed key by key


# --- from_state_dict ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", PEERS)
def test_from_state_dict_reads_the_config_off_the_weights(source):
    build, convert = PEERS[source]
    peer = build()
    vit = from_state_dict(peer.state_dict(), source, heads=4)
    assert vit.config == convert(peer).config
    assert_same_logits(peer, vit, images())


@pytest.mark.parametrize("kwargs", [dict(global_pool="avg"), dict(num_classes=0), dict(num_classes=0, fc_norm=True)])
def test_from_state_dict_reads_timm_fc_norm_and_a_missing_head_off_the_weights(kwargs):
    peer = timm_vit(**kwargs)
    vit = from_state_dict(peer.state_dict(), "timm", heads=4, pool="mean" if "global_pool" in kwargs else "cls")
    assert vit.config == from_timm(peer).config
    assert_same_logits(peer, vit, images())


def test_timm_with_both_a_norm_and_an_fc_norm_is_named():
    peer = timm_vit(fc_norm=True)
    peer.norm = nn.LayerNorm(64, eps=1e-6)
    with pytest.raises(ValueError, match=re.escape("timm model uses norm=LayerNorm and fc_norm=LayerNorm")):
        from_timm(peer)


def test_from_state_dict_needs_the_heads():
    with pytest.raises(ValueError, match="heads=..."):
        from_state_dict(timm_vit().state_dict(), "timm")


def test_from_state_dict_names_an_unknown_source():
    with pytest.raises(ValueError, match=r"source must be one of \('timm', 'torchvision', 'huggingface'\); got 'jax'"):
        from_state_dict({}, "jax", heads=4)


@pytest.mark.parametrize(
    "source, key",
    [
        ("timm", "blocks.1.mlp.fc2.weight"),
        ("torchvision", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"),
        ("huggingface", "vit.layers.1.attention.k_proj.weight"),
        ("huggingface", "classifier.bias"),
    ],
)
def test_a_missing_key_is_named(source, key):
    build, convert = PEERS[source]
    peer = build()
    weights = peer.state_dict()
    del weights[key]
    with pytest.raises(ValueError, match=re.escape(f"missing keys [{key!r}]; unexpected keys []")):
        from_state_dict(weights, source, convert(peer).config)


def test_an_unexpected_key_is_named():
    peer = timm_vit()
    weights = {**peer.state_dict(), "blocks.0.mystery.weight": torch.ones(64)}
    with pytest.raises(ValueError, match=re.escape("missing keys []; unexpected keys ['blocks.0.mystery.weight']")):
        from_state_dict(weights, "timm", heads=4)


def test_a_recognised_feature_is_named_and_only_the_rest_is_listed_by_key():
    peer = timm_vit(init_values=1e-5)
    weights = {**peer.state_dict(), "blocks.0.mystery.weight": torch.ones(64)}
    with pytest.raises(ValueError) as info:
        from_state_dict(weights, "timm", heads=4)
    message = str(info.value)
    assert "the timm model uses LayerScale, a learned gain on each residual branch (timm init_values) " \
           "(e.g. 'blocks.0.ls1.gamma', 4 weight(s))" in message
    assert message.endswith("; other missing keys []; unexpected keys ['blocks.0.mystery.weight']")
    assert "ls2" not in message  # the feature's keys are not listed one by one


@pytest.mark.parametrize(
    "source, key, shape, expected",
    [
        ("timm", "blocks.0.mlp.fc1.weight", (100, 64), (128, 64)),
        ("timm", "pos_embed", (1, 26, 64), (1, 17, 64)),
        ("huggingface", "vit.layers.0.attention.v_proj.weight", (64, 32), (64, 64)),
        ("torchvision", "encoder.layers.encoder_layer_1.self_attention.in_proj_bias", (64,), (192,)),
    ],
)
def test_a_wrong_shape_is_named_with_both_shapes(source, key, shape, expected):
    build, convert = PEERS[source]
    peer = build()
    weights = {**peer.state_dict(), key: torch.zeros(shape)}
    with pytest.raises(ValueError, match=re.escape(f"{source} weight {key!r}") + r".*" + re.escape(
            f"expected {expected}; got {shape}")):
        from_state_dict(weights, source, convert(peer).config)


def test_old_huggingface_and_torchvision_key_names_are_accepted():
    # transformers 4 saved query/key/value, attention.output.dense, intermediate.dense, output.dense
    # under vit.encoder.layer.{i}; old torchvision saved the MLP as linear_1 / linear_2.
    old_hf = [
        (".layers.", ".encoder.layer."), (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."), (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."), (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    old_tv = [(".mlp.0.", ".mlp.linear_1."), (".mlp.3.", ".mlp.linear_2.")]
    for source, renames in (("huggingface", old_hf), ("torchvision", old_tv)):
        peer = PEERS[source][0]()
        weights = {}
        for key, value in peer.state_dict().items():
            for new, old in renames:
                key = key.replace(new, old)
            weights[key] = value
        assert set(weights) != set(peer.state_dict())  # the renaming did rename
        assert_same_logits(peer, from_state_dict(weights, source, heads=4), images())


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(init_values=1e-5), "LayerScale, a learned gain on each residual branch (timm init_values)"),
        (dict(reg_tokens=4), "register tokens (timm reg_tokens)"),
        (dict(qk_norm=True), "qk-norm, a norm on the queries and the keys (timm qk_norm)"),
        (dict(proj_bias=False), "an attention output projection without bias (timm proj_bias=False) "
                                "(no 'blocks.0.attn.proj.bias', 2 weight(s))"),
        (dict(scale_mlp_norm=True), "a norm inside the MLP (timm scale_mlp_norm)"),
        (dict(global_pool="map"), "attention pooling (timm global_pool='map')"),
    ],
)
def test_from_state_dict_names_the_feature_that_timm_weights_reveal(kwargs, feature):
    weights = timm_vit(**kwargs).state_dict()
    with pytest.raises(ValueError, match=re.escape(f"the timm model uses {feature}")) as info:
        from_state_dict(weights, "timm", ViTConfig(**SMALL, patch_embed="conv", pool="cls"))
    assert "missing keys" not in str(info.value)


def test_huggingface_mask_token_is_named():
    transformers = pytest.importorskip("transformers")
    peer = randomise(transformers.ViTModel(huggingface_config(), add_pooling_layer=False, use_mask_token=True))
    with pytest.raises(ValueError, match=re.escape("huggingface model uses a mask token (use_mask_token=True)")):
        from_huggingface(peer)
    with pytest.raises(ValueError, match=re.escape("a mask token (Hugging Face use_mask_token=True)")):
        from_state_dict(peer.state_dict(), "huggingface", heads=4)
