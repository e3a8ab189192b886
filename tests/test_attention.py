"""Attention: the fused and the explicit path compute the same function; local window masks; mask checks."""

import math

import pytest
import torch
from torch.testing import assert_close

from vitlab.model.attention import Attention, local_window_mask

B, N, D, H = 2, 10, 16, 4  # 1 CLS + a 3x3 grid


def make(**kwargs):
    torch.manual_seed(0)
    attn = Attention(D, H, **kwargs)
    torch.nn.init.normal_(attn.qkv.weight, std=0.5)  # peaked attention, so a wrong mask shows
    return attn


def run(attn, fused, x, mask=None):
    attn.fused = fused
    x = x.clone().requires_grad_(True)
    out = attn(x, mask)
    attn.zero_grad()
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = {name: p.grad.clone() for name, p in attn.named_parameters()}
    return out.detach(), x.grad, grads


def per_batch_mask():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(B, 1, N, N, generator=g) > 0.5
    mask[..., 0] = True  # every query may attend somewhere
    assert not torch.equal(mask[0], mask[1])
    return mask


MASKS = {
    "none": lambda: None,
    "window": lambda: local_window_mask(3, 1),
    "per_head": lambda: local_window_mask(3, 3).expand(1, H, N, N),
    "per_batch": per_batch_mask,
}


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_fused_and_explicit_agree_outputs_and_gradients(mask_name):
    attn = make()
    x = torch.randn(B, N, D)
    mask = MASKS[mask_name]()
    out_e, gx_e, grads_e = run(attn, False, x, mask)
    out_f, gx_f, grads_f = run(attn, True, x, mask)
    assert_close(out_f, out_e)
    assert_close(gx_f, gx_e)
    assert grads_e.keys() == grads_f.keys() and len(grads_e) == 4
    for name in grads_e:
        assert_close(grads_f[name], grads_e[name], msg=name)


@pytest.mark.parametrize("fused", [False, True])
def test_a_mask_changes_the_output(fused):
    attn = make(fused=fused)
    x = torch.randn(B, N, D)
    assert not torch.allclose(attn(x), attn(x, local_window_mask(3, 1)), atol=1e-4)


def reference(attn, x, mask=None):
    """Attention per head with plain loops, from the weights of one Linear(D, 3D)."""
    q_all, k_all, v_all = attn.qkv(x).split(D, dim=-1)  # (B, N, D) each, heads side by side
    d = D // H
    heads = []
    for h in range(H):
        q, k, v = (t[..., h * d:(h + 1) * d] for t in (q_all, k_all, v_all))
        scores = q @ k.transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return attn.proj(torch.cat(heads, dim=-1))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_a_hand_written_reference(fused, masked):
    attn = make(fused=fused)
    x = torch.randn(B, N, D)
    mask = local_window_mask(3, 1) if masked else None
    with torch.no_grad():
        assert_close(attn(x, mask), reference(attn, x, mask))


def test_per_batch_mask_does_not_mix_samples():
    attn = make()
    x, mask = torch.randn(B, N, D), per_batch_mask()
    together = attn(x, mask)
    for b in range(B):
        assert_close(together[b:b + 1], attn(x[b:b + 1], mask[b:b + 1]))


@pytest.mark.parametrize("mask_name", ["window", "per_batch"])
def test_explicit_probabilities_are_exactly_zero_where_masked(mask_name):
    attn = make()
    mask = MASKS[mask_name]()
    seen = {}
    attn.attend.register_forward_hook(lambda m, args, out: seen.update(p=out))
    attn.scores.register_forward_hook(lambda m, args, out: seen.update(s=out))
    attn(torch.randn(B, N, D), mask)
    p = seen["p"]
    assert p.shape == (B, H, N, N)
    allowed = mask.expand(B, H, N, N)
    assert (p[~allowed] == 0).all()
    assert (p[allowed] > 0).all()
    assert_close(p.sum(-1), torch.ones(B, H, N))
    assert torch.isneginf(seen["s"][~allowed]).all()


def test_taps_see_the_documented_shapes():
    attn = make()
    shapes = {}
    for name in ("q", "k", "v", "scores", "attend", "merge"):
        getattr(attn, name).register_forward_hook(lambda m, a, out, name=name: shapes.update({name: tuple(out.shape)}))
    attn(torch.randn(B, N, D))
    d = D // H
    assert shapes == {"q": (B, H, N, d), "k": (B, H, N, d), "v": (B, H, N, d), "scores": (B, H, N, N),
                      "attend": (B, H, N, N), "merge": (B, N, D)}


def test_one_linear_for_q_k_v():
    attn = Attention(D, H, qkv_bias=False)
    assert attn.qkv.weight.shape == (3 * D, D) and attn.qkv.bias is None
    assert attn.scale == (D // H) ** -0.5


@pytest.mark.parametrize("fused", [False, True])
def test_attention_dropout_only_in_training(fused):
    attn = make(attn_dropout=0.5, fused=fused)
    x = torch.randn(B, N, D)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    torch.manual_seed(1)
    assert not torch.allclose(attn(x), attn.eval()(x))


def test_local_window_mask_3x3_grid_window_3_by_hand():
    mask = local_window_mask(3, 3)
    assert mask.shape == (10, 10) and mask.dtype == torch.bool
    assert mask[0].all() and mask[:, 0].all()  # CLS sees all; all see CLS
    patches = mask[1:, 1:]
    # patch 0 is the top-left corner: it sees patches 0, 1 (right), 3 (below), 4 (diagonal)
    assert patches[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert mask[1].sum() == 4 + 1
    assert patches[4].all()  # the centre sees all 9
    # patch 5 (row 1, column 2): columns 1..2 of rows 0..2
    assert patches[5].nonzero().flatten().tolist() == [1, 2, 4, 5, 7, 8]
    assert torch.equal(patches, patches.T)


def test_local_window_mask_window_1_sees_only_itself_and_cls():
    mask = local_window_mask(4, 1)
    assert torch.equal(mask[1:, 1:], torch.eye(16, dtype=torch.bool))
    assert mask[:, 0].all() and mask[0].all()


def test_local_window_mask_large_window_is_full_attention():
    assert local_window_mask(3, 5).all()
    assert not local_window_mask(5, 3).all()


def test_local_window_mask_without_cls():
    mask = local_window_mask(3, 3, cls_token=False)
    assert torch.equal(mask, local_window_mask(3, 3)[1:, 1:])


@pytest.mark.parametrize("window", [0, 2, -3])
def test_local_window_mask_rejects_even_or_non_positive_windows(window):
    with pytest.raises(ValueError, match=rf"odd k >= 1; got {window}"):
        local_window_mask(3, window)


def test_dim_not_divisible_by_heads():
    with pytest.raises(ValueError, match="got dim=10, heads=4"):
        Attention(10, 4)


@pytest.mark.parametrize("fused", [False, True])
def test_non_bool_mask_is_rejected(fused):
    attn = make(fused=fused)
    with pytest.raises(ValueError, match=r"bool attention mask .*; got dtype torch.float32"):
        attn(torch.randn(B, N, D), torch.zeros(N, N))


@pytest.mark.parametrize("fused", [False, True])
def test_mask_of_wrong_size_is_rejected(fused):
    attn = make(fused=fused)
    with pytest.raises(ValueError, match=r"broadcastable to \(B, h, N, N\) = \(2, 4, 10, 10\); got \(17, 17\)"):
        attn(torch.randn(B, N, D), local_window_mask(4, 3))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(3, 1, N, N), (B, 3, N, N), (1, 1, 1, N, N), (B, N, N)])
def test_mask_not_broadcastable_to_b_h_n_n_is_rejected(fused, shape):
    attn = make(fused=fused)
    mask = torch.ones(shape, dtype=torch.bool)
    expected = rf"broadcastable to \(B, h, N, N\) = \({B}, {H}, {N}, {N}\); got \({', '.join(map(str, shape))}\)"
    with pytest.raises(ValueError, match=expected):
        attn(torch.randn(B, N, D), mask)


@pytest.mark.parametrize("fused", [False, True])
def test_mask_with_an_all_false_row_is_rejected(fused):
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[3] = False
    with pytest.raises(ValueError, match="all-False row"):
        make(fused=fused)(torch.randn(B, N, D), mask)
