"""The model's pieces, in the order a learner meets them: config, patches, embeddings (CLS token and
positions), attention, blocks, the ViT itself, and the toy attentions of the seeds (SAGAN, AttnGAN)."""

from .attention import Attention, local_window_mask
from .blocks import MLP, Block, DropPath
from .config import ViTConfig
from .embeddings import ClsToken, PositionEmbedding, resample_pos_embed, sincos_2d
from .patches import PatchEmbed, patchify, unpatchify
from .toy import AttnGANWordAttention, SAGANSelfAttention
from .vit import ViT

__all__ = [
    "MLP", "Attention", "AttnGANWordAttention", "Block", "ClsToken", "DropPath", "PatchEmbed", "PositionEmbedding",
    "SAGANSelfAttention", "ViT", "ViTConfig", "local_window_mask", "patchify", "resample_pos_embed", "sincos_2d",
    "unpatchify",
]
