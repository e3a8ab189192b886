"""MLP, DropPath (stochastic depth) and the pre-norm / post-norm encoder blocks."""

import pytest
import torch
from torch.testing import assert_close

from vitlab.model.blocks import MLP, Block, DropPath

D = 16


def test_mlp_shape_and_formula():
    torch.manual_seed(0)
    mlp = MLP(D, 32)
    x = torch.randn(2, 5, D)
    out = mlp(x)
    assert out.shape == (2, 5, D)
    assert_close(out, mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x))))


def test_drop_path_is_the_identity_in_eval():
    dp = DropPath(0.5).eval()
    x = torch.randn(8, 3, 4)
    assert dp(x) is x


def test_drop_path_zero_rate_is_the_identity_in_training():
    x = torch.randn(8, 3, 4)
    assert DropPath(0.0).train()(x) is x


def test_drop_path_drops_whole_samples_and_scales_the_rest():
    torch.manual_seed(0)
    p = 0.25
    dp = DropPath(p).train()
    x = torch.randn(64, 5, 4)
    out = dp(x)
    ratio = (out / x).reshape(64, -1)
    dropped = (ratio == 0).all(dim=1)
    kept = torch.isclose(ratio, torch.tensor(1 / (1 - p))).all(dim=1)
    assert (dropped | kept).all()  # every sample is either fully dropped or fully kept
    assert dropped.any() and kept.any()


def test_drop_path_preserves_the_expected_value():
    torch.manual_seed(0)
    p = 0.3
    out = DropPath(p).train()(torch.ones(40_000, 2))
    kept_fraction = (out[:, 0] > 0).float().mean()
    assert abs(kept_fraction.item() - (1 - p)) < 0.015  # standard error is about 0.0023
    assert abs(out.mean().item() - 1.0) < 0.02  # without the 1/(1-p) scaling it would be 0.7


def test_drop_path_rate_must_be_in_unit_interval():
    with pytest.raises(ValueError, match=r"in \[0, 1\); got 1.0"):
        DropPath(1.0)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_keeps_the_shape(norm):
    assert Block(D, 4, 32, norm=norm)(torch.randn(2, 7, D)).shape == (2, 7, D)


def block_pair():
    torch.manual_seed(0)
    pre = Block(D, 4, 32, norm="pre")
    post = Block(D, 4, 32, norm="post")
    post.load_state_dict(pre.state_dict())  # same weights, only the order of operations differs
    return pre, post


def test_pre_and_post_norm_differ_with_the_same_weights():
    pre, post = block_pair()
    x = 3 * torch.randn(2, 7, D) + 1
    assert not torch.allclose(pre(x), post(x), atol=1e-3)


def test_pre_norm_formula():
    pre, _ = block_pair()
    x = torch.randn(2, 7, D)
    h = x + pre.attn(pre.norm1(x))
    assert_close(pre(x), h + pre.mlp(pre.norm2(h)))


def test_post_norm_formula_and_normalised_output():
    _, post = block_pair()
    x = 3 * torch.randn(2, 7, D) + 1
    h = post.norm1(x + post.attn(x))
    out = post(x)
    assert_close(out, post.norm2(h + post.mlp(h)))
    # LayerNorm with its initial weight 1 and bias 0: every token has mean 0 and std 1
    assert_close(out.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)
    assert_close(out.std(-1, unbiased=False), torch.ones(2, 7), atol=1e-3, rtol=0)


def test_pre_norm_output_is_not_normalised():
    pre, _ = block_pair()
    out = pre(3 * torch.randn(2, 7, D) + 1)
    assert out.mean(-1).abs().max() > 0.1


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_passes_the_mask_to_attention(norm):
    torch.manual_seed(0)
    block = Block(D, 4, 32, norm=norm)
    seen = []
    block.attn.attend.register_forward_hook(lambda m, a, out: seen.append(out))
    mask = torch.eye(5, dtype=torch.bool)
    block(torch.randn(1, 5, D), mask)
    assert torch.equal(seen[0][0, 0], torch.eye(5))  # each token attends only to itself


def test_block_drop_path_in_training_drops_the_residual_branches():
    torch.manual_seed(0)
    block = Block(D, 4, 32, drop_path=0.5).train()
    x = torch.randn(64, 3, D)
    out = block(x)
    both_dropped = (out == x).reshape(64, -1).all(dim=1)
    assert both_dropped.any() and not both_dropped.all()
    block.eval()
    assert not (block(x) == x).reshape(64, -1).all(dim=1).any()


def test_unknown_norm():
    with pytest.raises(ValueError, match=r"'pre' or 'post'; got 'sandwich'"):
        Block(D, 4, 32, norm="sandwich")
