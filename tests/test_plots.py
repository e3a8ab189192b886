"""Plots: the live fit callback, history curves, predictions, confusion matrix, per-class table, mistakes grid."""

import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from tiny_digits import tiny_digits
from torch import nn

from vitlab.lab.plots import (
    LivePlot,
    confusion_matrix,
    per_class_accuracy,
    per_class_table,
    plot_accuracy,
    plot_confusion_matrix,
    plot_history,
    plot_misclassified,
    predict,
)
from vitlab.training.history import History


def _history(epochs: int = 3, steps_per_epoch: int = 4, validated: bool = True) -> History:
    h = History()
    for e in range(1, epochs + 1):
        for s in range(steps_per_epoch):
            step = (e - 1) * steps_per_epoch + s + 1
            h.steps.append({"step": step, "epoch": e, "loss": 2.0 / step, "lr": 1e-3 * step, "time": 0.1 * step})
        row = {"epoch": e, "step": e * steps_per_epoch, "train_loss": 1.0 / e, "train_accuracy": 0.3 * e,
               "n_train": 64, "lr": 1e-3, "time": 0.4 * e}
        if validated:
            row.update(val_loss=1.5 / e, val_accuracy=0.25 * e)
        h.epochs.append(row)
    return h


def test_plot_history_draws_the_columns_it_is_given():
    h = _history()
    fig = plot_history(h)
    loss_ax, acc_ax, lr_ax = fig.axes
    train_loss, val_loss = loss_ax.lines
    np.testing.assert_allclose(train_loss.get_ydata(), h.step_column("loss"))
    np.testing.assert_allclose(val_loss.get_xdata(), [4, 8, 12])  # drawn at the epoch's last step
    np.testing.assert_allclose(acc_ax.lines[1].get_ydata(), [0.25, 0.5, 0.75])
    np.testing.assert_allclose(lr_ax.lines[0].get_ydata(), h.step_column("lr"))
    assert "val 75.0%" in fig._suptitle.get_text()
    # without validation: no validation lines, and the title reports training accuracy
    fig = plot_history(_history(validated=False), fig)  # redrawn into the same figure
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 1 and len(fig.axes[1].lines) == 1
    assert "train 90.0%" in fig._suptitle.get_text()


def test_live_plot_redraws_at_most_every_interval_and_finish_draws_the_last():
    now = [0.0]
    live = LivePlot(min_interval=5.0, clock=lambda: now[0])
    h = _history(epochs=1)
    live(h)  # the first epoch is always drawn
    assert live.redraws == 1
    now[0] = 2.0
    h.epochs.append(dict(h.epochs[-1], epoch=2, step=8, val_accuracy=0.9))
    live(h)  # too soon after the previous one: skipped
    assert live.redraws == 1
    live.finish()  # but finish draws it
    assert live.redraws == 2
    assert "val 90.0%" in live.figure._suptitle.get_text()
    now[0] = 20.0
    live(h)
    assert live.redraws == 3
    with pytest.raises(ValueError, match="min_interval must be >= 0 seconds; got -1"):
        LivePlot(min_interval=-1)


def test_finish_without_any_epoch_draws_nothing():
    live = LivePlot()
    live.finish()
    assert live.redraws == 0


@pytest.mark.parametrize("x, expected, label", [
    ("step", [4, 8, 12], "optimizer steps"),
    ("images", [64, 128, 192], "training images seen"),  # the running sum of n_train
    ("time", [0.4, 0.8, 1.2], "training time (s)"),
])
def test_plot_accuracy_has_one_line_per_run_on_the_axis_asked_for(x, expected, label):
    a, b = _history(), _history(epochs=2)
    fig = plot_accuracy({"a": a, "b": b}, x=x)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["a", "b"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), expected)
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.25, 0.5])
    assert ax.get_xlabel() == label


def test_plot_accuracy_refuses_an_unknown_axis():
    with pytest.raises(ValueError, match=r"expected x to be one of 'step', 'images', 'time'; got 'epochs'"):
        plot_accuracy({"a": _history()}, x="epochs")


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    m = confusion_matrix(predicted, labels, num_classes=3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert m.sum() == len(labels)
    torch.testing.assert_close(per_class_accuracy(m), torch.tensor([0.5, 1.0, 2 / 3], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected labels in \[0, 2\]; got values from 0 to 3"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 3]), num_classes=3)
    with pytest.raises(ValueError, match=r"same shape \(M,\); got \(2,\) and \(3,\)"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), num_classes=3)


def test_per_class_table_names_the_most_common_mistake_and_handles_an_empty_class():
    m = torch.tensor([[8, 2, 0], [0, 0, 0], [1, 3, 6]])
    assert math.isnan(per_class_accuracy(m)[1])
    lines = per_class_table(m).splitlines()
    assert lines[1].split() == ["0", "10", "8", "80.00%", "1", "(2x)"]
    assert lines[2].split() == ["1", "0", "0", "-", "-"]
    assert lines[3].split() == ["2", "10", "6", "60.00%", "1", "(3x)"]
    assert lines[-1].split() == ["all", "20", "14", "70.00%"]
    with pytest.raises(ValueError, match=r"expected a square \(K, K\) confusion matrix; got \(2, 3\)"):
        per_class_accuracy(torch.zeros(2, 3))


def test_plot_confusion_matrix_writes_every_nonzero_count():
    m = torch.tensor([[5, 0], [2, 3]])
    fig = plot_confusion_matrix(m)
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["2", "3", "5"]
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[1.0, 0.0], [0.4, 0.6]])


def test_plot_misclassified_shows_only_mistakes_with_their_labels():
    images = torch.zeros(5, 1, 28, 28, dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 4, 5])
    predicted = torch.tensor([1, 7, 3, 9, 5])
    fig = plot_misclassified(images, labels, predicted, ncols=4)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["true 2 / pred 7", "true 4 / pred 9"]
    assert isinstance(plot_misclassified(images, labels, labels), Figure)  # no mistakes: a figure that says so
    with pytest.raises(ValueError, match="expected images"):
        plot_misclassified(images, labels[:3], predicted)


class _Brightness(nn.Module):
    """Predicts class k for images whose mean normalised pixel falls in the k-th bin; no weights that matter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images):  # (B, 1, H, W) -> (B, 10)
        mean = images.mean(dim=(1, 2, 3)) * self.scale  # (B,)
        return -(mean[:, None] - torch.linspace(-0.2, 2.2, 10)[None]).abs()


def test_predict_keeps_the_data_order_and_the_model_mode():
    data = tiny_digits(50)
    model = _Brightness().train()
    predicted, labels = predict(model, data, batch_size=16)
    assert predicted.shape == labels.shape == (50,) and predicted.dtype == torch.int64
    assert torch.equal(labels, data.labels)  # same order as the data, across several batches
    assert model.training  # mode restored
    assert confusion_matrix(predicted, labels).sum() == 50
