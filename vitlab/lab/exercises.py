"""The notebooks' exercises and their checks: ``check("01.1", answer)`` says whether an answer is right.

    check("01.1", None)   # Not answered yet: how many tokens ...
    check("01.1", 576)    # Not quite: 576. Hint: ...
    check("01.1", 577)    # Right: 577

Each right answer is computed with vitlab itself (a config's ``num_tokens``, ``local_window_mask``, ...), not
typed in, so a check can only agree with the library. ``check`` prints its verdict and returns True for a right
answer, False otherwise; it never raises on a wrong one, so a learner can try again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ..model.attention import local_window_mask
from ..model.config import ViTConfig
from ..model.patches import conv_to_linear_weight, patchify
from ..model.toy import length_mask

VIT_B16 = ViTConfig(image_size=224, patch_size=16, in_channels=3, dim=768, heads=12, mlp_dim=3072, depth=12,
                    num_classes=1000)
CAPTION_LENGTHS = (4, 3, 2)  # exercise 03.4: three captions padded to 4 words, 4 regions each
CAPTION_WORDS = 4
REGIONS = 4


class Exercise(NamedTuple):
    question: str
    expected: Callable[[], Any]  # computes the right answer with vitlab
    hint: str
    tolerance: float | None = None  # for float answers: how far from the right one still counts


def _linear_column() -> int:
    kernel = torch.arange(3 * 16 * 16).reshape(1, 3, 16, 16)  # one conv kernel (C, P, P), every entry numbered
    return int((conv_to_linear_weight(kernel)[0] == kernel[0, 2, 1, 0]).nonzero())


def _resampled_shape() -> tuple[int, ...]:
    config = ViTConfig(image_size=42)  # what set_image_size(42) makes of the MNIST model's config
    return (1, config.num_tokens, config.dim)


def _flat_caption_mask() -> torch.Tensor:
    mask = length_mask(torch.tensor(CAPTION_LENGTHS), CAPTION_WORDS)  # (B, T)
    B, T = mask.shape
    return mask[:, None, :].expand(B, REGIONS, T).reshape(B * REGIONS, T)  # (B*R, T): row r is sample r // R


EXERCISES: dict[str, Exercise] = {
    "01.1": Exercise("how many tokens a 384x384 image in 16x16 patches gives, with the CLS token",
                     lambda: ViTConfig(image_size=384, patch_size=16, in_channels=3).num_tokens,
                     "count the patches along one side, square that, then add the CLS token"),
    "01.2": Exercise("how many values one flattened 32x32 RGB patch has",
                     lambda: patchify(torch.zeros(1, 3, 32, 32), 32).shape[-1], "P * P * C"),
    "01.3": Exercise("the column of conv.weight[d, 2, 1, 0] in the (D, 768) linear weight",
                     _linear_column, "the column is (i * P + j) * C + c: the channel changes fastest"),
    "02.1": Exercise("how many numbers ViT-B/16's learned position table holds at 224 px",
                     lambda: VIT_B16.num_tokens * VIT_B16.dim,
                     "one D-vector per token: the (224 / 16) ** 2 patches and the CLS token"),
    "02.2": Exercise("the shape of pos_embed.weight after set_image_size(42) on the MNIST model",
                     _resampled_shape,
                     "the grid side becomes 42 / 7; one row per patch plus one for CLS; D does not change"),
    "02.3": Exercise("whether scrambled patches change the logits of a model with pos_embed='none', pool='mean'",
                     lambda: False, "the patch outputs are only reordered; what does reordering do to their mean?"),
    "03.1": Exercise("the weight of the first key, for scores 4 and 0 with d = 4",
                     lambda: torch.softmax(torch.tensor([4.0, 0.0]) / math.sqrt(4), dim=0)[0].item(),
                     "divide both scores by sqrt(d) first, then take the softmax", tolerance=5e-4),
    "03.2": Exercise("how many attention probabilities one ViT-B/16 layer computes for one image",
                     lambda: VIT_B16.heads * VIT_B16.num_tokens**2,
                     "heads x N x N, and N counts the CLS token"),
    "03.3": Exercise("how many (query, key) pairs a 7x7 window on a 14x14 grid allows, with a global CLS token",
                     lambda: int(local_window_mask(14, 7).sum()),
                     "count the patch pairs (windows are clipped at the border), then add the CLS row and column"),
    "03.4": Exercise("the (B*R, T) word mask, each sample's row repeated for its own R regions",
                     _flat_caption_mask, "row r of the flattened scores belongs to sample r // R, not r % B"),
    "04.1": Exercise("the shape of one block's attention scores for ViT-B/16 and a batch of 8",
                     lambda: (8, VIT_B16.heads, VIT_B16.num_tokens, VIT_B16.num_tokens),
                     "(B, h, N, N), where N counts the (224 / 16) ** 2 patches and the CLS token"),
    "04.2": Exercise("the shape of ViT-B/16's attn.qkv step for the same batch",
                     lambda: (8, VIT_B16.num_tokens, 3 * VIT_B16.dim),
                     "one Linear(D, 3 * D) applied to every token: (B, N, 3 * D)"),
    "04.3": Exercise("the cross-entropy when all 20 logits are equal",
                     lambda: F.cross_entropy(torch.zeros(1, 20), torch.tensor([0])).item(),
                     "every class gets probability 1/20; the loss is -log of the true class's probability",
                     tolerance=1e-3),
    "04.4": Exercise("the smoothed target of the true class with eps = 0.1 and K = 10",
                     lambda: (1 - 0.1) + 0.1 / 10, "(1 - eps) * 1 + eps / K", tolerance=1e-6),
}


def is_right(exercise: str, answer) -> bool:
    """Whether ``answer`` is the right answer to ``exercise`` (tensors: same shape and values; tuples: same items)."""
    expected = EXERCISES[exercise].expected()
    tolerance = EXERCISES[exercise].tolerance
    if isinstance(expected, torch.Tensor):
        return isinstance(answer, torch.Tensor) and answer.shape == expected.shape and bool((answer == expected).all())
    if isinstance(expected, bool):
        return answer is expected or (isinstance(answer, torch.Tensor) and answer.numel() == 1
                                      and bool(answer) is expected)
    if isinstance(expected, tuple):
        try:
            return tuple(answer) == expected
        except TypeError:
            return False
    if tolerance is not None:
        try:
            return abs(float(answer) - expected) <= tolerance
        except (TypeError, ValueError):
            return False
    return not isinstance(answer, bool) and answer == expected


def _shown(answer) -> str:
    if isinstance(answer, torch.Tensor):
        return f"a tensor of shape {tuple(answer.shape)}"
    return f"{answer:.4f}" if isinstance(answer, float) else repr(answer)


def check(exercise: str, answer) -> bool:
    """Print whether ``answer`` to ``exercise`` ("01.1", ...) is right, with a hint if it is not; return True if right."""
    if exercise not in EXERCISES:
        raise ValueError(f"expected an exercise among {sorted(EXERCISES)}; got {exercise!r}")
    question, _, hint, _ = EXERCISES[exercise]
    if answer is None:
        print(f"Not answered yet: {question}.")
        return False
    if is_right(exercise, answer):
        print(f"Right: {_shown(answer)} is {question}.")
        return True
    print(f"Not quite: {_shown(answer)} is not {question}. Hint: {hint}.")
    return False
