"""vitlab: a Vision Transformer whose every step can be recorded, for learning how ViTs work."""

from . import interop
from .attention import Attention, local_window_mask
from .blocks import MLP, Block, DropPath
from .config import ViTConfig
from .embeddings import ClsToken, PositionEmbedding, resample_pos_embed, sincos_2d
from .explain import attention_rollout, mean_attention_distance, position_embedding_similarity
from .flat_adamw import FlatAdamW
from .model import ViT
from .patches import PatchEmbed, patchify, unpatchify
from .record import Recording, record
from .toy import AttnGANWordAttention, SAGANSelfAttention

__version__ = "0.1.0"

__all__ = [
    "Attention", "AttnGANWordAttention", "Block", "ClsToken", "DropPath", "FlatAdamW", "MLP", "PatchEmbed",
    "PositionEmbedding", "Recording", "SAGANSelfAttention", "ViT", "ViTConfig", "attention_rollout",
    "local_window_mask", "mean_attention_distance", "patchify", "position_embedding_similarity", "record",
    "resample_pos_embed", "sincos_2d", "unpatchify",
]
