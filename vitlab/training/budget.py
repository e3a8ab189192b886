"""Time budgets: how many optimizer steps fit in a number of seconds, measured before training starts.

``fit(time_budget=s)`` plans its schedule once, before the first step: ``time_steps`` times a few
complete training steps (batch, forward, backward, clipping, AdamW update) and a validation forward on
one batch, then puts the weights back and leaves the random generators as they were; ``plan_steps``
turns those times into a total number of steps, validation included. The warmup and cosine then run
over that fixed number of steps, as in an epoch-bounded run, and checkpoints keep the plan, so a
resumed run follows the same curve exactly. The plan is an estimate: ``fit`` also stops when the
budget is spent, ending the epoch in progress early.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import torch
from torch import nn

from .batches import make_batches
from .devices import device_of
from .optim import adamw, param_groups
from .step import train_step

TIMING_STEPS = 3  # timed training steps (after one untimed step that pays for allocation and compilation)


def plan_steps(seconds: float, step_seconds: float, eval_seconds_per_epoch: float, steps_per_epoch: int) -> int:
    """-> how many optimizer steps fit in ``seconds`` when each epoch also spends its validation time; >= 1."""
    if step_seconds <= 0 or steps_per_epoch < 1:
        raise ValueError(f"expected step_seconds > 0 and steps_per_epoch >= 1; got {step_seconds}, {steps_per_epoch}")
    per_step = step_seconds + eval_seconds_per_epoch / steps_per_epoch
    return max(1, int(seconds / per_step))


def probe_batches(
    train, batch_size: int, *, augment: bool, elastic: float, seed: int, device: torch.device | str | None = None
) -> Iterable:
    """The batches ``time_steps`` times a training step on: ``train`` batched and augmented as in training,
    with its own augmentation generator (seeded by ``seed``), so the run's generators are left untouched."""
    return make_batches(train, batch_size, augment=augment, elastic=elastic, device=device,
                        aug_generator=torch.Generator(device=device).manual_seed(seed))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    model: nn.Module, forward: Callable, batches: Iterable, label_smoothing: float = 0.0,
    clip_grad: float | None = None, precision: str = "fp32",
) -> tuple[float, float]:
    """-> (seconds per training step, seconds per validation image), leaving no trace on the model.

    The step timed is ``step.train_step``, the one training runs, in ``precision``; the validation
    forward is timed in float32, as validation runs.
    Each timed step takes the first batch of ``batches`` afresh, so batching and augmentation count.
    The weights are restored, the gradients cleared and the random generators reset afterwards (also
    when a step raises), so the run that follows is the one it would have been without the measurement.
    """
    device = device_of(model)
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    optimizer = adamw(param_groups(model, 0.05), lr=1e-6)  # the real update's cost, thrown away after
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            model.train()
            times = []
            for _ in range(1 + TIMING_STEPS):
                start = time.perf_counter()
                images, labels = (t.to(device) for t in next(iter(batches)))
                train_step(model, forward, images, labels, optimizer, label_smoothing=label_smoothing,
                           clip_grad=clip_grad, precision=precision, where=lambda: "the time budget's probe step")
                _sync(device)
                times.append(time.perf_counter() - start)
            model.eval()
            with torch.no_grad():
                model(images)
                start = time.perf_counter()
                model(images)
                _sync(device)
                eval_per_image = (time.perf_counter() - start) / len(labels)
    finally:  # also when a step fails (a non-finite loss): the model is left as it came
        model.load_state_dict(weights)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return sum(times[1:]) / TIMING_STEPS, eval_per_image
