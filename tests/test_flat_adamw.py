"""FlatAdamW: the fused AdamW's steps, number for number, with one update per parameter group."""

import io

import pytest
import torch
import torch.nn.functional as F
from tiny_digits import tiny_vit
from vitlab.flat_adamw import FlatAdamW
from vitlab.optim import param_groups


def pair(lr=1e-2, weight_decay=0.05, **options):
    """(model, FlatAdamW), (an identical model, fused torch AdamW), both on the decay/no-decay groups
    and with the same ``options`` (amsgrad, ...)."""
    torch.manual_seed(0)
    model, twin = tiny_vit(), tiny_vit()
    twin.load_state_dict(model.state_dict())
    flat = FlatAdamW(param_groups(model, weight_decay), lr=lr, **options)
    plain = torch.optim.AdamW(param_groups(twin, weight_decay), lr=lr, fused=True, **options)
    return (model, flat), (twin, plain)


def train(model, optimizer, steps, seed=1, skip=()):
    """``steps`` updates on fixed random batches; parameters named in ``skip`` get no gradient."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(4, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (4,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for name, p in model.named_parameters():
            if name in skip:
                p.grad = None
        optimizer.step()


def assert_same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0, msg=name)


def shares_storage(model):
    pointers = [p.untyped_storage().data_ptr() for p in model.parameters()]
    return len(set(pointers)) < len(pointers)


def test_steps_equal_the_fused_adamw_exactly_and_the_parameters_share_one_buffer_per_group():
    (model, flat), (twin, plain) = pair()
    train(model, flat, 4)
    train(twin, plain, 4)
    assert_same(model, twin)
    assert shares_storage(model)
    decay, keep = flat.param_groups
    bases = {p.untyped_storage().data_ptr() for p in decay["params"]}
    assert len(bases) == 1 and bases != {p.untyped_storage().data_ptr() for p in keep["params"]}
    state = flat.state_dict()["state"]
    assert all(float(s["step"]) == 4 for s in state.values()) and len(state) == len(list(model.parameters()))


def test_a_learning_rate_schedule_reaches_the_flat_update():
    (model, flat), (twin, plain) = pair()
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (flat, plain)]
    for _ in range(3):
        train(model, flat, 1)
        train(twin, plain, 1)
        for s in schedules:
            s.step()
    assert_same(model, twin)


def test_a_parameter_without_a_gradient_is_skipped_as_adamw_skips_it_and_the_counts_then_differ():
    (model, flat), (twin, plain) = pair()
    skip = {"head.weight"}
    train(model, flat, 2)
    train(twin, plain, 2)
    train(model, flat, 2, seed=2, skip=skip)
    train(twin, plain, 2, seed=2, skip=skip)
    train(model, flat, 2, seed=3)
    train(twin, plain, 2, seed=3)
    assert_same(model, twin)
    counts = {name: float(flat.state[p]["step"]) for name, p in model.named_parameters()}
    assert counts["head.weight"] == 4 and counts["head.bias"] == 6


def test_the_state_dict_loads_into_plain_adamw_and_back_and_training_goes_on_alike():
    (model, flat), (twin, plain) = pair()
    train(model, flat, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": flat.state_dict()}, buffer)

    def saved():  # a fresh copy each time: a loaded optimizer updates the loaded tensors in place
        buffer.seek(0)
        return torch.load(buffer)

    checkpoint = saved()
    twin.load_state_dict(checkpoint["model"])
    plain.load_state_dict(checkpoint["optimizer"])
    train(twin, plain, 2, seed=5)
    # ... and a fresh FlatAdamW takes the plain optimizer's state back
    checkpoint = saved()
    back_model = tiny_vit()
    back_model.load_state_dict(checkpoint["model"])
    back = FlatAdamW(param_groups(back_model, 0.05), lr=1e-2)
    back.load_state_dict(checkpoint["optimizer"])
    train(back_model, back, 2, seed=5)
    assert_same(back_model, twin)
    train(model, flat, 2, seed=5)
    assert_same(model, twin)


def test_parameters_moved_behind_its_back_are_flattened_afresh():
    (model, flat), (twin, plain) = pair()
    train(model, flat, 2)
    train(twin, plain, 2)
    model.to(torch.float64).to(torch.float32)  # every parameter gets new storage
    assert not shares_storage(model)
    train(model, flat, 2, seed=2)
    train(twin, plain, 2, seed=2)
    assert_same(model, twin)
    assert shares_storage(model)


def test_unflatten_gives_every_parameter_and_moment_its_own_storage_and_changes_no_value():
    (model, flat), (twin, plain) = pair()
    train(model, flat, 2)
    train(twin, plain, 2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flat.unflatten()
    assert not shares_storage(model)
    moments = [s["exp_avg"].untyped_storage().data_ptr() for s in flat.state.values()]
    assert len(set(moments)) == len(moments)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
    train(model, flat, 2, seed=2)
    train(twin, plain, 2, seed=2)
    assert_same(model, twin)


def test_a_closure_takes_adamw_own_path_with_the_same_result():
    (model, flat), (twin, plain) = pair()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for m, opt in ((model, flat), (twin, plain)):
        def closure(m=m, opt=opt):
            opt.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        for _ in range(2):
            opt.step(closure)
        train(m, opt, 2)
    assert_same(model, twin)


def test_a_compiled_model_sees_the_flat_updates():
    (model, flat), (twin, plain) = pair()
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    losses = []
    for m, opt in ((torch.compile(model), flat), (torch.compile(twin), plain)):
        run = []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1] and losses[0][2] != losses[0][0]  # the weights the graph reads moved
    assert_same(model, twin)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), atol=1e-5, rtol=0)


def test_amsgrad_groups_go_tensor_by_tensor_and_match_adamw():
    (model, flat), (twin, plain) = pair(amsgrad=True)
    train(model, flat, 3)
    train(twin, plain, 3)
    assert_same(model, twin)
    assert not shares_storage(model)


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_weight_decay_is_applied_per_group(weight_decay):
    (model, flat), (twin, plain) = pair(weight_decay=weight_decay)
    train(model, flat, 3)
    train(twin, plain, 3)
    assert_same(model, twin)
