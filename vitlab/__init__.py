"""vitlab: a Vision Transformer whose every step can be recorded, for learning how ViTs work.

The package, in the order a learner meets it: ``vitlab.model`` (the ViT's pieces), ``vitlab.inside``
(recording, explaining, converting other ViTs), ``vitlab.training`` (data, the loop, checkpoints, the
command lines) and ``vitlab.lab`` (the notebooks' plots and widgets). Lower layers never import higher ones.
"""

from .inside import interop
from .inside.explain import attention_rollout, mean_attention_distance, position_embedding_similarity
from .inside.record import Recording, record
from .model import (
    MLP,
    Attention,
    AttnGANWordAttention,
    Block,
    ClsToken,
    DropPath,
    PatchEmbed,
    PositionEmbedding,
    SAGANSelfAttention,
    ViT,
    ViTConfig,
    local_window_mask,
    patchify,
    resample_pos_embed,
    sincos_2d,
    unpatchify,
)
from .training.pretrained import load_pretrained_mnist

__version__ = "0.1.0"

__all__ = [
    "MLP", "Attention", "AttnGANWordAttention", "Block", "ClsToken", "DropPath", "PatchEmbed", "PositionEmbedding",
    "Recording", "SAGANSelfAttention", "ViT", "ViTConfig", "attention_rollout", "interop", "load_pretrained_mnist",
    "local_window_mask", "mean_attention_distance", "patchify", "position_embedding_similarity", "record",
    "resample_pos_embed", "sincos_2d", "unpatchify",
]
