import math

import pytest
import torch

from vitlab.model.toy import AttnGANWordAttention, SAGANSelfAttention, length_mask


def seed_feature_map() -> torch.Tensor:
    """The seed's example: one 3-channel 3x3 feature map, (1, 3, 3, 3)."""
    return torch.tensor(
        [[[1.0, 0.0, 2.0], [0.5, -1.0, 1.5], [0.0, 1.0, -0.5]],
         [[-0.5, 2.0, 0.0], [1.0, 0.5, -1.0], [2.0, 0.0, 1.0]],
         [[0.0, 1.0, 1.0], [-1.0, 0.0, 0.5], [1.5, -0.5, 0.0]]],
        dtype=torch.float64,
    ).unsqueeze(0)


def sagan(channels=3, reduction=1, seed=0) -> SAGANSelfAttention:
    torch.manual_seed(seed)
    return SAGANSelfAttention(channels, reduction=reduction).double()


def conv1x1_by_hand(conv: torch.nn.Conv2d, x: torch.Tensor) -> list[list[float]]:
    """Each position's output vector of a 1x1 conv, positions in row-major order, with Python loops."""
    _, C, H, W = x.shape
    weight = conv.weight[:, :, 0, 0].tolist()  # (out, C)
    bias = conv.bias.tolist()
    vectors = []
    for r in range(H):
        for c in range(W):
            pixel = [x[0, ch, r, c].item() for ch in range(C)]
            vectors.append([bias[o] + sum(weight[o][ch] * pixel[ch] for ch in range(C)) for o in range(len(bias))])
    return vectors


def sagan_by_hand(module: SAGANSelfAttention, x: torch.Tensor):
    q, k, v = (conv1x1_by_hand(conv, x) for conv in (module.query, module.key, module.value))
    n = len(q)
    attention = []
    for i in range(n):
        scores = [sum(a * b for a, b in zip(q[i], k[j])) for j in range(n)]  # no 1/sqrt(d)
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        attention.append([e / sum(exps) for e in exps])
    o = [[sum(attention[i][j] * v[j][ch] for j in range(n)) for ch in range(len(v[0]))] for i in range(n)]
    return torch.tensor(attention, dtype=torch.float64), torch.tensor(o, dtype=torch.float64)  # (N, N), (N, C)


def test_sagan_at_init_returns_input_exactly():
    module = sagan()
    x = seed_feature_map()
    out, _ = module(x)
    assert module.gamma.item() == 0.0
    assert torch.equal(out, x)


def test_sagan_attention_matches_hand_computation_on_seed_example():
    module = sagan()
    x = seed_feature_map()
    with torch.no_grad():
        _, attention = module(x)
    assert attention.shape == (1, 9, 9)  # N = 3*3 positions, a 9x9 map
    expected, _ = sagan_by_hand(module, x)
    torch.testing.assert_close(attention[0], expected)
    torch.testing.assert_close(attention.sum(-1), torch.ones(1, 9, dtype=torch.float64))


def test_sagan_attention_is_over_keys_not_queries():
    module = sagan()
    x = seed_feature_map()
    with torch.no_grad():
        _, attention = module(x)
    # Softmax over keys makes rows sum to 1; the columns of this example do not.
    assert not torch.allclose(attention.sum(-2), torch.ones(1, 9, dtype=torch.float64))


def test_sagan_gamma_one_adds_attention_output_to_input():
    module = sagan()
    x = seed_feature_map()
    with torch.no_grad():
        module.gamma.fill_(1.0)
        out, _ = module(x)
    _, o = sagan_by_hand(module, x)  # (N, C)
    expected = x + o.T.reshape(1, 3, 3, 3)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, x)


def test_sagan_qk_channels_clamped_for_three_channels():
    module = SAGANSelfAttention(3)  # the usual C // 8 = 0
    assert module.qk_channels == 1
    assert module.query.weight.shape == (1, 3, 1, 1) and module.key.weight.shape == (1, 3, 1, 1)
    assert module.value.weight.shape == (3, 3, 1, 1)
    assert SAGANSelfAttention(3, reduction=1).qk_channels == 3
    assert SAGANSelfAttention(64).qk_channels == 8
    assert SAGANSelfAttention(3, min_qk_channels=2).qk_channels == 2
    out, attention = module(torch.randn(2, 3, 4, 5))
    assert out.shape == (2, 3, 4, 5) and attention.shape == (2, 20, 20)


def test_sagan_rejects_wrong_input():
    module = SAGANSelfAttention(3)
    with pytest.raises(ValueError, match=r"expected 3 channels.*got 4"):
        module(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 3, 3\)"):
        module(torch.randn(3, 3, 3))
    with pytest.raises(ValueError, match="channels must be a positive int"):
        SAGANSelfAttention(0)


# AttnGAN: 4 regions, captions of 4 and 2 words (padded to 4).

def attngan_batch(seed=0):
    torch.manual_seed(seed)
    module = AttnGANWordAttention(word_dim=5, region_dim=6).double()
    regions = torch.randn(2, 4, 6, dtype=torch.float64)
    words = torch.randn(2, 4, 5, dtype=torch.float64)
    return module, regions, words


def test_attngan_padded_words_get_zero_weight_per_sample():
    module, regions, words = attngan_batch()
    lengths = torch.tensor([4, 2])
    context, beta = module(regions, words, lengths=lengths)
    assert context.shape == (2, 4, 6) and beta.shape == (2, 4, 4)
    assert torch.all(beta[1, :, 2:] == 0)  # sample 1's two padded words, for every region
    assert torch.all(beta[0] > 0)  # sample 0 has no padding: no word of it is masked
    torch.testing.assert_close(beta.sum(-1), torch.ones(2, 4, dtype=torch.float64))
    torch.testing.assert_close(beta[1, :, :2].sum(-1), torch.ones(4, dtype=torch.float64))


def test_attngan_samples_do_not_mix():
    module, regions, words = attngan_batch()
    context, beta = module(regions, words, lengths=torch.tensor([4, 2]))
    alone_context, alone_beta = module(regions[:1], words[:1])
    torch.testing.assert_close(beta[:1], alone_beta)
    torch.testing.assert_close(context[:1], alone_context)
    short_context, short_beta = module(regions[1:], words[1:, :2])  # sample 1 with its padding cut off
    torch.testing.assert_close(beta[1:, :, :2], short_beta)
    torch.testing.assert_close(context[1:], short_context)


def test_attngan_lengths_and_mask_agree():
    module, regions, words = attngan_batch()
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    by_lengths = module(regions, words, lengths=torch.tensor([4, 2]))
    by_mask = module(regions, words, word_mask=mask)
    torch.testing.assert_close(by_lengths[0], by_mask[0])
    torch.testing.assert_close(by_lengths[1], by_mask[1])
    assert torch.equal(length_mask(torch.tensor([4, 2]), 4), mask)


def test_attngan_context_is_beta_times_projected_words():
    module, regions, words = attngan_batch()
    context, beta = module(regions, words, lengths=torch.tensor([4, 2]))
    words_hat = words @ module.project.weight.T  # ê = W e, no bias
    scores = torch.einsum("brd,btd->brt", regions, words_hat)
    scores[1, :, 2:] = float("-inf")
    torch.testing.assert_close(beta, scores.softmax(dim=-1))
    torch.testing.assert_close(context, torch.einsum("brt,btd->brd", beta, words_hat))
    assert module.project.bias is None


def test_attngan_rejects_bad_inputs():
    module, regions, words = attngan_batch()
    with pytest.raises(ValueError, match=r"samples \[1\] have none"):
        module(regions, words, lengths=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"expected word_mask of shape \(2, 4\); got \(1, 4\)"):
        module(regions, words, word_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool word_mask"):
        module(regions, words, word_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="not both"):
        module(regions, words, word_mask=torch.ones(2, 4, dtype=torch.bool), lengths=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"lengths in \[0, 4\]"):
        module(regions, words, lengths=torch.tensor([5, 2]))
    with pytest.raises(ValueError, match=r"regions of shape \(B, R, 6\)"):
        module(regions[..., :5], words)
    with pytest.raises(ValueError, match="same batch size"):
        module(regions[:1], words)
