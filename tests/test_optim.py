"""The optimiser recipe: which parameters decay, and the warmup-then-cosine curve."""

import math

import pytest
import torch
from tiny_digits import tiny_vit

from vitlab.training.optim import WarmupCosine, make_optimizer, param_groups


def test_only_weight_matrices_decay():
    model = tiny_vit(patch_embed="conv")
    decay, keep = param_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert (decay["weight_decay"], keep["weight_decay"]) == (0.05, 0.0)
    assert decayed | kept == set(names.values()) and not decayed & kept
    assert {"cls_token.weight", "pos_embed.weight", "norm.weight", "norm.bias", "blocks.0.norm1.weight",
            "head.bias", "blocks.1.attn.qkv.bias", "patch_embed.proj.bias"} <= kept
    assert {"head.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "patch_embed.proj.weight"} <= decayed


def test_frozen_parameters_are_left_out():
    model = tiny_vit()
    model.head.weight.requires_grad_(False)
    decay, _ = param_groups(model, 0.05)
    assert all(p is not model.head.weight for p in decay["params"])


def test_warmup_rises_linearly_then_the_cosine_falls_to_zero():
    f = WarmupCosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1), f(2)] == [0.5, 1.0, 1.0]
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)
    assert WarmupCosine(5, 0)(0) == 1.0  # no warmup: start at the peak


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, total_steps=4\]; got 5"):
        WarmupCosine(4, 5)
    with pytest.raises(ValueError, match=r"warmup is a fraction of the total steps, in \[0, 1\); got 5"):
        make_optimizer(tiny_vit(), 1e-3, 0.05, total_steps=100, warmup=5)


def test_the_fused_adamw_takes_the_same_steps_as_the_plain_one():
    model = tiny_vit()
    optimizer, _ = make_optimizer(model, lr=1e-2, weight_decay=0.05, total_steps=10, warmup=0.0)
    assert optimizer.defaults["fused"]  # on a CPU
    plain_model = tiny_vit()
    plain_model.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW(param_groups(plain_model, 0.05), lr=1e-2)
    x = torch.randn(4, 1, 28, 28)
    for _ in range(3):
        for m, opt in ((model, optimizer), (plain_model, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), plain_model.parameters()):
        # Three steps of lr 1e-2 move a weight by up to 3e-2; the two kernels round differently, and
        # Adam's division by sqrt(v) magnifies that for near-zero gradients, so compare at 1e-4.
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not torch.equal(next(model.parameters()), next(tiny_vit().parameters()))  # the weights moved
