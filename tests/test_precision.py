"""bf16 training through torch.autocast: the step's products run in bf16, the weights, the optimizer and
evaluation stay float32, and an unknown precision is refused by name."""

import pytest
import torch
from tiny_digits import tiny_digits, tiny_vit

from vitlab.training import precision
from vitlab.training.checkpoint import load_checkpoint
from vitlab.training.loop import evaluate, fit
from vitlab.training.precision import autocast, native_bf16
from vitlab.training.step import train_step


def test_fp32_changes_nothing_and_bf16_runs_the_products_in_bf16():
    model, images = tiny_vit().eval(), torch.randn(3, 1, 28, 28)
    exact = model(images)
    with autocast(torch.device("cpu"), "fp32"):
        assert torch.equal(model(images), exact)  # the same ops in the same order
    seen = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with autocast(torch.device("cpu"), "bf16"):
        logits = model(images)
    assert seen == [torch.bfloat16]
    torch.testing.assert_close(logits.float(), exact, rtol=0.05, atol=0.05)  # bf16's precision
    assert not torch.equal(logits.float(), exact)


def test_a_bf16_step_keeps_float32_weights_and_gradients():
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    grads = []
    model.blocks[0].attn.qkv.weight.register_hook(lambda g: grads.append(g.dtype))
    loss, _ = train_step(model, model, images, labels, optimizer, precision="bf16")
    assert grads == [torch.float32]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss > 0


@pytest.mark.parametrize("bad", ["fp16", "bfloat16", None])
def test_an_unknown_precision_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"precision must be one of \['bf16', 'fp32'\]; got {bad!r}"):
        autocast(torch.device("cpu"), bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        fit(tiny_vit(), tiny_digits(16), epochs=1, precision=bad, progress=False)


def test_fit_in_bf16_trains_and_validates_in_float32(tmp_path):
    train, val = tiny_digits(256), tiny_digits(128, seed=1)
    model = tiny_vit()
    history = fit(model, train, val, epochs=3, lr=5e-3, batch_size=16, precision="bf16", progress=False,
                  checkpoint_dir=tmp_path)
    losses = history.step_column("loss")
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4
    assert history.epochs[-1]["val_accuracy"] > 0.3  # chance is 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    saved, _ = load_checkpoint(tmp_path / "last.pt")
    assert history.epochs[-1]["val_loss"] == evaluate(saved, val)["loss"]  # validation ran in float32
    recipe = torch.load(tmp_path / "last.pt", weights_only=True)["extra"]["fit"]["recipe"]
    assert recipe["precision"] == "bf16"


def test_native_bf16_answers_for_each_device_kind():
    assert native_bf16("meta") is False
    capabilities = torch.cpu.get_capabilities()
    assert native_bf16() == bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))
    assert set(precision.PRECISIONS) == {"fp32", "bf16"}
