"""Training: one epoch of AdamW steps, evaluation, and ``fit``, which runs the whole recipe.

Every mean that comes back (loss, accuracy) is weighted by batch size, so a smaller last batch counts
for its images and no more. In-memory data is batched by ``vitlab.training.batches``; a DataLoader is used as it
is. How a time budget becomes a schedule is told in ``vitlab.training.budget``.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..model.config import check_bool, check_range, in_range
from .batches import check_augment, make_batches, num_images
from .budget import plan_steps, probe_batches, time_steps
from .checkpoint import check_writable, load_checkpoint, save_checkpoint, set_rng_state
from .devices import device_of
from .history import History
from .optim import make_optimizer
from .precision import check_precision
from .step import check_clip_grad, check_label_smoothing, train_step

# fit's arguments that shape the training curve: saved in its checkpoints, compared on resume. A new one
# goes here, and into RECIPE_ADDED with the value that older checkpoints trained with.
RECIPE_KEYS = ("batch_size", "lr", "weight_decay", "warmup", "label_smoothing", "clip_grad", "augment", "elastic",
               "ema", "seed", "precision")
# Settings newer than some checkpoints -> what those checkpoints trained with.
RECIPE_ADDED = {"elastic": 0.0, "precision": "fp32"}
EMA_DECAY = 0.999  # fit's default weight averaging (see EMA): about the last 1 / (1 - 0.999) = 1,000 steps
EMA_WARMUP = 10  # the average's decay ramps as (1 + t) / (EMA_WARMUP + t) over its first updates, up to ``decay``
MAX_SEED = 2**32 - 1  # numpy's generators take seeds in [0, 2**32 - 1]


def check_model(model) -> None:
    """Raise ValueError unless ``model`` is an nn.Module (a class, a state dict or a path is not one)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, e.g. a vitlab.ViT; got {type(model).__name__}")


def check_seed(seed: int) -> None:
    """Raise ValueError unless ``seed`` is an int in [0, 2**32 - 1], as every generator accepts."""
    check_range("seed", seed, integer=True, low=0, high=MAX_SEED)


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's generators (every CUDA device too) and make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def train_one_epoch(
    model: nn.Module,
    batches: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    label_smoothing: float = 0.0,
    clip_grad: float | None = None,
    precision: str = "fp32",
    epoch: int = 1,
    first_step: int = 0,
    forward: Callable | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """batches of (images, labels) -> {"loss", "accuracy", "n", "steps"}: one optimizer step per batch.

    ``loss`` (the minimised, label-smoothed cross-entropy) and ``accuracy`` are means over the ``n``
    images, each batch weighted by its size. ``forward`` replaces ``model(images)`` (a compiled model);
    ``on_step`` gets {"step", "epoch", "loss", "lr", "n"} after each step, ``step`` counting on from
    ``first_step``. Raises ``FloatingPointError`` naming the epoch, step and value of a non-finite loss,
    before that loss can touch the weights. Arguments out of range (``label_smoothing`` in [0, 1),
    ``clip_grad`` > 0 or None, ``epoch`` >= 1, ``first_step`` >= 0) raise ValueError before any step.
    """
    check_model(model)
    check_label_smoothing(label_smoothing)
    check_clip_grad(clip_grad)
    check_precision(precision)
    check_range("epoch", epoch, integer=True, low=1)
    check_range("first_step", first_step, integer=True, low=0)
    model.train()
    forward = model if forward is None else forward
    device = device_of(model)
    loss_sum, correct, n, step = 0.0, 0, 0, first_step
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        step += 1
        lr = optimizer.param_groups[0]["lr"]
        value, right = train_step(model, forward, images, labels, optimizer, label_smoothing=label_smoothing,
                                  clip_grad=clip_grad, precision=precision,
                                  where=lambda: f"epoch {epoch}, step {step} (lr {lr:.3g})")
        if scheduler is not None:
            scheduler.step()
        size = len(labels)
        loss_sum += value * size
        correct += right
        n += size
        if on_step is not None:
            on_step({"step": step, "epoch": epoch, "loss": value, "lr": lr, "n": size})
    if n == 0:
        raise ValueError("expected at least one batch to train on; got an empty iterable")
    return {"loss": loss_sum / n, "accuracy": correct / n, "n": n, "steps": step - first_step}


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 512) -> dict:
    """dataset or DataLoader -> {"loss", "accuracy", "n"}: cross-entropy and accuracy over every image.

    Runs in eval mode (dropout and stochastic depth off) and restores the model's mode afterwards.
    The loss is summed per image and divided by ``n``, so the batch size cannot bias it. ``batch_size``:
    an int >= 1.
    """
    check_model(model)
    check_range("batch_size", batch_size, integer=True, low=1)
    was_training = model.training
    model.eval()
    device = device_of(model)
    loss_sum, correct, n = 0.0, 0, 0
    try:
        for images, labels in make_batches(data, batch_size, device=device):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)  # (B, num_classes)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            n += len(labels)
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("expected at least one image to evaluate; got an empty dataset")
    return {"loss": loss_sum / n, "accuracy": correct / n, "n": n}


class EMA:
    """An exponential moving average of a model's weights: a copy of the model, in eval mode, for evaluation.

    After update t the copy holds ``w_ema <- d * w_ema + (1 - d) * w``, ``d = min(decay, (1 + t) / (EMA_WARMUP + t))``:
    the ramp keeps the random initial weights from lingering in the average for the first ``1 / (1 - decay)``
    steps. Buffers (and any non-float entry) are copied as they are. With a high learning rate the raw
    weights jitter around a good point; their average sits nearer to it, so it scores higher mid-run.
    Every entry of the model's ``state_dict`` takes part, and no other tensor.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not in_range(decay, low=0, high=1, low_open=True, high_open=True):
            raise ValueError(f"ema decay must be in (0, 1), e.g. 0.999; got {decay!r}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self._holders: tuple[nn.Module, list] | None = None  # (model, its (module, my module) pairs), see _pairs

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """-> (my tensors, ``model``'s tensors), paired as ``state_dict`` pairs them, without building one.

        A ``state_dict`` walks every module (every Tap too) on each call; the modules that hold tensors
        are found once, and their tensors are read afresh each time, so a parameter that a module
        replaces (``set_image_size``) is the one averaged from then on.
        """
        if self._holders is None or self._holders[0] is not model:
            names = [name for name, _ in model.named_modules()]
            if names != [name for name, _ in self.model.named_modules()]:
                raise ValueError(
                    f"expected the model this average was made from ({type(self.model).__name__}, "
                    f"{len(list(self.model.modules()))} modules); got a {type(model).__name__} of another structure"
                )
            pairs = [
                (theirs, mine) for theirs, mine in zip(model.modules(), self.model.modules())
                if theirs._parameters or theirs._buffers
            ]
            self._holders = (model, pairs)
        mine, theirs = [], []
        for their_module, my_module in self._holders[1]:
            skip = their_module._non_persistent_buffers_set
            for table, my_table in ((their_module._parameters, my_module._parameters),
                                    (their_module._buffers, my_module._buffers)):
                for name, value in table.items():
                    if value is not None and name not in skip:
                        theirs.append(value)
                        mine.append(my_table[name])
        return mine, theirs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards ``model``'s current weights."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (EMA_WARMUP + self.updates))
        mine, theirs = self._pairs(model)
        floats = [i for i, value in enumerate(theirs) if value.is_floating_point()]
        # One fused call over every float tensor, not one small op per tensor.
        torch._foreach_lerp_([mine[i] for i in floats], [theirs[i] for i in floats], 1.0 - decay)
        for my_value, value in zip(mine, theirs):
            if not value.is_floating_point():
                my_value.copy_(value)


def _until(batches: Iterable, deadline: float) -> Iterator:
    """Yield batches while the clock is before ``deadline`` (the first one always)."""
    for i, batch in enumerate(batches):
        if i and time.perf_counter() >= deadline:
            return
        yield batch


def _recipe_warnings(saved: dict, recipe: dict) -> None:
    saved = {**RECIPE_ADDED, **saved}
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {recipe[k]!r}" for k in RECIPE_KEYS if saved.get(k) != recipe[k]]
    if changed:
        warnings.warn(
            "resuming with settings that differ from the checkpoint's (" + "; ".join(changed) + "); the optimizer "
            "and schedule continue from their saved state, so this is not the run that was interrupted",
            stacklevel=3,
        )


def _fit_state(checkpoint: dict, path) -> dict:
    state = (checkpoint.get("extra") or {}).get("fit")
    if state is None or checkpoint.get("optimizer") is None or checkpoint.get("scheduler") is None:
        raise ValueError(
            f"{path} holds no training state to resume from (no optimizer, schedule or batch order); "
            "resume from the last.pt that fit writes into checkpoint_dir"
        )
    return state


def check_fit_arguments(arguments: dict) -> None:
    """Raise ValueError naming the first of ``fit``'s arguments (a dict of them) that is out of range."""
    a = arguments
    check_model(a["model"])
    if a["epochs"] is None and a["time_budget"] is None:
        raise ValueError("give epochs or time_budget (seconds), or both; got neither")
    check_range("epochs", a["epochs"], integer=True, low=1, none="no limit on epochs: time_budget decides")
    check_range("time_budget", a["time_budget"], low=0, low_open=True, none="no time limit: epochs decides")
    check_range("batch_size", a["batch_size"], integer=True, low=1)
    check_range("eval_batch_size", a["eval_batch_size"], integer=True, low=1)
    check_range("lr", a["lr"], low=0, low_open=True)
    check_range("weight_decay", a["weight_decay"], low=0)
    if not in_range(a["warmup"], low=0, high=1, high_open=True):
        raise ValueError(f"warmup is a fraction of the total steps, in [0, 1); got {a['warmup']!r}")
    check_label_smoothing(a["label_smoothing"])
    check_clip_grad(a["clip_grad"])
    check_bool("augment", a["augment"])
    check_range("elastic", a["elastic"], low=0)
    check_augment(a["augment"], a["elastic"])
    check_range("ema", a["ema"], low=0, high=1, low_open=True, high_open=True, none="no average")
    check_seed(a["seed"])
    check_bool("compile", a["compile"])
    check_bool("progress", a["progress"])
    check_precision(a["precision"])
    if a["callback"] is not None and not callable(a["callback"]):
        raise ValueError(f"callback must be a callable taking the History, or None; got {a['callback']!r}")
    if a["checkpoint_dir"] is not None:
        check_writable(a["checkpoint_dir"], folder=True)
    if a["resume"] is not None and not Path(a["resume"]).is_file():
        raise ValueError(
            f"resume must be a checkpoint file written by fit (a last.pt); there is no file at {a['resume']}"
        )


def fit(
    model: nn.Module,
    train,
    val=None,
    *,
    epochs: int | None = None,
    time_budget: float | None = None,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.05,
    label_smoothing: float = 0.1,
    clip_grad: float | None = 1.0,
    augment: bool = True,
    elastic: float = 0.0,
    ema: float | None = EMA_DECAY,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    compile: bool = False,
    precision: str = "fp32",
    progress: bool = True,
    callback: Callable[[History], None] | None = None,
    resume: str | Path | None = None,
    data_source: str | dict | None = None,
    eval_batch_size: int = 512,
) -> History:
    """Train ``model`` in place on ``train`` -> History (see ``vitlab.training.history``); the model ends in eval mode.

    ``train`` / ``val``: in-memory data (``DigitDataset``, ``(images, labels)``) or a DataLoader (see
    ``vitlab.training.batches``; ``augment`` applies to in-memory data only). The run ends after ``epochs``
    epochs or when ``time_budget`` seconds are spent, whichever comes first; give at least one (a
    budget is planned into a number of steps, see ``vitlab.training.budget``). The recipe: AdamW, no decay on
    biases, norms, CLS token and position embeddings; a linear warmup to ``lr`` over the first
    ``warmup`` fraction of the steps, then a cosine down to 0 at the last; cross-entropy with
    ``label_smoothing``; gradient norm clipped at ``clip_grad`` (None: not clipped); with ``augment``, a random
    small affine per image and, if ``elastic`` > 0, an elastic distortion of that many pixels
    (``data.augment_batch``); dropout and stochastic depth from the model's config. ``seed`` seeds every
    generator and the batch order.
    ``ema``: keep an exponential moving average of the weights with this decay (see ``EMA``); validation,
    checkpoints and the model that fit leaves behind are the average (None: the raw weights, no average).

    ``checkpoint_dir``: ``last.pt`` after every epoch, ``best.pt`` whenever validation accuracy improves.
    ``resume``: a ``last.pt`` (or ``best.pt``) written by fit. Model, optimizer, schedule, history, batch
    order and random generators continue where it stopped: with the same arguments the result is the
    one of the run that was never interrupted (on the same kind of device). ``callback(history)`` runs
    after each epoch. ``compile=True`` trains through ``torch.compile(model)``, and leaves out each epoch's
    last, smaller batch of in-memory data so that one compiled graph serves every step. The first
    compilation takes tens of seconds on a CPU; PyTorch caches it on disk, so later runs of the same
    model start in seconds and then step faster (see benchmarks/README.md). ``precision="bf16"`` runs the
    training steps' forward passes under ``torch.autocast`` in bf16 (``vitlab.training.precision``; faster
    only where ``native_bf16`` holds); weights, optimizer state and evaluation stay float32. A non-finite
    loss raises ``FloatingPointError`` naming the epoch and step.

    Accepted values; any other raises ValueError naming the argument, its range and the value, before any
    work: ``epochs`` an int >= 1 or None; ``time_budget`` a finite number of seconds > 0 or None;
    ``batch_size`` and ``eval_batch_size`` ints >= 1; ``lr`` > 0; ``weight_decay`` >= 0; ``warmup`` and
    ``label_smoothing`` in [0, 1); ``clip_grad`` > 0 or None; ``elastic`` >= 0 pixels (and 0 without
    ``augment``); ``ema`` in (0, 1) or None; ``seed`` an int in [0, 2**32 - 1]; ``augment``, ``compile`` and
    ``progress`` bools; ``precision`` "fp32" or "bf16"; ``callback`` a callable or None; ``checkpoint_dir``
    a folder that can be written (created if missing); ``resume`` an existing file.
    """
    arguments = locals()  # fit's arguments, before any other name is bound
    check_fit_arguments(arguments)
    start = time.perf_counter()
    recipe = {key: arguments[key] for key in RECIPE_KEYS}  # what a resume compares with the checkpoint's
    seed_everything(seed)
    device = device_of(model)
    generator = torch.Generator().manual_seed(seed)  # the batch order
    aug_generator = torch.Generator(device=device).manual_seed(seed + 1)  # the augmentation draws
    train_batches = make_batches(train, batch_size, shuffle=True, generator=generator, augment=augment,
                                 elastic=elastic, aug_generator=aug_generator, device=device,
                                 drop_last=compile and num_images(train) >= batch_size)
    steps_per_epoch = len(train_batches)
    if steps_per_epoch == 0:
        raise ValueError(f"expected training data of at least one batch; got a {type(train).__name__} of 0 batches")
    forward = torch.compile(model) if compile else model

    checkpoint = None
    if resume is not None:
        _, checkpoint = load_checkpoint(resume, model)
        state = _fit_state(checkpoint, resume)
        _recipe_warnings(state["recipe"], recipe)
        total = state["total_steps"]
        if time_budget is None and epochs * steps_per_epoch != total:
            warnings.warn(
                f"resuming with epochs={epochs} ({epochs * steps_per_epoch} steps) where the checkpoint planned "
                f"{total} steps: the cosine is stretched to the new end from here on", stacklevel=2,
            )
            total = epochs * steps_per_epoch
    elif time_budget is not None:
        probe = probe_batches(train, batch_size, augment=augment, elastic=elastic, seed=seed, device=device)
        step_s, eval_s = time_steps(model, forward, probe, label_smoothing, clip_grad, precision)
        eval_s_per_epoch = eval_s * num_images(val) if val is not None else 0.0
        total = plan_steps(time_budget - (time.perf_counter() - start), step_s, eval_s_per_epoch, steps_per_epoch)
        if epochs is not None:
            total = min(total, epochs * steps_per_epoch)
    else:
        total = epochs * steps_per_epoch

    optimizer, scheduler = make_optimizer(model, lr, weight_decay, total, warmup)
    history, epoch, step, time_before = History(), 0, 0, 0.0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scheduler.lr_lambdas[0].total_steps = total
        history = History.from_dict(checkpoint["history"])
        epoch, step, time_before = state["epoch"], state["step"], state["time"]
        generator.set_state(state["generator"])
        aug_generator.set_state(state["aug_generator"])
        set_rng_state(checkpoint["rng"])
    average = EMA(model, ema) if ema else None  # after a resume the model holds what was saved: the average
    kept = model if average is None else average.model  # what is validated, saved and left behind
    if checkpoint is not None and "train_weights" in state:
        if average is not None:
            average.updates = state["ema_updates"]
        model.load_state_dict(state["train_weights"])
    deadline = start + (time_budget - time_before if time_budget is not None else math.inf)
    best = history.best_epoch()
    best_accuracy = best["val_accuracy"] if best else -math.inf

    def elapsed() -> float:
        return time_before + time.perf_counter() - start

    bar = tqdm(total=total, initial=step, unit="step", disable=not progress, dynamic_ncols=True)
    postfix = {}

    def on_step(row: dict) -> None:
        if average is not None:
            average.update(model)
        history.steps.append({"step": row["step"], "epoch": row["epoch"], "loss": row["loss"], "lr": row["lr"],
                              "time": elapsed()})
        postfix.update(epoch=row["epoch"], loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}")
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    try:
        while step < total and time.perf_counter() < deadline:
            epoch += 1
            batches = _until(islice(train_batches, total - step), deadline)
            result = train_one_epoch(model, batches, optimizer, scheduler, label_smoothing=label_smoothing,
                                     clip_grad=clip_grad, precision=precision, epoch=epoch, first_step=step,
                                     forward=forward, on_step=on_step)
            step += result["steps"]
            row = {"epoch": epoch, "step": step, "train_loss": result["loss"], "train_accuracy": result["accuracy"],
                   "n_train": result["n"]}
            if val is not None:
                scores = evaluate(kept, val, eval_batch_size)
                row.update(val_loss=scores["loss"], val_accuracy=scores["accuracy"])
                postfix["val_acc"] = f"{scores['accuracy']:.2%}"
            row.update(lr=history.steps[-1]["lr"], time=elapsed())
            history.epochs.append(row)
            improved = val is not None and row["val_accuracy"] > best_accuracy
            best_accuracy = max(best_accuracy, row.get("val_accuracy", -math.inf))
            if checkpoint_dir is not None:
                fit_state = {"epoch": epoch, "step": step, "time": row["time"], "total_steps": total,
                             "generator": generator.get_state(), "aug_generator": aug_generator.get_state(),
                             "recipe": recipe}
                if average is not None:  # the file's model is the average; the raw weights are needed to resume
                    fit_state.update(train_weights=model.state_dict(), ema_updates=average.updates)
                parts = dict(model=kept, optimizer=optimizer, scheduler=scheduler, history=history,
                             data_source=data_source, extra={"fit": fit_state})
                save_checkpoint(Path(checkpoint_dir) / "last.pt", **parts)
                if improved:
                    save_checkpoint(Path(checkpoint_dir) / "best.pt", **parts)
            if callback is not None:
                callback(history)
    finally:
        bar.close()
        model.eval()
    if kept is not model:
        model.load_state_dict(kept.state_dict())
    return history
