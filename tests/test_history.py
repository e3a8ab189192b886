"""History: columns for plots, the best epoch, and a round trip through plain dicts."""

import pytest

from vitlab.training.history import History


def test_columns_best_epoch_and_round_trip():
    h = History(
        [{"epoch": 1, "val_accuracy": 0.5}, {"epoch": 2, "val_accuracy": 0.7}, {"epoch": 3, "val_accuracy": 0.7}],
        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}],
    )
    assert h.epoch_column("val_accuracy") == [0.5, 0.7, 0.7]
    assert h.step_column("loss") == [2.0, 1.5]
    assert h.best_epoch()["epoch"] == 2  # the earliest of equals
    assert History.from_dict(h.to_dict()) == h
    assert History().best_epoch() is None


def test_a_wrong_column_or_dict_names_what_there_is():
    with pytest.raises(KeyError, match=r"no epoch column 'val_acc'; the epoch rows have \['epoch', 'val_accuracy'\]"):
        History([{"epoch": 1, "val_accuracy": 0.5}]).epoch_column("val_acc")
    with pytest.raises(ValueError, match=r"keys \['epochs', 'steps'\]; got \['rows'\]"):
        History.from_dict({"rows": []})


def test_steps_are_stored_as_columns_and_rows_from_older_files_still_load():
    steps = [{"step": 1, "loss": 2.0, "lr": 0.1}, {"step": 2, "loss": 1.5, "lr": 0.2}]
    h = History([{"epoch": 1, "train_loss": 1.0}], steps)
    stored = h.to_dict()
    assert stored["steps"] == {"step": [1, 2], "loss": [2.0, 1.5], "lr": [0.1, 0.2]}
    assert stored["epochs"] == h.epochs
    assert History.from_dict(stored) == h
    assert History.from_dict({"epochs": h.epochs, "steps": h.steps}) == h  # as version 1 checkpoints hold them
    assert History.from_dict(History().to_dict()) == History()


def test_steps_whose_names_differ_stay_rows():
    h = History([], [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "note": 7}])
    assert h.to_dict()["steps"] == h.steps
    assert History.from_dict(h.to_dict()) == h


def test_step_columns_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match=r"step columns of one length; got lengths \{'step': 2, 'loss': 1\}"):
        History.from_dict({"epochs": [], "steps": {"step": [1, 2], "loss": [2.0]}})
