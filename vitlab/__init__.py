"""vitlab: a Vision Transformer whose every step can be recorded, for learning how ViTs work."""

from .attention import Attention, local_window_mask
from .blocks import MLP, Block, DropPath
from .config import ViTConfig
from .embeddings import ClsToken, PositionEmbedding, resample_pos_embed, sincos_2d
from .model import ViT
from .patches import PatchEmbed, patchify, unpatchify
from .record import Recording, record

__version__ = "0.1.0"

__all__ = [
    "Attention", "Block", "ClsToken", "DropPath", "MLP", "PatchEmbed", "PositionEmbedding", "Recording", "ViT",
    "ViTConfig", "local_window_mask", "patchify", "record", "resample_pos_embed", "sincos_2d", "unpatchify",
]
