"""The CLS token, 2-D sin-cos position embeddings, and resampling them to another grid."""

import math

import pytest
import torch
from torch.testing import assert_close

from vitlab.model.embeddings import ClsToken, PositionEmbedding, resample_pos_embed, sincos_2d


def test_cls_token_prepends_the_same_vector_to_every_sequence():
    cls = ClsToken(8)
    tokens = torch.randn(3, 5, 8)
    out = cls(tokens)
    assert out.shape == (3, 6, 8)
    assert torch.equal(out[:, 1:], tokens)
    for b in range(3):
        assert torch.equal(out[b, 0], cls.weight[0, 0])
    assert cls.weight.abs().max() > 0  # initialised, not left at zero


def test_sincos_shape_and_cls_row():
    table = sincos_2d(4, 16)
    assert table.shape == (1, 17, 16)
    assert torch.equal(table[0, 0], torch.zeros(16))
    assert table[0, 1:].abs().sum(-1).min() > 0  # every patch row is non-zero
    assert sincos_2d(4, 16, cls_token=False).shape == (1, 16, 16)
    assert torch.equal(sincos_2d(4, 16, cls_token=False), table[:, 1:])


def test_sincos_entry_by_hand():
    # dim 8: quarter 2, frequencies w = 1 / 10000^(i/2) = [1, 1/100]. Patch 5 of a 3x3 grid is row 1, column 2.
    table = sincos_2d(3, 8)
    r, c = 1.0, 2.0
    expected = [
        math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100),
        math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
    ]
    assert_close(table[0, 1 + 5], torch.tensor(expected))


def test_sincos_patch_entries_are_distinct():
    table = sincos_2d(5, 16)[0, 1:]
    distances = torch.cdist(table, table)
    assert distances[~torch.eye(25, dtype=torch.bool)].min() > 1e-3


def test_sincos_needs_dim_divisible_by_four():
    with pytest.raises(ValueError, match="dim divisible by 4; got dim=6"):
        sincos_2d(3, 6)


def test_resample_keeps_the_cls_entry_and_changes_the_grid():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 16, 8)
    out = resample_pos_embed(pe, 6)
    assert out.shape == (1, 1 + 36, 8)
    assert torch.equal(out[:, 0], pe[:, 0])


def test_resample_to_the_same_grid_is_the_identity():
    pe = torch.randn(1, 1 + 16, 8)
    assert torch.equal(resample_pos_embed(pe, 4), pe)


@pytest.mark.parametrize("new_grid", [2, 3, 7])
def test_resample_keeps_a_constant_embedding_constant(new_grid):
    value = torch.randn(8)
    pe = torch.cat([torch.zeros(1, 1, 8), value.expand(1, 16, 8)], dim=1)
    out = resample_pos_embed(pe, new_grid)
    assert_close(out[0, 1:], value.expand(new_grid * new_grid, 8))


def test_resample_is_spatial_not_a_flat_reshape():
    # An embedding that depends only on the column must still depend only on the column after resampling.
    cols = torch.arange(4, dtype=torch.float32).repeat(4)  # (16,), row-major column index
    pe = torch.cat([torch.zeros(1, 1, 1), cols.reshape(1, 16, 1)], dim=1)
    grid = resample_pos_embed(pe, 8)[0, 1:, 0].reshape(8, 8)
    assert_close(grid, grid[:1].expand(8, 8))  # every row the same
    assert (grid[0, 1:] > grid[0, :-1]).all()  # increasing left to right


def test_resample_with_no_prefix_tokens():
    pe = torch.randn(1, 9, 4)
    assert resample_pos_embed(pe, 5, num_prefix_tokens=0).shape == (1, 25, 4)


def test_resample_errors():
    with pytest.raises(ValueError, match=r"shape \(1, N, D\); got \(2, 17, 8\)"):
        resample_pos_embed(torch.randn(2, 17, 8), 5)
    with pytest.raises(ValueError, match="15 patch position embeddings do not form a square grid"):
        resample_pos_embed(torch.randn(1, 16, 8), 5)


def test_learned_embedding_is_a_parameter_added_to_every_sample():
    pe = PositionEmbedding("learned", 3, 8)
    assert isinstance(pe.weight, torch.nn.Parameter) and pe.weight.shape == (1, 10, 8)
    tokens = torch.randn(2, 10, 8)
    assert torch.equal(pe(tokens), tokens + pe.weight)
    assert "weight" in pe.state_dict()


def test_sincos_embedding_is_a_fixed_buffer():
    pe = PositionEmbedding("sincos", 3, 8)
    assert list(pe.parameters()) == []
    assert torch.equal(pe.weight, sincos_2d(3, 8))
    assert "weight" not in pe.state_dict()  # recomputed, never saved


def test_none_adds_nothing():
    pe = PositionEmbedding("none", 3, 8)
    tokens = torch.randn(2, 10, 8)
    assert pe(tokens) is tokens
    pe.resample(5)
    assert pe(torch.randn(1, 26, 8)).shape == (1, 26, 8)


def test_wrong_token_count_names_expected_and_received():
    with pytest.raises(ValueError, match=r"expected 10 tokens \(1 CLS \+ 3x3 patches\); got 17"):
        PositionEmbedding("learned", 3, 8)(torch.randn(1, 17, 8))


def test_unknown_kind():
    with pytest.raises(ValueError, match=r"'learned', 'sincos' or 'none'; got 'rope'"):
        PositionEmbedding("rope", 3, 8)


def test_resample_learned_keeps_cls_and_stays_trainable():
    torch.manual_seed(0)
    pe = PositionEmbedding("learned", 3, 8)
    cls_entry = pe.weight[:, 0].clone()
    pe.resample(5)
    assert pe.grid_size == 5
    assert isinstance(pe.weight, torch.nn.Parameter) and pe.weight.shape == (1, 26, 8)
    assert torch.equal(pe.weight[:, 0], cls_entry)
    assert [p.shape for p in pe.parameters()] == [torch.Size([1, 26, 8])]


def test_resample_sincos_recomputes_the_table_in_the_modules_dtype():
    pe = PositionEmbedding("sincos", 3, 8).double()
    pe.resample(5)
    assert pe.weight.dtype == torch.float64
    assert_close(pe.weight, sincos_2d(5, 8).double())
    assert "weight" not in pe.state_dict()
