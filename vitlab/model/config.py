"""The ViT's hyper-parameters in one dataclass, validated on construction.

Shape legend used throughout vitlab: B batch, C channels, H/W height/width,
P patch size, N tokens, D model dim, h heads, d head dim, L layers.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

POOLS = ("cls", "mean")
POS_EMBEDS = ("learned", "sincos", "none")
NORMS = ("pre", "post")
FINAL_NORMS = ("tokens", "pooled")
PATCH_EMBEDS = ("conv", "linear")
ATTN_IMPLS = ("auto", "fused", "explicit")

# Up to this many tokens "auto" runs the explicit attention, above it F.scaled_dot_product_attention.
# On a 2-core CPU the explicit path took 0.55x the fused one's time at 17 tokens, 0.85x at 101, and
# 1.89x at 197, where the fused one gains by never forming the (N, N) probabilities
# (benchmarks/attention_crossover.py, figures in benchmarks/README.md).
EXPLICIT_ATTENTION_MAX_TOKENS = 128


def check_choice(name: str, value, allowed) -> None:
    """Raise ValueError naming ``name``, the ``allowed`` values and the one given, unless ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")


def describe_range(integer: bool = False, low=None, high=None, low_open: bool = False, high_open: bool = False) -> str:
    """The accepted numbers in words: "an int >= 1", "a number in [0, 1)", "a finite number > 0", ..."""
    kind = "an int" if integer else ("a number" if low is not None and high is not None else "a finite number")
    if low is not None and high is not None:
        return f"{kind} in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {high}"
    return kind


def in_range(value, integer: bool = False, low=None, high=None, low_open: bool = False,
             high_open: bool = False) -> bool:
    """Whether ``value`` is a number of the kind (an int, or any finite real; never a bool) between the bounds."""
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value):
        return False
    if low is not None and (value <= low if low_open else value < low):
        return False
    return high is None or (value < high if high_open else value <= high)


def check_range(name: str, value, integer: bool = False, low=None, high=None, low_open: bool = False,
                high_open: bool = False, none: str | None = None) -> None:
    """Raise ValueError naming ``name``, the accepted range and the value received, unless ``value`` is in it.

    ``integer``: an int (a bool is not one); else any finite real number. ``low`` / ``high``: the bounds,
    excluded with ``low_open`` / ``high_open``. ``none``: None is accepted too, and means this (e.g. "no clipping").
    """
    if value is None and none is not None:
        return
    if not in_range(value, integer, low, high, low_open, high_open):
        accepted = describe_range(integer, low, high, low_open, high_open)
        if none is not None:
            accepted += f", or None ({none})"
        raise ValueError(f"{name} must be {accepted}; got {value!r}")


def check_bool(name: str, value) -> None:
    """Raise ValueError naming ``name`` and the value received unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool (True or False); got {value!r}")


@dataclass
class ViTConfig:
    """Everything that defines a vitlab ViT. The defaults are an MNIST-sized model.

    Each field's comment gives its accepted values; any other value raises ValueError on construction,
    naming the field, the accepted values and the value received.
    """

    image_size: int = 28  # side of the square input image, in pixels; an int >= 1
    patch_size: int = 7  # side of a square patch; an int >= 1 that divides image_size
    in_channels: int = 1  # C: 1 for MNIST, 3 for RGB photos; an int >= 1
    num_classes: int = 10  # size of the head's output, an int >= 0; 0: no head, the model returns (B, D) features
    dim: int = 64  # D: width of every token; an int >= 1, a multiple of heads (of 4 too with sincos positions)
    depth: int = 6  # L: number of encoder blocks; an int >= 1
    heads: int = 4  # h: attention heads; an int >= 1 that divides dim, d = dim // heads
    mlp_dim: int = 128  # hidden width of each block's MLP; an int >= 1
    pool: str = "cls"  # "cls": the CLS token's output; "mean": mean of the patch tokens
    pos_embed: str = "learned"  # "learned" | "sincos" (2-D, fixed) | "none"
    norm: str = "pre"  # "pre": ViT block (norm inside the residual); "post": original Transformer
    final_norm: str = "tokens"  # "tokens": the last LayerNorm acts on each token; "pooled": on the pooled one (fc_norm)
    patch_embed: str = "linear"  # "linear": Linear on flattened patches | "conv": Conv2d(k=s=P); same function
    dropout: float = 0.0  # dropout on embeddings, attention output and MLP; a number in [0, 1)
    attn_dropout: float = 0.0  # dropout on the attention probabilities; a number in [0, 1)
    drop_path: float = 0.0  # stochastic depth rate of the last block (0 at the first, linear between); in [0, 1)
    qkv_bias: bool = True  # bias in the fused q, k, v projection; True or False
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon, a finite number > 0 (timm, torchvision 1e-6; Hugging Face 1e-12)
    window: int = 0  # k > 0: each patch attends to its k x k neighbourhood only (k odd); 0: full attention
    attn_impl: str = "auto"  # "explicit" | "fused" (F.scaled_dot_product_attention) | "auto" (see fused_attention)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "dim", "depth", "heads", "mlp_dim"):
            value = getattr(self, name)
            if not in_range(value, integer=True, low=1):
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not in_range(self.num_classes, integer=True, low=0):
            raise ValueError(f"num_classes must be an int >= 0 (0: no head); got {self.num_classes!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size must be divisible by patch_size: got image_size={self.image_size}, "
                f"patch_size={self.patch_size} (remainder {self.image_size % self.patch_size})"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads: got dim={self.dim}, heads={self.heads}")
        check_choice("pool", self.pool, POOLS)
        check_choice("pos_embed", self.pos_embed, POS_EMBEDS)
        check_choice("norm", self.norm, NORMS)
        check_choice("final_norm", self.final_norm, FINAL_NORMS)
        if self.final_norm == "pooled" and self.norm == "post":
            raise ValueError(
                "final_norm='pooled' needs norm='pre' (a post-norm model has no final norm); got norm='post'"
            )
        check_choice("patch_embed", self.patch_embed, PATCH_EMBEDS)
        check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        if self.pos_embed == "sincos" and self.dim % 4:
            raise ValueError(f"sincos position embeddings need dim divisible by 4; got dim={self.dim}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            check_range(name, getattr(self, name), low=0, high=1, high_open=True)
        check_bool("qkv_bias", self.qkv_bias)
        check_range("layer_norm_eps", self.layer_norm_eps, low=0, low_open=True)
        if not in_range(self.window, integer=True, low=0) or (self.window and self.window % 2 == 0):
            raise ValueError(f"window must be 0 (full attention) or an odd k >= 1; got {self.window!r}")

    @property
    def grid_size(self) -> int:
        """Patches along each side: image_size // patch_size."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        """N: the patches plus the CLS token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def fused_attention(self) -> bool:
        """Whether attention runs on the fused path (``F.scaled_dot_product_attention``) by default.

        "explicit" and "fused" say so; "auto" picks the fused path only above
        ``EXPLICIT_ATTENTION_MAX_TOKENS`` tokens. It depends on the config alone, never on what is
        installed: the default MNIST model (17 tokens) runs the explicit path, a ViT-B/16 at 224 pixels
        (197 tokens) the fused path. ``vitlab.record`` switches every
        attention to the explicit path while it records, whatever this says."""
        if self.attn_impl == "auto":
            return self.num_tokens > EXPLICIT_ATTENTION_MAX_TOKENS
        return self.attn_impl == "fused"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ViTConfig":
        """Build a config from a dict, naming any key that is not a field."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)
