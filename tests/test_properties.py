"""The shape contracts as properties, checked by hypothesis on sizes and values drawn at random.

- ``patchify`` / ``unpatchify``: a round trip gives the images back, for any batch, channels, patch and grid;
- attention masks: every mask broadcastable to (B, h, N, N) is accepted, the model's attention is 0
  wherever it says False and its rows still sum to 1; any other shape is refused;
- ``attention_rollout``: the rows sum to 1 for any stack of attention maps and any setting;
- ``ViTConfig``: a value is accepted exactly when it is in the range its field documents.
"""

import math
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from torch.testing import assert_close

import vitlab
from vitlab import ViTConfig
from vitlab.inside.explain import HEAD_FUSIONS, attention_rollout
from vitlab.model.attention import check_mask, local_window_mask
from vitlab.model.patches import patchify, unpatchify

# No example database, and hypothesis's caches in the temporary folder: nothing is written into the
# working tree, and every run draws afresh.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "vitlab-hypothesis")
SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- patches ---------------------------------------------------------------------------------------


@SETTINGS
@given(batch=st.integers(1, 3), channels=st.integers(1, 3), patch=st.integers(1, 6), rows=st.integers(1, 5),
       columns=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_patchify_then_unpatchify_gives_the_images_back(batch, channels, patch, rows, columns, seed):
    images = torch.randn(batch, channels, rows * patch, columns * patch, generator=generator(seed))
    patches = patchify(images, patch)
    assert patches.shape == (batch, rows * columns, patch * patch * channels)
    # patch k is the k-th square in row-major order, flattened as (p1 p2 c)
    k = seed % (rows * columns)
    r, c = divmod(k, columns)
    square = images[:, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]  # (B, C, P, P)
    assert torch.equal(patches[:, k], square.permute(0, 2, 3, 1).reshape(batch, -1))  # a copy: exact
    grid = None if rows == columns else (rows, columns)
    assert torch.equal(unpatchify(patches, patch, channels, grid), images)


@SETTINGS
@given(patch=st.integers(2, 6), side=st.integers(1, 4), extra=st.integers(1, 5))
def test_patchify_refuses_a_size_that_is_not_a_multiple_of_the_patch(patch, side, extra):
    size = side * patch + 1 + extra % (patch - 1)  # between two multiples of the patch
    with pytest.raises(ValueError, match=f"divisible by patch_size={patch}; got {size}x{size}"):
        patchify(torch.zeros(1, 1, size, size), patch)


# --- attention masks ---------------------------------------------------------------------------------

MASKED = dict(image_size=8, patch_size=4, dim=8, depth=1, heads=2, mlp_dim=8)  # N = 1 + 2*2 = 5 tokens


@SETTINGS
@given(batch=st.integers(1, 3), leading=st.sampled_from([(), ("h",), ("B", "h"), ("B", 1), (1, "h"), (1,), (1, 1)]),
       seed=st.integers(0, 2**16))
def test_a_broadcastable_mask_zeroes_the_attention_it_forbids(batch, leading, seed):
    model = vitlab.ViT(**MASKED).eval()
    heads, n = model.config.heads, model.config.num_tokens
    shape = tuple({"B": batch, "h": heads}.get(size, size) for size in leading) + (n, n)
    mask = torch.rand(shape, generator=generator(seed)) < 0.5
    mask |= torch.eye(n, dtype=torch.bool)  # every query may attend at least to itself
    target = (batch, heads, n, n)
    check_mask(mask, batch, heads, n)  # accepted
    assert torch.broadcast_shapes(mask.shape, target) == target
    images = torch.randn(batch, 1, 8, 8, generator=generator(seed + 1))
    with vitlab.record(model) as rec, torch.no_grad():
        model(images, mask)
    attention = rec.attentions[:, 0]  # (B, h, N, N)
    allowed = mask.expand(target)
    assert torch.all(attention[~allowed] == 0)  # a forbidden key gets exactly 0 after the softmax
    assert_close(attention.sum(-1), torch.ones(batch, heads, n))


@SETTINGS
@given(shape=st.lists(st.sampled_from([1, 2, 3, 5, 6]), min_size=1, max_size=5))
def test_a_mask_is_accepted_exactly_when_it_broadcasts_to_b_h_n_n(shape):
    batch, heads, n = 3, 2, 5
    mask = torch.ones(shape, dtype=torch.bool)
    target = (batch, heads, n, n)
    try:
        broadcasts = torch.broadcast_shapes(tuple(shape), target) == target
    except RuntimeError:
        broadcasts = False
    fits = tuple(shape[-2:]) == (n, n) and broadcasts
    if fits:
        check_mask(mask, batch, heads, n)
    else:
        with pytest.raises(ValueError, match=r"expected an attention mask broadcastable to \(B, h, N, N\)"):
            check_mask(mask, batch, heads, n)


@SETTINGS
@given(grid=st.integers(1, 6), half=st.integers(0, 3))
def test_a_local_window_mask_is_symmetric_and_never_leaves_a_query_without_a_key(grid, half):
    mask = local_window_mask(grid, 2 * half + 1)
    n = grid * grid + 1
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    assert torch.equal(mask, mask.T)
    assert mask.diagonal().all() and mask[0].all() and mask[:, 0].all()  # CLS sees all and is seen by all
    check_mask(mask, 1, 1, n)


# --- attention rollout ---------------------------------------------------------------------------------


@SETTINGS
@given(batch=st.integers(1, 2), layers=st.integers(1, 4), heads=st.integers(1, 3), grid=st.integers(1, 4),
       fusion=st.sampled_from(HEAD_FUSIONS), discard=st.floats(0.0, 0.9), temperature=st.floats(0.05, 20.0),
       seed=st.integers(0, 2**16))
def test_rollout_rows_sum_to_one_for_any_attention_stack(batch, layers, heads, grid, fusion, discard, temperature,
                                                         seed):
    n = grid * grid + 1
    scores = torch.randn(batch, layers, heads, n, n, generator=generator(seed), dtype=torch.float64)
    attentions = torch.softmax(scores / temperature, dim=-1)  # (B, L, h, N, N), each row sums to 1
    rollout = attention_rollout(attentions, head_fusion=fusion, discard_ratio=discard)
    assert rollout.shape == (batch, n, n)
    assert torch.all(rollout >= 0)
    assert_close(rollout.sum(-1), torch.ones(batch, n, dtype=torch.float64))


# --- ViTConfig's documented ranges ------------------------------------------------------------------------

VALUES = st.one_of(
    st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 0.5, 1.0]),
    st.booleans(), st.none(), st.text(max_size=3), st.just(1e-12),
)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# field -> (whether a value is in the documented range, the other fields that keep every valid value valid)
RANGES = {
    "image_size": (lambda v: is_int(v) and v >= 1, lambda v: dict(patch_size=1)),
    "patch_size": (lambda v: is_int(v) and v >= 1, lambda v: dict(image_size=2 * v if is_int(v) and v > 0 else 28)),
    "in_channels": (lambda v: is_int(v) and v >= 1, lambda v: {}),
    "num_classes": (lambda v: is_int(v) and v >= 0, lambda v: {}),
    "dim": (lambda v: is_int(v) and v >= 1, lambda v: dict(heads=1)),
    "heads": (lambda v: is_int(v) and v >= 1, lambda v: dict(dim=4 * v if is_int(v) and v > 0 else 64)),
    "depth": (lambda v: is_int(v) and v >= 1, lambda v: {}),
    "mlp_dim": (lambda v: is_int(v) and v >= 1, lambda v: {}),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, lambda v: {}),
    "attn_dropout": (lambda v: is_number(v) and 0 <= v < 1, lambda v: {}),
    "drop_path": (lambda v: is_number(v) and 0 <= v < 1, lambda v: {}),
    "qkv_bias": (lambda v: isinstance(v, bool), lambda v: {}),
    "layer_norm_eps": (lambda v: is_number(v) and v > 0, lambda v: {}),
    "window": (lambda v: is_int(v) and v >= 0 and (v == 0 or v % 2 == 1), lambda v: {}),
}


@SETTINGS
@given(field=st.sampled_from(sorted(RANGES)), value=VALUES)
def test_vitconfig_accepts_exactly_the_documented_range(field, value):
    documented, others = RANGES[field]
    if documented(value):
        assert getattr(ViTConfig(**others(value), **{field: value}), field) == value
    else:
        with pytest.raises(ValueError, match=rf"^{field} must be .*; got {re.escape(repr(value))}$"):
            ViTConfig(**others(value), **{field: value})


@SETTINGS
@given(field=st.sampled_from(["pool", "pos_embed", "norm", "final_norm", "patch_embed", "attn_impl"]),
       value=st.one_of(st.text(max_size=8), st.none(), st.integers()))
def test_vitconfig_accepts_exactly_the_listed_choices(field, value):
    from vitlab.model import config

    allowed = {"pool": config.POOLS, "pos_embed": config.POS_EMBEDS, "norm": config.NORMS,
               "final_norm": config.FINAL_NORMS, "patch_embed": config.PATCH_EMBEDS, "attn_impl": config.ATTN_IMPLS}
    if value in allowed[field]:
        assert getattr(ViTConfig(**{field: value}), field) == value
    else:
        with pytest.raises(ValueError, match=f"{field} must be one of"):
            ViTConfig(**{field: value})
