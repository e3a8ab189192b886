"""The Vision Transformer: patches -> tokens -> encoder blocks -> pooled token -> class logits.

Legend: B batch, C channels, H/W height/width, P patch size, N tokens (1 CLS + patches),
D model dim, L layers.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .attention import local_window_mask
from .blocks import Block
from .config import ViTConfig
from .embeddings import ClsToken, PositionEmbedding
from .patches import PatchEmbed
from .taps import Tap


def _init_weights(model: "ViT") -> None:
    """Every Linear except the patch embedding's: weights from a normal of std 0.02 (truncated at +-2, as
    timm does), biases 0. The patch embedding keeps PyTorch's default init, as in timm and vit-pytorch;
    that default depends only on fan_in = P*P*C, the same for the Conv2d and the Linear form, so both
    forms start alike: with one channel and the same seed, the "conv" and "linear" models are the same
    function."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not model.patch_embed.proj:
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class ViT(nn.Module):
    """(B, C, H, W) -> (B, num_classes); with num_classes=0, (B, D) pooled features.

    ``ViT(config)`` or ``ViT(image_size=..., patch_size=..., ...)`` with ``ViTConfig``'s fields.
    ``forward_features`` stops at the normalised tokens (B, N, D); ``forward_head`` pools and classifies.
    Images must be floats of the weights' dtype, float32 by default: uint8, bool, float64, float16 and
    bfloat16 images are refused with a ValueError saying how to convert them (``check_images``), never cast.
    """

    def __init__(self, config: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = ViTConfig.from_dict(overrides)
        elif not isinstance(config, ViTConfig):
            raise ValueError(f"expected a ViTConfig; got {type(config).__name__}")
        elif overrides:
            config = ViTConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        c = config
        self.input = Tap()  # (B, C, H, W), the images as they came in
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, c.dim, kind=c.patch_embed)  # (B, N-1, D)
        self.cls_token = ClsToken(c.dim)  # (B, N, D)
        self.pos_embed = PositionEmbedding(c.pos_embed, c.grid_size, c.dim)  # (B, N, D)
        self.pos_drop = nn.Dropout(c.dropout)
        # Stochastic depth grows linearly from 0 at the first block to drop_path at the last.
        rates = [c.drop_path * i / (c.depth - 1) for i in range(c.depth)] if c.depth > 1 else [c.drop_path]
        self.blocks = nn.ModuleList(
            Block(
                c.dim, c.heads, c.mlp_dim, norm=c.norm, dropout=c.dropout, attn_dropout=c.attn_dropout,
                drop_path=rate, qkv_bias=c.qkv_bias, eps=c.layer_norm_eps, fused=c.fused_attention,
            )
            for rate in rates
        )
        # A post-norm block already ends in a LayerNorm, so only the pre-norm model needs a final one:
        # on every token (B, N, D), or with final_norm="pooled" on the pooled token (B, D).
        self.norm = nn.LayerNorm(c.dim, eps=c.layer_norm_eps) if c.norm == "pre" else nn.Identity()
        self.pool = Tap()  # (B, D)
        self.head = nn.Linear(c.dim, c.num_classes) if c.num_classes else nn.Identity()  # (B, num_classes) or (B, D)
        self._set_mask()
        _init_weights(self)

    def _set_mask(self) -> None:
        c = self.config
        device = self.cls_token.weight.device  # set_image_size may run after the model has moved
        mask = local_window_mask(c.grid_size, c.window).to(device) if c.window else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError, before any computation, unless images are (B, C, image_size, image_size) floats
        of the weights' dtype (float32 unless the model was converted, e.g. with ``model.double()``).

        Other dtypes are refused, not cast: uint8 pixels would need a scale the model cannot guess
        (``images.float() / 255``, or ``vitlab.training.data.normalize_batch`` for MNIST digits), and a
        silent cast of float64 or float16 images would hide a copy or a loss of precision.
        """
        c = self.config
        expected = f"(B, {c.in_channels}, {c.image_size}, {c.image_size})"
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected images of shape {expected}; got {got}")
        dtype = self.cls_token.weight.dtype
        if images.dtype != dtype:
            to = "images.float()" if dtype == torch.float32 else f"images.to({dtype})"
            if images.is_floating_point() or images.dtype == torch.bool:
                how = f"convert with {to}"
            else:  # pixels as integers, 0..255
                how = (f"convert with {to} / 255 (0..255 pixels to 0..1), or with "
                       "vitlab.training.data.normalize_batch for MNIST digits")
            raise ValueError(f"expected images of dtype {dtype} (the model's weights'); got {images.dtype}: {how}")
        if images.shape[1] != c.in_channels:
            raise ValueError(
                f"expected {c.in_channels} channel(s) (config.in_channels); got {images.shape[1]} in shape "
                f"{tuple(images.shape)}"
            )
        height, width = images.shape[-2:]
        if height % c.patch_size or width % c.patch_size:
            raise ValueError(
                f"image size must be divisible by patch_size={c.patch_size}; got {height}x{width}"
            )
        if (height, width) != (c.image_size, c.image_size):
            hint = f"; call model.set_image_size({height}) first" if height == width else ""
            raise ValueError(
                f"expected {c.image_size}x{c.image_size} images (config.image_size); got {height}x{width}. "
                f"The position embeddings are for a {c.grid_size}x{c.grid_size} grid{hint}"
            )

    def forward_features(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D): the encoder's output tokens, token 0 is CLS; normalised, unless
        ``config.final_norm`` is "pooled" (the norm then acts in ``forward_head``, after pooling)."""
        self.check_images(images)
        mask = self.attn_mask if mask is None else mask
        x = self.patch_embed(self.input(images))  # (B, N-1, D)
        x = self.pos_drop(self.pos_embed(self.cls_token(x)))  # (B, N, D)
        for block in self.blocks:
            x = block(x, mask)  # (B, N, D)
        return x if self.config.final_norm == "pooled" else self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, N, D) -> (B, num_classes), or the pooled (B, D) with ``pre_logits=True`` (and with num_classes=0)."""
        pooled = self.pool(tokens[:, 0] if self.config.pool == "cls" else tokens[:, 1:].mean(dim=1))  # (B, D)
        if self.config.final_norm == "pooled":
            pooled = self.norm(pooled)  # (B, D)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, num_classes) logits; (B, D) features for num_classes=0."""
        return self.forward_head(self.forward_features(images, mask))

    def set_attention(self, fused: bool) -> None:
        """Run every block's attention on the fused (True) or the explicit (False) path."""
        for block in self.blocks:
            block.attn.fused = fused

    def set_image_size(self, image_size: int) -> None:
        """Accept image_size x image_size inputs from now on, resampling the position embeddings
        (bicubic for learned ones, recomputed for sincos; the CLS entry kept). A learned embedding becomes
        a new parameter: build the optimizer after calling this."""
        config = replace(self.config, image_size=image_size)  # validates divisibility
        self.pos_embed.resample(config.grid_size)
        self.config = config
        self._set_mask()
        self.set_attention(config.fused_attention)  # "auto" may pick the other path for the new token count

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
