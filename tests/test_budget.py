"""The time-budget probe: it times the training step in the caller's precision and validation in
float32, and leaves the model and the random generators as they were."""

import pytest
import torch
from tiny_digits import tiny_digits, tiny_vit

from vitlab.training.budget import TIMING_STEPS, probe_batches, time_steps


def probe(seed: int = 0):
    return probe_batches(tiny_digits(64), 16, augment=True, elastic=0.0, seed=seed)


def test_time_steps_trains_in_the_given_precision_and_times_validation_in_float32():
    model = tiny_vit()
    seen = []  # (training?, the product's dtype) for each call of one block's first Linear
    model.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: seen.append((module.training, out.dtype)))
    step_s, eval_s = time_steps(model, model, probe(), label_smoothing=0.1, clip_grad=1.0, precision="bf16")
    assert seen[:1 + TIMING_STEPS] == [(True, torch.bfloat16)] * (1 + TIMING_STEPS)
    assert seen[1 + TIMING_STEPS:] == [(False, torch.float32)] * 2  # a warm-up and the timed validation forward
    assert step_s > 0 and eval_s > 0


def test_time_steps_leaves_weights_gradients_mode_and_generators_as_they_were():
    model = tiny_vit()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    time_steps(model, model, probe(), clip_grad=1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_a_failing_probe_step_still_leaves_the_model_as_it_came():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def forward(images):  # the second step's loss is NaN, after the first has moved the weights
        calls.append(1)
        logits = model(images)
        return logits * float("nan") if len(calls) == 2 else logits

    with pytest.raises(FloatingPointError, match="the time budget's probe step"):
        time_steps(model, forward, probe())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training
