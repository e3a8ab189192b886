"""Bring a timm, torchvision or Hugging Face ViT into vitlab, weights and all, to look inside it.

    vit = from_timm(timm_model)                 # also from_torchvision, from_huggingface
    with vitlab.record(vit) as rec:
        logits = vit(images)                    # the peer's logits, now with rec.attentions

The three libraries build the same network under different names. Converting one takes three steps:

1. a table per library maps each vitlab weight name to the peer's (a tuple of peer names is
   concatenated, as Hugging Face's separate q, k, v Linears become vitlab's one qkv);
2. a ``ViTConfig`` is read off the peer model, with a ValueError for any feature vitlab cannot
   represent (LayerScale, register tokens, qk-norm, a projection without bias, ...): converting it
   anyway would give other logits;
3. a fresh ``ViT`` loads the renamed weights with ``strict=True``, so no weight is left behind or
   left random, and a wrong shape names its key. Weights left over or missing are named by the
   feature they belong to where it is recognisable (``KNOWN_EXTRA_WEIGHTS``,
   ``KNOWN_MISSING_WEIGHTS``), and listed key by key only where it is not.

``from_state_dict`` converts a bare state dict (a checkpoint file), reading what it can of the
config off the weight shapes.

The peers are optional dependencies; each is imported only when its converter is called.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..model.config import ViTConfig, check_choice
from ..model.vit import ViT

SOURCES = ("timm", "torchvision", "huggingface")


# --- Step 1: the name tables -------------------------------------------------------------------
# vitlab name -> peer name. A module's name stands for both its .weight and its .bias;
# "{i}" is a block index; a tuple of names is concatenated along dim 0 (out-features).


def _timm_names(final_norm: str = "tokens") -> dict:
    """vitlab name -> timm name: timm's VisionTransformer uses the same layout as vitlab. timm calls the
    final LayerNorm ``fc_norm`` where it acts after pooling (vitlab's final_norm="pooled")."""
    return {
        "patch_embed.proj": "patch_embed.proj",
        "cls_token.weight": "cls_token",
        "pos_embed.weight": "pos_embed",
        "blocks.{i}.norm1": "blocks.{i}.norm1",
        "blocks.{i}.attn.qkv": "blocks.{i}.attn.qkv",
        "blocks.{i}.attn.proj": "blocks.{i}.attn.proj",
        "blocks.{i}.norm2": "blocks.{i}.norm2",
        "blocks.{i}.mlp.fc1": "blocks.{i}.mlp.fc1",
        "blocks.{i}.mlp.fc2": "blocks.{i}.mlp.fc2",
        "norm": "fc_norm" if final_norm == "pooled" else "norm",
        "head": "head",
    }


def _torchvision_names() -> dict:
    """vitlab name -> torchvision name; attention is an nn.MultiheadAttention with q, k, v in one in_proj."""
    layer = "encoder.layers.encoder_layer_{i}"
    return {
        "patch_embed.proj": "conv_proj",
        "cls_token.weight": "class_token",
        "pos_embed.weight": "encoder.pos_embedding",
        "blocks.{i}.norm1": f"{layer}.ln_1",
        "blocks.{i}.attn.qkv.weight": f"{layer}.self_attention.in_proj_weight",
        "blocks.{i}.attn.qkv.bias": f"{layer}.self_attention.in_proj_bias",
        "blocks.{i}.attn.proj": f"{layer}.self_attention.out_proj",
        "blocks.{i}.norm2": f"{layer}.ln_2",
        "blocks.{i}.mlp.fc1": f"{layer}.mlp.0",  # mlp = Linear, GELU, Dropout, Linear, Dropout
        "blocks.{i}.mlp.fc2": f"{layer}.mlp.3",
        "norm": "encoder.ln",
        "head": "heads.head",
    }


def _huggingface_names() -> dict:
    """vitlab name -> Hugging Face ViTForImageClassification name; q, k and v are three Linears."""
    layer = "vit.layers.{i}"
    return {
        "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
        "cls_token.weight": "vit.embeddings.cls_token",
        "pos_embed.weight": "vit.embeddings.position_embeddings",
        "blocks.{i}.norm1": f"{layer}.layernorm_before",
        "blocks.{i}.attn.qkv": (f"{layer}.attention.q_proj", f"{layer}.attention.k_proj", f"{layer}.attention.v_proj"),
        "blocks.{i}.attn.proj": f"{layer}.attention.o_proj",
        "blocks.{i}.norm2": f"{layer}.layernorm_after",
        "blocks.{i}.mlp.fc1": f"{layer}.mlp.fc1",
        "blocks.{i}.mlp.fc2": f"{layer}.mlp.fc2",
        "norm": "vit.layernorm",
        "head": "classifier",
    }


def _names(source: str, final_norm: str = "tokens") -> dict:
    """The name table of ``source`` for a model whose final norm sits at ``final_norm`` (timm names it by place)."""
    if source == "timm":
        return _timm_names(final_norm)
    return {"torchvision": _torchvision_names, "huggingface": _huggingface_names}[source]()


# The same weights under other names, renamed first (pattern -> replacement, applied in order): the
# names of older releases, and the keys of a Hugging Face ViTModel, which lack ViTForImageClassification's
# "vit." prefix.
_OLD_NAMES = {
    "timm": [],
    "torchvision": [  # MLPBlock before it became a torchvision.ops.MLP
        (r"\.mlp\.linear_1\.", ".mlp.0."),
        (r"\.mlp\.linear_2\.", ".mlp.3."),
    ],
    "huggingface": [
        # a ViTModel (no classifier) holds the encoder of ViTForImageClassification without its "vit." prefix
        (r"^(embeddings|encoder|layers|layernorm|pooler)\.", r"vit.\1."),
        # transformers before the q_proj / k_proj / v_proj layout
        (r"\.encoder\.layer\.(\d+)\.", r".layers.\1."),
        (r"\.attention\.attention\.query\.", ".attention.q_proj."),
        (r"\.attention\.attention\.key\.", ".attention.k_proj."),
        (r"\.attention\.attention\.value\.", ".attention.v_proj."),
        (r"\.attention\.output\.dense\.", ".attention.o_proj."),
        (r"\.intermediate\.dense\.", ".mlp.fc1."),
        (r"\.output\.dense\.", ".mlp.fc2."),
    ],
}

# Peer weights that belong to a feature vitlab has no place for: pattern on the peer key -> the feature.
KNOWN_EXTRA_WEIGHTS = [
    (r"\.ls[12]\.(gamma|weight)$", "LayerScale, a learned gain on each residual branch (timm init_values)"),
    (r"(^|\.)reg_token$", "register tokens (timm reg_tokens)"),
    (r"\.attn\.[qk]_norm\.", "qk-norm, a norm on the queries and the keys (timm qk_norm)"),
    (r"\.attn\.norm\.", "a norm inside the attention (timm scale_attn_norm)"),
    (r"\.mlp\.norm\.", "a norm inside the MLP (timm scale_mlp_norm)"),
    (r"^norm_pre\.", "a norm before the blocks (timm pre_norm=True)"),
    (r"^attn_pool\.", "attention pooling (timm global_pool='map')"),
    (r"\.mlp\.fc1_[gx]\.", "a gated MLP (timm SwiGLU)"),
    (r"pooler\.dense\.", "a pooler, a Linear and tanh on the CLS token (Hugging Face add_pooling_layer=True)"),
    (r"mask_token$", "a mask token (Hugging Face use_mask_token=True)"),
    (r"^heads\.pre_logits\.", "a pre-logits layer (torchvision representation_size)"),
    (r"^conv_proj\.conv_", "a convolutional stem (torchvision conv_stem_configs)"),
]
# vitlab weights that a peer may lack: pattern on the vitlab key -> the feature the peer has instead.
KNOWN_MISSING_WEIGHTS = [
    (r"\.attn\.proj\.bias$", "an attention output projection without bias (timm proj_bias=False)"),
    (r"\.mlp\.fc[12]\.bias$", "an MLP without biases"),
    (r"^patch_embed\.proj\.bias$", "a patch embedding without bias"),
    (r"(^|\.)norm[12]?\.bias$", "LayerNorms without bias"),
    (r"(^|\.)norm[12]?\.weight$", "LayerNorms without a learned gain (elementwise_affine=False)"),
    (r"^cls_token\.weight$", "no class token"),
]


def _features(keys: list[str], table: list[tuple[str, str]]) -> tuple[dict[str, list[str]], list[str]]:
    """keys -> ({feature: its keys}, the keys that belong to no feature of ``table``)."""
    found, unknown = {}, []
    for key in keys:
        feature = next((name for pattern, name in table if re.search(pattern, key)), None)
        if feature is None:
            unknown.append(key)
        else:
            found.setdefault(feature, []).append(key)
    return found, unknown


def _mismatch_message(source: str, missing: list[tuple[str, str]], unexpected: list[str]) -> str:
    """(vitlab key, peer key) pairs with no peer weight, and peer keys with no place -> the error's text:
    every recognised feature by name (one key as an example), then the keys of anything else."""
    lacking, unknown_missing = _features([mine for mine, _ in missing], KNOWN_MISSING_WEIGHTS)
    extra, unknown_extra = _features(unexpected, KNOWN_EXTRA_WEIGHTS)
    peer_name = dict(missing)
    parts = [f"{feature} (e.g. {keys[0]!r}, {len(keys)} weight(s))" for feature, keys in extra.items()]
    parts += [f"{feature} (no {peer_name[keys[0]]!r}, {len(keys)} weight(s))" for feature, keys in lacking.items()]
    text = f"cannot map the {source} weights onto a vitlab ViT"
    if parts:
        text += f": the {source} model uses " + "; ".join(parts) + ", which vitlab does not support"
    if unknown_missing or unknown_extra or not parts:
        keys = f"missing keys {[peer_name[k] for k in unknown_missing]}; unexpected keys {sorted(unknown_extra)}"
        text += ("; other " if parts else ": ") + keys
    return text


# What each library uses when its config says nothing (from_state_dict cannot see it in the weights).
_DEFAULT_EPS = {"timm": 1e-6, "torchvision": 1e-6, "huggingface": 1e-12}


def _source_names(key: str, names: dict) -> tuple[str, ...]:
    """A vitlab key -> the peer key(s) holding it.

    With ``_huggingface_names()``: 'blocks.3.attn.qkv.bias' -> ('vit.layers.3.attention.q_proj.bias',
    'vit.layers.3.attention.k_proj.bias', 'vit.layers.3.attention.v_proj.bias').
    """
    block = re.match(r"blocks\.(\d+)\.(.+)", key)
    index = block.group(1) if block else ""
    template = f"blocks.{{i}}.{block.group(2)}" if block else key
    if template in names:  # a parameter named on its own, e.g. cls_token.weight
        entry, suffix = names[template], ""
    else:  # a module: its .weight or .bias
        module, parameter = template.rsplit(".", 1)
        entry, suffix = names[module], f".{parameter}"
    entries = entry if isinstance(entry, tuple) else (entry,)
    return tuple(e.format(i=index) + suffix for e in entries)


def _rename_old(state_dict: dict, source: str) -> dict:
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in _OLD_NAMES[source]:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


# --- Step 2: reading the config off a peer model ------------------------------------------------


def _require(ok: bool, source: str, uses: str, supported: str) -> None:
    """Raise ValueError naming the peer's feature and value, and what vitlab supports instead."""
    if not ok:
        raise ValueError(f"{source} model uses {uses}; vitlab supports {supported}")


def _require_type(model, cls: type) -> None:
    if not isinstance(model, cls):
        got = type(model)
        raise ValueError(f"expected a {cls.__module__}.{cls.__name__}; got {got.__module__}.{got.__name__}")


def _one(values, source: str, feature: str):
    """The one value that every block (or every LayerNorm) shares; ValueError if they differ."""
    values = set(values)
    _require(len(values) == 1, source, f"{feature}={sorted(values)}", "one value for the whole model")
    return values.pop()


def _side(size) -> int | None:
    """32 or (32, 32) -> 32; a non-square (32, 48) -> None."""
    if isinstance(size, int):
        return size
    if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    return None


def _is_exact_gelu(act: nn.Module) -> bool:
    """Whether ``act`` computes GELU with erf, as vitlab's MLP does (the tanh approximation is off by 5e-4)."""
    x = torch.linspace(-4, 4, 81)
    return torch.allclose(act(x), F.gelu(x), rtol=0, atol=1e-6)


def _name(module: nn.Module) -> str:
    return type(module).__name__


def _submodule(module: nn.Module, path: str) -> nn.Module:
    """module.get_submodule(path), or an nn.Identity where the path does not exist (an older release)."""
    try:
        return module.get_submodule(path)
    except AttributeError:
        return nn.Identity()


def _layer_norm_eps(model: nn.Module, source: str) -> float:
    return _one((m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)), source, "LayerNorm eps")


# Layers of a timm Block that must be nn.Identity -> the timm argument that turns each one on.
_TIMM_EXTRAS_IN_BLOCK = {
    "ls1": "init_values",  # LayerScale: a learned per-channel gain on each residual branch
    "ls2": "init_values",
    "attn.q_norm": "qk_norm",
    "attn.k_norm": "qk_norm",
    "attn.norm": "scale_attn_norm",
    "mlp.norm": "scale_mlp_norm",
}


def _timm_config(model) -> ViTConfig:
    """timm VisionTransformer -> the ViTConfig it matches; ValueError naming a feature vitlab lacks."""
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    _require_type(model, VisionTransformer)
    src = "timm"
    _require(model.cls_token is not None, src, "class_token=False", "a class token")
    _require(model.num_reg_tokens == 0, src, f"reg_tokens={model.num_reg_tokens}", "no register tokens")
    _require(model.num_prefix_tokens == 1, src, f"num_prefix_tokens={model.num_prefix_tokens}",
             "the class token as the only prefix token")
    _require(not model.no_embed_class, src, "no_embed_class=True", "a position embedding for the class token too")
    _require(isinstance(model.norm_pre, nn.Identity), src, "pre_norm=True", "no norm before the blocks")
    pools = {"token": "cls", "avg": "mean"}
    _require(model.global_pool in pools, src, f"global_pool={model.global_pool!r}", "'token' and 'avg'")
    # One final LayerNorm: timm's norm on every token, or its fc_norm on the pooled token (vitlab's final_norm).
    pooled_norm = not isinstance(model.fc_norm, nn.Identity)
    final = model.fc_norm if pooled_norm else model.norm
    _require(isinstance(final, nn.LayerNorm), src,
             f"{'fc_norm' if pooled_norm else 'norm'}={_name(final)} (final_norm=False?)", "a final LayerNorm")
    _require(not pooled_norm or isinstance(model.norm, nn.Identity), src,
             f"norm={_name(model.norm)} and fc_norm={_name(model.fc_norm)}", "one final norm, before or after pooling")
    _require(not model.pool_include_prefix, src, "pool_include_prefix=True", "a mean over the patch tokens only")
    _require(isinstance(model.head, (nn.Linear, nn.Identity)), src, f"head={_name(model.head)}",
             "a Linear head, or none (num_classes=0)")

    embed = model.patch_embed
    _require(type(embed) is PatchEmbed, src, f"embed_layer={_name(embed)}", "PatchEmbed")
    _require(isinstance(embed.norm, nn.Identity), src, f"embed_norm_layer={_name(embed.norm)}", "none")
    image_size, patch_size = _side(embed.img_size), _side(embed.patch_size)
    _require(image_size is not None, src, f"img_size={embed.img_size}", "square images")
    _require(patch_size is not None, src, f"patch_size={embed.patch_size}", "square patches")

    for i, block in enumerate(model.blocks):
        _require(type(block) is Block, src, f"block_fn={_name(block)}", "timm's pre-norm Block")
        for path, argument in _TIMM_EXTRAS_IN_BLOCK.items():
            extra = _submodule(block, path)
            _require(isinstance(extra, nn.Identity), src, f"{argument} (blocks.{i}.{path} is a {_name(extra)})",
                     f"nothing at {path}")
        attn, mlp = block.attn, block.mlp
        _require(type(attn) is Attention, src, f"attn_layer={_name(attn)}", "timm's Attention")
        _require(attn.proj.bias is not None, src, f"proj_bias=False (blocks.{i}.attn.proj has no bias)",
                 "an attention output projection with a bias")
        _require(getattr(attn, "gate", None) is None, src, f"a gated attention in blocks.{i}", "ungated attention")
        _require(attn.head_dim * attn.num_heads == model.embed_dim, src, f"attn_head_dim={attn.head_dim}",
                 f"embed_dim // num_heads = {model.embed_dim // attn.num_heads}")
        _require(type(mlp) is Mlp, src, f"mlp_layer={_name(mlp)}", "timm's Mlp")
        _require(_is_exact_gelu(mlp.act), src, f"act_layer={_name(mlp.act)}", "exact (erf) GELU")
        for name in ("fc1", "fc2"):
            _require(getattr(mlp, name).bias is not None, src, f"an MLP without bias (blocks.{i}.mlp.{name})",
                     "biases in both of the MLP's Linears")
        for norm in (block.norm1, block.norm2):
            _require(isinstance(norm, nn.LayerNorm), src, f"norm_layer={_name(norm)}", "LayerNorm")
    _require(embed.proj.bias is not None, src, "a patch embedding without bias (patch_embed.proj)",
             "a patch embedding with a bias")
    for name, norm in model.named_modules():
        if isinstance(norm, nn.LayerNorm):
            _require(norm.weight is not None and norm.bias is not None, src,
                     f"a LayerNorm without a gain or a bias ({name})", "LayerNorms with both")

    blocks = list(model.blocks)
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=embed.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        dim=model.embed_dim,
        depth=len(blocks),
        heads=_one((b.attn.num_heads for b in blocks), src, "num_heads"),
        mlp_dim=_one((b.mlp.fc1.out_features for b in blocks), src, "mlp hidden features"),
        pool=pools[model.global_pool],
        final_norm="pooled" if pooled_norm else "tokens",
        pos_embed="learned" if model.pos_embed is not None else "none",
        qkv_bias=_one((b.attn.qkv.bias is not None for b in blocks), src, "qkv_bias"),
        layer_norm_eps=_layer_norm_eps(model, src),
    )


def _torchvision_config(model) -> ViTConfig:
    """torchvision VisionTransformer -> the ViTConfig it matches; ValueError naming a feature vitlab lacks."""
    from torchvision.models.vision_transformer import VisionTransformer

    _require_type(model, VisionTransformer)
    src = "torchvision"
    _require(isinstance(model.conv_proj, nn.Conv2d), src, "conv_stem_configs (a convolutional stem)",
             "one Conv2d patch projection (conv_stem_configs=None)")
    _require(model.representation_size is None, src, f"representation_size={model.representation_size}",
             "None (the head right after the class token, no pre_logits Linear + Tanh)")
    layers = list(model.encoder.layers)
    for i, layer in enumerate(layers):
        for norm in (layer.ln_1, layer.ln_2):
            _require(isinstance(norm, nn.LayerNorm), src, f"norm_layer={_name(norm)}", "LayerNorm")
        act = layer.mlp[1]
        _require(_is_exact_gelu(act), src, f"encoder_layer_{i}.mlp.1={act}", "exact (erf) GELU")
    return ViTConfig(
        image_size=model.image_size,
        patch_size=model.patch_size,
        in_channels=model.conv_proj.in_channels,
        num_classes=model.heads.head.out_features,
        dim=model.hidden_dim,
        depth=len(layers),
        heads=_one((layer.self_attention.num_heads for layer in layers), src, "num_heads"),
        mlp_dim=model.mlp_dim,
        pool="cls",
        qkv_bias=_one((layer.self_attention.in_proj_bias is not None for layer in layers), src, "in_proj_bias"),
        layer_norm_eps=_layer_norm_eps(model, src),
    )


def _huggingface_config(model) -> ViTConfig:
    """Hugging Face ViTForImageClassification, or ViTModel without a pooler -> the ViTConfig it matches;
    ValueError naming a feature vitlab lacks."""
    from transformers import ViTForImageClassification, ViTModel

    src = "huggingface"
    headless = isinstance(model, ViTModel)
    if headless:
        _require(model.pooler is None, src,
                 "a pooler (ViTModel's add_pooling_layer=True: Linear and tanh on the CLS token)",
                 "a ViTModel built or loaded with add_pooling_layer=False")
    else:
        _require_type(model, ViTForImageClassification)
    embeddings = model.embeddings if headless else model.vit.embeddings
    _require(getattr(embeddings, "mask_token", None) is None, src, "a mask token (use_mask_token=True)",
             "no mask token")
    c = model.config
    _require(c.hidden_act == "gelu", src, f"hidden_act={c.hidden_act!r}", "'gelu' (exact, erf)")
    image_size, patch_size = _side(c.image_size), _side(c.patch_size)
    _require(image_size is not None, src, f"image_size={c.image_size}", "square images")
    _require(patch_size is not None, src, f"patch_size={c.patch_size}", "square patches")
    _require(headless or isinstance(model.classifier, nn.Linear), src, f"num_labels={c.num_labels}",
             "a Linear classifier")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    _require(head_dim * c.num_attention_heads == c.hidden_size, src, f"head_dim={head_dim}",
             f"hidden_size // num_attention_heads = {c.hidden_size // c.num_attention_heads}")
    return ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        in_channels=c.num_channels,
        num_classes=0 if headless else model.classifier.out_features,
        dim=c.hidden_size,
        depth=c.num_hidden_layers,
        heads=c.num_attention_heads,
        mlp_dim=c.intermediate_size,
        pool="cls",  # ViTForImageClassification classifies token 0 of the final layernorm's output
        qkv_bias=c.qkv_bias,
        layer_norm_eps=_layer_norm_eps(model, src),
    )


# --- Step 3: the shared loader ------------------------------------------------------------------


@torch.no_grad()
def _convert(state_dict: dict, source: str, config: ViTConfig) -> ViT:
    """Peer state dict + ViTConfig -> vitlab ViT (eval mode, float32, CPU) holding those weights.

    Raises ValueError naming every feature that the missing or unexpected peer keys reveal (and the
    keys of anything unrecognised), or the first key whose shape does not fit ``config``.
    """
    state_dict = _rename_old(state_dict, source)
    names = _names(source, config.final_norm)
    vit = ViT(replace(config, patch_embed="conv"))  # every peer stores a Conv2d patch weight (D, C, P, P)
    targets = vit.state_dict()
    sources = {key: _source_names(key, names) for key in targets}
    # Missing and unexpected keys first: a feature they reveal (register tokens) may also change a shape.
    missing = [(key, name) for key, peer in sources.items() for name in peer if name not in state_dict]
    unexpected = sorted(set(state_dict) - {name for peer in sources.values() for name in peer})
    if missing or unexpected:
        raise ValueError(_mismatch_message(source, missing, unexpected))
    weights = {}
    for key, target in targets.items():
        parts = [state_dict[s] for s in sources[key]]
        part_shape = (target.shape[0] // len(parts), *target.shape[1:])  # q, k and v each hold a third
        for name, part in zip(sources[key], parts):
            if tuple(part.shape) != part_shape:
                raise ValueError(
                    f"{source} weight {name!r} (vitlab's {key}) has the wrong shape: expected {part_shape}; "
                    f"got {tuple(part.shape)}"
                )
        weights[key] = torch.cat(parts) if len(parts) > 1 else parts[0]
    vit.load_state_dict(weights, strict=True)
    return vit.eval()


def _config_from_weights(state_dict: dict, source: str, overrides: dict) -> ViTConfig:
    """Peer state dict -> ViTConfig, reading sizes off the weight shapes; ``overrides`` supplies the rest.

    The number of heads is not in any weight's shape, so ``heads`` must be among the overrides.
    """
    if "heads" not in overrides:
        raise ValueError(
            "the number of attention heads cannot be read off the weights: pass heads=... (e.g. 12 for ViT-B/16) "
            "or a full config"
        )
    state_dict = _rename_old(state_dict, source)
    pooled_norm = source == "timm" and "fc_norm.weight" in state_dict  # timm's norm after pooling
    final_norm = overrides.get("final_norm", "pooled" if pooled_norm else "tokens")
    names = _names(source, final_norm)

    def shape(key: str) -> tuple[int, ...]:  # the shape of vitlab's `key`, from the peer weight(s) holding it
        sources = _source_names(key, names)
        for name in sources:
            if name not in state_dict:
                raise ValueError(f"cannot read the config off the {source} weights: no key {name!r} (vitlab's {key})")
        first = tuple(state_dict[sources[0]].shape)
        return (first[0] * len(sources), *first[1:])

    patch_weight = shape("patch_embed.proj.weight")
    if len(patch_weight) != 4:
        raise ValueError(f"expected a Conv2d patch weight of shape (D, C, P, P); got {patch_weight}")
    dim, in_channels, patch_size, _ = patch_weight
    tokens = shape("pos_embed.weight")[1]  # (1, 1+G*G, D)
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1:
        raise ValueError(f"{source} position embeddings hold {tokens} tokens; expected 1 + a square number")
    depth = 0
    while _source_names(f"blocks.{depth}.norm1.weight", names)[0] in state_dict:
        depth += 1
    headless = _source_names("head.weight", names)[0] not in state_dict  # a feature extractor (timm num_classes=0)
    values = dict(
        image_size=grid * patch_size,
        patch_size=patch_size,
        in_channels=in_channels,
        num_classes=0 if headless else shape("head.weight")[0],
        final_norm=final_norm,
        dim=dim,
        depth=depth,
        mlp_dim=shape("blocks.0.mlp.fc1.weight")[0],
        qkv_bias=all(k in state_dict for k in _source_names("blocks.0.attn.qkv.bias", names)),
        layer_norm_eps=_DEFAULT_EPS[source],
    )
    return ViTConfig(**{**values, **overrides})


# --- The public converters ----------------------------------------------------------------------


def from_timm(model: nn.Module) -> ViT:
    """timm VisionTransformer -> vitlab ViT with the same weights and config (eval mode, float32, CPU).

    Supported: the standard ViT (class token, learned or no position embeddings, global_pool 'token' or
    'avg', the final LayerNorm before pooling or after it (fc_norm), a Linear head or none (num_classes=0,
    a feature extractor)). Anything else (LayerScale, qk_norm, registers, ...) raises ValueError naming it.
    """
    return _convert(model.state_dict(), "timm", _timm_config(model))


def from_torchvision(model: nn.Module) -> ViT:
    """torchvision VisionTransformer -> vitlab ViT with the same weights and config (eval mode, float32, CPU).

    Raises ValueError for a conv stem (conv_stem_configs) or a pre-logits layer (representation_size).
    """
    return _convert(model.state_dict(), "torchvision", _torchvision_config(model))


def from_huggingface(model: nn.Module) -> ViT:
    """Hugging Face ViTForImageClassification -> vitlab ViT with the same weights and config (eval mode, float32, CPU).

    A ViTModel (the encoder without a classifier) built with ``add_pooling_layer=False`` becomes a model
    without a head (num_classes=0), whose output is ``last_hidden_state[:, 0]``. Raises ValueError for a
    hidden_act other than exact 'gelu', non-square images or patches, or a ViTModel with a pooler.
    """
    return _convert(model.state_dict(), "huggingface", _huggingface_config(model))


def from_state_dict(state_dict: dict, source: str, config: ViTConfig | None = None, **overrides) -> ViT:
    """Peer state dict (timm, torchvision or Hugging Face keys) -> vitlab ViT holding those weights.

    ``config=None`` reads the sizes off the weight shapes and takes the rest from ``overrides``:
    ``heads`` is required (no weight shape holds it); ``layer_norm_eps`` defaults to the library's
    (1e-6 timm and torchvision, 1e-12 Hugging Face) and ``pool`` to "cls"; timm weights without a head
    give num_classes=0, and timm's fc_norm final_norm="pooled". With a config, ``overrides``
    replace its fields. Checkpoints saved by older releases of torchvision and transformers, with older
    key names, are accepted. Raises ValueError naming the missing, unexpected or mis-shaped keys.
    """
    check_choice("source", source, SOURCES)
    if config is None:
        config = _config_from_weights(state_dict, source, overrides)
    elif overrides:
        config = replace(config, **overrides)
    return _convert(state_dict, source, config)
