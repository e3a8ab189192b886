"""Training: the loss falls, seeds repeat, means are weighted by batch size, NaN stops the run, budgets end it."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from tiny_digits import tiny_digits, tiny_vit
from torch import nn

from vitlab.training import loop as training
from vitlab.training.budget import plan_steps
from vitlab.training.checkpoint import load_checkpoint
from vitlab.training.loop import evaluate, fit, train_one_epoch

FAST = dict(batch_size=32, progress=False)


def test_a_short_fit_lowers_the_loss_and_beats_chance():
    model = tiny_vit()
    history = fit(model, tiny_digits(256), tiny_digits(128, seed=1), epochs=3, lr=5e-3, batch_size=16, progress=False)
    losses = history.step_column("loss")
    assert len(losses) == 3 * 16  # 256 images / 16 per batch, 3 epochs
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4
    rows = history.epochs
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert rows[-1]["val_accuracy"] > 0.3  # chance is 0.1
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert [row["step"] for row in rows] == [16, 32, 48]
    assert not model.training  # fit leaves the model ready for inference
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # no longer views into the optimizer's buffers


def test_the_same_seed_gives_the_same_history_and_another_seed_does_not():
    runs = []
    for seed in (0, 0, 1):
        model = tiny_vit(drop_path=0.1)  # stochastic depth draws from the global generator: seeded too
        history = fit(model, tiny_digits(96), epochs=2, seed=seed, **FAST)
        runs.append((history.step_column("loss"), model.state_dict()))
    (losses_a, weights_a), (losses_b, weights_b), (losses_c, _) = runs
    assert losses_a == losses_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert losses_a != losses_c


def test_warmup_then_cosine_shapes_the_recorded_learning_rates():
    history = fit(tiny_vit(), tiny_digits(64), epochs=5, lr=1e-3, warmup=0.2, batch_size=16, progress=False)
    lrs = history.step_column("lr")  # 20 steps, 4 of warmup
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])  # the cosine starts at the peak
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.5e-3 * (1 + math.cos(math.pi * 15 / 16)))  # 0 would be a wasted step


def test_evaluate_weights_each_batch_by_its_size():
    model = tiny_vit().eval()
    data = tiny_digits(5)
    got = evaluate(model, data, batch_size=2)  # batches of 2, 2 and 1
    images = (data.images.float().unsqueeze(1) / 255 - 0.1307) / 0.3081
    with torch.no_grad():
        logits = model(images)
    assert got["n"] == 5
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, data.labels).item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == data.labels).float().mean().item())
    per_image = F.cross_entropy(logits, data.labels, reduction="none")
    unweighted = (per_image[:2].mean() + per_image[2:4].mean() + per_image[4]) / 3
    assert got["loss"] != pytest.approx(unweighted.item(), rel=1e-5)  # the bug this guards against differs


def test_train_one_epoch_weights_a_short_last_batch_correctly():
    model = tiny_vit()
    x = torch.randn(4, 1, 28, 28)
    y = torch.tensor([0, 1, 2, 3])
    model.eval()  # same numbers as the train-mode pass: no dropout in this model
    with torch.no_grad():
        logits = model(x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay put: the hand computation holds
    got = train_one_epoch(model, [(x[:3], y[:3]), (x[3:], y[3:])], optimizer)
    assert (got["n"], got["steps"]) == (4, 2)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert got["accuracy"] == (logits.argmax(-1) == y).float().mean().item()


def test_a_non_finite_loss_names_epoch_step_and_value_before_touching_the_weights():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = (torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    bad = (torch.full((2, 1, 28, 28), float("nan")), torch.tensor([0, 1]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at epoch 2, step 13"):
        train_one_epoch(model, [good, good, bad], optimizer, epoch=2, first_step=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_stops_at_a_nan_with_the_step_it_happened_at():
    model = tiny_vit()
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 1 "):
        fit(model, tiny_digits(64), epochs=1, **FAST)


def test_checkpoint_dir_keeps_last_and_the_best_validation_epoch(tmp_path):
    history = fit(tiny_vit(), tiny_digits(128), tiny_digits(64, seed=1), epochs=3, lr=3e-3,
                  checkpoint_dir=tmp_path, **FAST)
    _, last = load_checkpoint(tmp_path / "last.pt")
    _, best = load_checkpoint(tmp_path / "best.pt")
    assert len(last["history"]["epochs"]) == 3
    best_epoch = history.best_epoch()
    assert len(best["history"]["epochs"]) == best_epoch["epoch"]
    assert best["history"]["epochs"][-1]["val_accuracy"] == best_epoch["val_accuracy"]


def test_a_time_budget_plans_the_schedule_and_ends_the_run_near_the_budget(tmp_path):
    start = time.perf_counter()
    history = fit(tiny_vit(), tiny_digits(64), time_budget=2.0, checkpoint_dir=tmp_path, **FAST)
    took = time.perf_counter() - start
    assert took < 2.0 + 1.5  # the epoch in progress may end a step late, never much later
    _, checkpoint = load_checkpoint(tmp_path / "last.pt")
    planned = checkpoint["extra"]["fit"]["total_steps"]
    assert planned > 2
    steps = len(history.steps)
    assert steps == planned or took >= 2.0  # it stopped because the plan was done or the time was up
    assert steps == history.epochs[-1]["step"]


def test_plan_steps_counts_validation_time_into_each_epoch():
    assert plan_steps(100.0, 0.1, 0.0, 10) == 1000
    assert plan_steps(100.0, 0.1, 1.0, 10) == 500  # an epoch costs 10 x 0.1 + 1 s: 50 epochs of 10 steps
    assert plan_steps(0.01, 0.1, 0.0, 10) == 1


def test_fit_needs_epochs_or_a_time_budget():
    with pytest.raises(ValueError, match="epochs or time_budget"):
        fit(tiny_vit(), tiny_digits(8))


def test_compile_wraps_the_model_only_when_asked(monkeypatch):
    compiled = []

    def fake_compile(module, **kwargs):  # compilation itself is slow and tested by torch
        compiled.append(module)
        return module

    monkeypatch.setattr(training.torch, "compile", fake_compile)
    model = tiny_vit()
    eager = fit(model, tiny_digits(40), epochs=1, **{**FAST, "batch_size": 16})
    assert compiled == []
    assert eager.epochs[0]["n_train"] == 40  # 16 + 16 + 8
    compiled_run = fit(model, tiny_digits(40), epochs=1, compile=True, **{**FAST, "batch_size": 16})
    assert compiled == [model]
    assert compiled_run.epochs[0]["n_train"] == 32  # one batch shape for the compiled graph: the 8 are left out
    smaller = fit(model, tiny_digits(10), epochs=1, compile=True, **{**FAST, "batch_size": 16})
    assert smaller.epochs[0]["n_train"] == 10  # less than one batch: it is the only shape, nothing is left out


def test_a_dataloader_trains_as_well_as_in_memory_data():
    data = tiny_digits(64)
    images = (data.images.float().unsqueeze(1) / 255 - 0.1307) / 0.3081
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, data.labels), batch_size=16)
    history = fit(tiny_vit(), loader, loader, epochs=2, progress=False)
    assert [row["n_train"] for row in history.epochs] == [64, 64]
    assert math.isfinite(history.epochs[-1]["val_loss"])


def test_ema_averages_the_weights_with_a_warmup_ramp_and_copies_buffers():
    model = tiny_vit()
    average = training.EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    average.update(model)  # first update: decay min(0.9, 2 / 11)
    d = 2 / (training.EMA_WARMUP + 1)
    for name, value in average.model.state_dict().items():
        expected = d * start[name] + (1 - d) * model.state_dict()[name]
        torch.testing.assert_close(value, expected)
    assert not any(p.requires_grad for p in average.model.parameters())
    with pytest.raises(ValueError, match=r"ema decay must be in \(0, 1\).*got 1.0"):
        training.EMA(model, 1.0)


def test_ema_follows_the_state_dict_and_a_replaced_parameter():
    model = tiny_vit(window=3)  # a non-persistent buffer (the window mask), left out as state_dict leaves it out
    average = training.EMA(model, decay=0.5)
    for step in range(3):
        before = {k: v.clone() for k, v in average.model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if step == 1:  # a module takes a new parameter object, as set_image_size does
            model.head.weight = nn.Parameter(torch.full_like(model.head.weight, 3.0))
        average.update(model)
        d = min(0.5, (1 + average.updates) / (training.EMA_WARMUP + average.updates))
        for name, value in average.model.state_dict().items():
            torch.testing.assert_close(value, d * before[name] + (1 - d) * model.state_dict()[name])
    assert set(average.model.state_dict()) == set(model.state_dict())
    with pytest.raises(ValueError, match="expected the model this average was made from"):
        average.update(tiny_vit(depth=3))


def test_fit_with_ema_validates_saves_and_returns_the_average(tmp_path):
    data, val = tiny_digits(64), tiny_digits(32, seed=1)
    raw = tiny_vit()
    fit(raw, data, epochs=2, ema=None, **FAST)
    averaged = tiny_vit()
    history = fit(averaged, data, val, epochs=2, ema=0.9, checkpoint_dir=tmp_path, **FAST)
    assert any(not torch.equal(v, averaged.state_dict()[k]) for k, v in raw.state_dict().items())
    assert history.epochs[-1]["val_accuracy"] == evaluate(averaged, val)["accuracy"]  # validated: the average
    saved, checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in averaged.state_dict().items())
    train_weights = checkpoint["extra"]["fit"]["train_weights"]  # the raw weights, kept to resume
    assert all(torch.equal(v, train_weights[k]) for k, v in raw.state_dict().items())
