"""Two attention mechanisms from before the ViT, small enough to check by hand.

``SAGANSelfAttention`` (Zhang et al. 2019, "Self-Attention GANs"): every position of a
feature map attends to every other position of the same map.
``AttnGANWordAttention`` (Xu et al. 2018, "AttnGAN"): every image region attends to the
words of a caption, so each region gets its own mix of word features.

Legend: B batch, C channels, H/W height/width, N = H*W positions, R regions, T words,
Dh region (image-feature) dim, De word dim.
"""

from __future__ import annotations

import torch
from torch import nn


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


class SAGANSelfAttention(nn.Module):
    """(B, C, H, W) -> ((B, C, H, W), (B, N, N)): SAGAN self-attention over the N = H*W positions.

    Three 1x1 convolutions read each position's C-vector: q and k map it to
    ``qk_channels = max(C // reduction, min_qk_channels)`` values, v keeps all C.
    Then, with positions flattened row by row::

        attention[b, i, j] = softmax_j(q_i . k_j)   # each row sums to 1 (softmax over keys)
        o_i = sum_j attention[b, i, j] * v_j
        out = gamma * o + x

    SAGAN uses the raw dot product, with no 1/sqrt(d) scaling as in the Transformer.
    ``gamma`` is a learned scalar that starts at 0, so at initialisation the block returns its
    input exactly and the network learns how much non-local evidence to mix in.

    The paper's C // 8 is 0 for a 3-channel map (the 3-channel 3x3 example), so the width is
    clamped to at least ``min_qk_channels``; pass ``reduction=1`` to keep all 3 channels in q and
    k. As in the common public implementation, v is one C -> C convolution (a later version of
    the paper also narrows v and projects back with another 1x1 convolution).
    """

    def __init__(self, channels: int, reduction: int = 8, min_qk_channels: int = 1) -> None:
        super().__init__()
        _positive_int("channels", channels)
        _positive_int("reduction", reduction)
        _positive_int("min_qk_channels", min_qk_channels)
        self.channels = channels
        self.qk_channels = max(channels // reduction, min_qk_channels)
        self.query = nn.Conv2d(channels, self.qk_channels, kernel_size=1)
        self.key = nn.Conv2d(channels, self.qk_channels, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.attend = nn.Softmax(dim=-1)  # (B, N, N), over the keys j
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> (out (B, C, H, W), attention (B, N, N))."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected a feature map of shape (B, {self.channels}, H, W); got {got}")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"expected {self.channels} channels (the module's `channels`); got {x.shape[1]} in shape "
                f"{tuple(x.shape)}"
            )
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, qk)
        k = self.key(x).flatten(2)  # (B, qk, N)
        v = self.value(x).flatten(2)  # (B, C, N)
        attention = self.attend(q @ k)  # (B, N, N)
        o = (v @ attention.transpose(1, 2)).reshape(B, C, H, W)  # o[:, :, i] = sum_j attention[i, j] v[:, :, j]
        return self.gamma * o + x, attention


def length_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """(B,) -> (B, T): True at the first ``lengths[b]`` positions of row b; T = ``max_length``."""
    if not isinstance(lengths, torch.Tensor) or lengths.ndim != 1:
        got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"expected lengths of shape (B,); got {got}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError(f"expected integer lengths; got dtype {lengths.dtype}")
    if len(lengths) and (lengths.min() < 0 or lengths.max() > max_length):
        raise ValueError(f"expected lengths in [0, {max_length}]; got {lengths.tolist()}")
    return torch.arange(max_length, device=lengths.device) < lengths[:, None]  # (B, T)


class AttnGANWordAttention(nn.Module):
    """((B, R, Dh), (B, T, De)) -> (context (B, R, Dh), beta (B, R, T)): each image region attends to the words.

    The words are first moved into the image-feature space by a bias-free linear map W::

        ê_j = W e_j                       # (Dh,)
        s_ij = h_i . ê_j                  # region i, word j
        beta_ij = softmax_j(s_ij)         # over the caption's real words; each row sums to 1
        o_i = sum_j beta_ij ê_j           # the word-context of region i, a mix of projected words

    Captions in a batch have different lengths. Padded words get score -inf before the softmax,
    hence weight exactly 0. The mask is per sample, (B, T) broadcast over the regions, so the
    padding of one caption never affects another sample.
    """

    def __init__(self, word_dim: int, region_dim: int) -> None:
        super().__init__()
        _positive_int("word_dim", word_dim)
        _positive_int("region_dim", region_dim)
        self.word_dim = word_dim
        self.region_dim = region_dim
        self.project = nn.Linear(word_dim, region_dim, bias=False)  # W: De -> Dh
        self.attend = nn.Softmax(dim=-1)  # (B, R, T), over the words j

    def forward(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, R, Dh), (B, T, De)) -> ((B, R, Dh), (B, R, T)).

        ``word_mask`` (B, T) bool, True = a real word; or ``lengths`` (B,) int, the number of real
        words, which come first. Give at most one; with neither, every word is real.
        """
        mask = self._mask(regions, words, word_mask, lengths)  # (B, T)
        words_hat = self.project(words)  # (B, T, Dh)
        scores = regions @ words_hat.transpose(1, 2)  # (B, R, T)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))  # the same mask for every region of a sample
        beta = self.attend(scores)  # (B, R, T)
        return beta @ words_hat, beta  # (B, R, Dh), (B, R, T)

    def _mask(
        self, regions: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor | None, lengths: torch.Tensor | None
    ) -> torch.Tensor:
        if regions.ndim != 3 or regions.shape[-1] != self.region_dim:
            raise ValueError(f"expected regions of shape (B, R, {self.region_dim}); got {tuple(regions.shape)}")
        if words.ndim != 3 or words.shape[-1] != self.word_dim:
            raise ValueError(f"expected words of shape (B, T, {self.word_dim}); got {tuple(words.shape)}")
        if words.shape[0] != regions.shape[0]:
            raise ValueError(
                f"expected the same batch size for regions and words; got {regions.shape[0]} and {words.shape[0]}"
            )
        B, T = words.shape[:2]
        if word_mask is not None and lengths is not None:
            raise ValueError("pass word_mask or lengths, not both")
        if lengths is not None:
            if lengths.shape != (B,):
                raise ValueError(f"expected lengths of shape ({B},); got {tuple(lengths.shape)}")
            mask = length_mask(lengths.to(words.device), T)
        elif word_mask is not None:
            if word_mask.dtype != torch.bool:
                raise ValueError(f"expected a bool word_mask (True = real word); got dtype {word_mask.dtype}")
            if word_mask.shape != (B, T):
                raise ValueError(f"expected word_mask of shape ({B}, {T}); got {tuple(word_mask.shape)}")
            mask = word_mask.to(words.device)
        else:
            mask = torch.ones(B, T, dtype=torch.bool, device=words.device)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"every sample needs at least one real word; samples {empty} have none")
        return mask
