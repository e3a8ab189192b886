"""One optimizer step: what it returns, that it is the step written out by hand, clipping, and a
non-finite loss stopped before it reaches the weights. And the device a model lives on."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny_digits import tiny_vit
from torch import nn

from vitlab.training.devices import device_of
from vitlab.training.optim import adamw, param_groups
from vitlab.training.step import train_step


def batch(seed: int = 0, n: int = 6):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_train_step_is_the_step_written_out_and_returns_the_loss_before_the_update_and_the_correct_count():
    torch.manual_seed(0)
    model = tiny_vit()
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    images, labels = batch()
    optimizer = adamw(param_groups(model, 0.05), lr=1e-2)
    reference_optimizer = adamw(param_groups(reference, 0.05), lr=1e-2)

    logits = reference(images)
    loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
    reference_optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    reference_optimizer.step()

    value, correct = train_step(model, model, images, labels, optimizer, label_smoothing=0.1, clip_grad=0.5)
    assert value == pytest.approx(loss.item(), rel=1e-6)
    assert correct == (logits.argmax(-1) == labels).sum().item()
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)
    assert not torch.equal(model.head.weight, initial.head.weight)  # and the step did move them


def test_train_step_clips_the_gradient_norm_before_the_update():
    torch.manual_seed(0)
    model = tiny_vit()
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the (clipped) gradient
    train_step(model, model, images, labels, optimizer, clip_grad=1e-3)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_a_non_finite_loss_raises_with_where_it_happened_and_touches_nothing():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = batch()
    images[0, 0, 0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # 0 * nan would still write nan
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at epoch 3, step 7"):
        train_step(model, model, images, labels, optimizer, where=lambda: "epoch 3, step 7")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_device_of_is_the_parameters_device_and_a_model_without_parameters_is_refused():
    assert device_of(tiny_vit()) == torch.device("cpu")
    with pytest.raises(ValueError, match="expected a model with parameters.*got a ReLU with none"):
        device_of(nn.ReLU())
