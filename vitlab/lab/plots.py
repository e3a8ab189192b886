"""Plots for a training run and for a classifier's mistakes.

    live = LivePlot()                                  # a fit callback: redraws after each epoch, in place
    history = fit(model, train, val, time_budget=120, callback=live)
    display(plot_history(history))                     # loss, accuracy and learning rate against the step
    display(plot_accuracy({"run": history}, x="images"))  # validation accuracy: one line per run
    predicted, labels = predict(model, test)
    matrix = confusion_matrix(predicted, labels)        # (K, K): rows the true class, columns the prediction
    print(per_class_table(matrix))
    display(plot_confusion_matrix(matrix))
    display(plot_misclassified(test.images, labels, predicted))

Every plotting function returns a matplotlib ``Figure`` built without pyplot (nothing is shown twice,
nothing is left open); ``display(fig)`` shows it in a notebook, ``fig.savefig`` writes it.

Legend: M images, B batch, H/W height/width, K classes.
"""

from __future__ import annotations

import io
import itertools
import math
import time
from typing import Callable, Mapping

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from ..training.batches import make_batches
from ..training.devices import device_of
from ..training.history import History

# --- Training curves -----------------------------------------------------------------------------


def plot_history(history: History, fig: Figure | None = None) -> Figure:
    """History -> Figure of three panels against the optimizer step: loss, accuracy, learning rate.

    Loss: every step's training loss (the minimised one, label smoothing included) and, where the run
    was validated, the plain cross-entropy on the validation data after each epoch. Accuracy: training
    (on augmented batches, while the weights changed) and validation, per epoch. Learning rate: per step.
    Draws into ``fig`` (cleared first) when given, else a new 12 x 3.2 inch figure.
    """
    if fig is None:
        fig = Figure(figsize=(12, 3.2), layout="constrained")
    else:
        fig.clear()
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    if history.steps:
        steps = history.step_column("step")
        loss_ax.plot(steps, history.step_column("loss"), lw=0.8, alpha=0.7, label="train, per step")
        lr_ax.plot(steps, history.step_column("lr"), color="tab:purple")
    validated = [row for row in history.epochs if "val_accuracy" in row]
    if history.epochs:
        epoch_steps = history.epoch_column("step")
        acc_ax.plot(epoch_steps, history.epoch_column("train_accuracy"), "o-", ms=3, label="train")
    if validated:
        val_steps = [row["step"] for row in validated]
        loss_ax.plot(val_steps, [row["val_loss"] for row in validated], "o-", ms=3, label="validation")
        acc_ax.plot(val_steps, [row["val_accuracy"] for row in validated], "o-", ms=3, label="validation")
    loss_ax.set(title="loss", xlabel="step")
    acc_ax.set(title="accuracy", xlabel="step", ylim=(0, 1))
    lr_ax.set(title="learning rate", xlabel="step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    for ax in (loss_ax, acc_ax):
        if ax.lines:
            ax.legend(fontsize=8)
    if history.epochs:
        last = history.epochs[-1]
        shown = f"val {last['val_accuracy']:.1%}" if "val_accuracy" in last else f"train {last['train_accuracy']:.1%}"
        fig.suptitle(f"epoch {last['epoch']}, step {last['step']}, {last['time']:.0f} s: {shown}", fontsize=10)
    return fig


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """Figure -> its PNG bytes, what ``LivePlot`` and the explorer put on screen (no 'Software' stamp, so
    the same figure gives the same bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


class LivePlot:
    """A ``fit`` callback: after an epoch, redraw ``plot_history`` in one place of the notebook's output.

    ``fit(..., callback=LivePlot())``. The figure is shown once, then replaced in place (an IPython
    display handle), so a progress bar printed in the same cell stays where it is. Redraws come at
    most every ``min_interval`` seconds: drawing takes a fraction of a second, and ``fit``'s time budget
    counts it. ``finish()`` draws the last history it was given, whatever the interval.
    ``redraws`` counts the figures drawn; ``figure`` is the matplotlib Figure.
    """

    def __init__(self, min_interval: float = 3.0, figsize: tuple[float, float] = (12, 3.2), dpi: int = 80,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0 seconds; got {min_interval}")
        self.min_interval = min_interval
        self.figure = Figure(figsize=figsize, layout="constrained")
        self.dpi = dpi
        self.clock = clock
        self.redraws = 0
        self._last_draw = -math.inf
        self._history: History | None = None
        self._handle = None

    def __call__(self, history: History) -> None:
        self._history = history
        if self.clock() - self._last_draw >= self.min_interval:
            self._draw()

    def finish(self) -> None:
        """Draw the latest history now (the last epoch may have come too soon after the previous redraw)."""
        if self._history is not None:
            self._draw()

    def _draw(self) -> None:
        from IPython.display import Image, display

        plot_history(self._history, self.figure)
        image = Image(data=figure_png(self.figure, self.dpi), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)  # None outside IPython, where it only prints
        else:
            self._handle.update(image)
        self.redraws += 1
        self._last_draw = self.clock()


ACCURACY_AXES = {  # plot_accuracy's x: what each epoch row is placed at, and the axis label
    "step": "optimizer steps",
    "images": "training images seen",
    "time": "training time (s)",
}


def plot_accuracy(
    runs: Mapping[str, History], x: str = "step", column: str = "val_accuracy", ax=None, title: str | None = None
) -> Figure:
    """{name: History} -> Figure: ``column`` of each run's epoch rows against ``x``, one line per run.

    ``x`` is "step" (the optimizer steps so far), "images" (the training images seen so far: the running
    sum of ``n_train``) or "time" (seconds of training). Steps and images do not depend on the machine;
    time does. Each run's epoch rows need ``step``, ``n_train`` or ``time``, and ``column``. Draws on ``ax``
    when given (and returns its figure), else on a new figure.
    """
    if x not in ACCURACY_AXES:
        raise ValueError(f"expected x to be one of {', '.join(map(repr, ACCURACY_AXES))}; got {x!r}")
    if ax is None:
        fig = Figure(figsize=(6, 3.8), layout="constrained")
        ax = fig.subplots()
    for name, history in runs.items():
        where = list(itertools.accumulate(history.epoch_column("n_train"))) if x == "images" else \
            history.epoch_column(x)
        ax.plot(where, history.epoch_column(column), "o-", ms=3, label=name)
    ax.set(xlabel=ACCURACY_AXES[x], ylabel=column.replace("_", " "), ylim=(0, 1))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")  # accuracy curves rise to the upper right
    return ax.figure


# --- Mistakes ------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, data, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """dataset -> (predicted (M,), labels (M,)) int64 on the CPU, in the data's order, the model in eval mode.

    ``data`` is what ``evaluate`` takes: a ``DigitDataset`` or ``(images, labels)`` (normalised like
    training by ``vitlab.training.batches``) or a DataLoader. The model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = device_of(model)
    predicted, labels = [], []
    try:
        for images, batch_labels in make_batches(data, batch_size, device=device):
            predicted.append(model(images.to(device)).argmax(dim=-1).cpu())  # (B,)
            labels.append(torch.as_tensor(batch_labels).cpu())
    finally:
        model.train(was_training)
    if not predicted:
        raise ValueError("expected at least one image to predict; got an empty dataset")
    return torch.cat(predicted), torch.cat(labels).to(torch.int64)


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    """(M,), (M,) -> (K, K) int64: entry [t, p] counts the images of true class t predicted as p."""
    predicted, labels = torch.as_tensor(predicted).cpu().long(), torch.as_tensor(labels).cpu().long()
    if predicted.shape != labels.shape or predicted.ndim != 1:
        raise ValueError(
            f"expected predicted and labels of the same shape (M,); got {tuple(predicted.shape)} and "
            f"{tuple(labels.shape)}"
        )
    for name, values in (("predicted", predicted), ("labels", labels)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"expected {name} in [0, {num_classes - 1}]; got values from {values.min()} to {values.max()}"
            )
    return torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_accuracy(matrix: torch.Tensor) -> torch.Tensor:
    """(K, K) confusion matrix -> (K,) float: the fraction of each true class predicted right (NaN for no images)."""
    matrix = torch.as_tensor(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square (K, K) confusion matrix; got {tuple(matrix.shape)}")
    totals = matrix.sum(dim=1).double()
    return matrix.diagonal().double() / totals  # 0 / 0 gives NaN: a class with no images has no accuracy


def per_class_table(matrix: torch.Tensor, class_names: list[str] | None = None) -> str:
    """(K, K) confusion matrix -> a text table: per true class its images, correct, accuracy and most common mistake."""
    matrix = torch.as_tensor(matrix)
    accuracy = per_class_accuracy(matrix)
    names = class_names if class_names is not None else [str(k) for k in range(len(matrix))]
    if len(names) != len(matrix):
        raise ValueError(f"expected {len(matrix)} class names; got {len(names)}")
    lines = [f"{'class':>5} {'images':>7} {'correct':>8} {'accuracy':>9}  most often taken for"]
    for k, name in enumerate(names):
        wrong = matrix[k].clone()
        wrong[k] = 0
        confused = f"{names[int(wrong.argmax())]} ({int(wrong.max())}x)" if wrong.sum() else "-"
        acc = "-" if math.isnan(accuracy[k]) else f"{accuracy[k]:.2%}"
        lines.append(f"{name:>5} {int(matrix[k].sum()):>7} {int(matrix[k, k]):>8} {acc:>9}  {confused}")
    total, right = int(matrix.sum()), int(matrix.diagonal().sum())
    lines.append(f"{'all':>5} {total:>7} {right:>8} {right / max(total, 1):>9.2%}")
    return "\n".join(lines)


def plot_confusion_matrix(matrix: torch.Tensor, ax=None, class_names: list[str] | None = None) -> Figure:
    """(K, K) counts -> Figure: each row coloured by its share (row sums to 1), every non-zero count written in."""
    matrix = torch.as_tensor(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square (K, K) confusion matrix; got {tuple(matrix.shape)}")
    if ax is None:
        fig = Figure(figsize=(5.2, 4.6), layout="constrained")
        ax = fig.subplots()
    k = len(matrix)
    counts = matrix.cpu().numpy()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # (K, K), rows sum to 1
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for t in range(k):
        for p in range(k):
            if counts[t, p]:
                ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=7,
                        color="white" if shares[t, p] > 0.5 else "black")
    names = class_names if class_names is not None else [str(i) for i in range(k)]
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true")
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return ax.figure


def plot_misclassified(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, max_images: int = 24, ncols: int = 8
) -> Figure:
    """(M, H, W) or (M, 1, H, W), (M,), (M,) -> Figure: the first ``max_images`` mistakes, titled 'true 4 / pred 9'.

    The images are drawn as they are (uint8 or float), dark on light. With no mistakes the figure says so.
    """
    images, labels, predicted = (torch.as_tensor(t).cpu() for t in (images, labels, predicted))
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or not len(images) == len(labels) == len(predicted):
        raise ValueError(
            f"expected images (M, H, W) or (M, 1, H, W) and M labels and predictions; got {tuple(images.shape)}, "
            f"{tuple(labels.shape)}, {tuple(predicted.shape)}"
        )
    wrong = torch.nonzero(predicted != labels).flatten()[:max_images]
    if len(wrong) == 0:
        fig = Figure(figsize=(4, 1), layout="constrained")
        fig.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return fig
    nrows = math.ceil(len(wrong) / ncols)
    fig = Figure(figsize=(1.3 * ncols, 1.5 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i].float().numpy(), cmap="gray_r")
        ax.set_title(f"true {int(labels[i])} / pred {int(predicted[i])}", fontsize=8, color="tab:red")
    return fig
