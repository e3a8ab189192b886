"""bf16 matrix products in the blocks' Linear layers: what runs in bf16, what stays float32, and that the
setting is scoped to a block and to training."""

import pytest
import torch
import torch.nn.functional as F
from tiny_digits import tiny_digits, tiny_vit
from torch import nn

import vitlab
from vitlab import precision
from vitlab.precision import Linear, matmuls_in, native_bf16
from vitlab.checkpoint import load_checkpoint
from vitlab.training import evaluate, fit


def test_the_blocks_linear_layers_can_change_precision_and_the_patch_projection_and_head_cannot():
    model = tiny_vit(patch_embed="linear")
    switchable = {name for name, module in model.named_modules() if isinstance(module, Linear)}
    assert switchable == {f"blocks.{i}.{layer}" for i in range(2)
                          for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert type(model.head) is nn.Linear and type(model.patch_embed.proj) is nn.Linear


def test_fp32_is_exactly_nn_linear():
    torch.manual_seed(0)
    layer, reference = Linear(16, 8), nn.Linear(16, 8)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(4, 5, 16)
    assert torch.equal(layer(x), reference(x))


def test_bf16_rounds_the_inputs_of_the_product_and_returns_float32():
    torch.manual_seed(0)
    layer, x = Linear(64, 32), torch.randn(8, 64, requires_grad=True)
    exact = layer(x)
    with matmuls_in(layer, "bf16"):
        out = layer(x)
    expected = F.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert not torch.equal(out, exact)  # it did run in bf16 ...
    torch.testing.assert_close(out, exact, rtol=2e-2, atol=2e-2)  # ... to bf16's precision
    out.sum().backward()
    assert layer.weight.grad.dtype == layer.weight.dtype == torch.float32  # the weights stay float32
    assert x.grad.dtype == torch.float32


def test_product_is_the_product_in_its_dtype_and_a_bf16_input_gives_a_float32_output():
    torch.manual_seed(0)
    layer, x = Linear(64, 32), torch.randn(8, 64)
    assert torch.equal(layer.product(x), layer(x))  # fp32: nothing to cast
    with matmuls_in(layer, "bf16"):
        product = layer.product(x)
        assert product.dtype == torch.bfloat16 and torch.equal(product.float(), layer(x))
        out = layer(x.bfloat16())  # as the attention kernel hands on its bf16 output
    assert out.dtype == torch.float32
    expected = F.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float()
    assert torch.equal(out, expected)


def test_the_setting_holds_inside_the_block_only_also_after_an_error():
    model = tiny_vit()
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    with matmuls_in(model, "bf16"):
        assert all(layer.matmul_dtype == torch.bfloat16 for layer in layers)
        with matmuls_in(model, "fp32"):  # nested: evaluation inside a bf16 training step
            assert all(layer.matmul_dtype is None for layer in layers)
        assert all(layer.matmul_dtype == torch.bfloat16 for layer in layers)
    assert all(layer.matmul_dtype is None for layer in layers)
    with pytest.raises(RuntimeError, match="boom"), matmuls_in(model, "bf16"):
        raise RuntimeError("boom")
    assert all(layer.matmul_dtype is None for layer in layers)


@pytest.mark.parametrize("bad", ["fp16", "bfloat16", None])
def test_an_unknown_precision_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"precision must be one of \['bf16', 'fp32'\]; got {bad!r}"):
        with matmuls_in(tiny_vit(), bad):
            pass
    with pytest.raises(ValueError, match="precision must be one of"):
        fit(tiny_vit(), tiny_digits(16), epochs=1, precision=bad, progress=False)


def test_in_bf16_the_model_stays_close_and_the_recorded_attention_is_float32():
    model, images = tiny_vit().eval(), torch.randn(3, 1, 28, 28)
    exact = model(images)
    with matmuls_in(model, "bf16"), vitlab.record(model) as rec:
        logits = model(images)
    assert logits.dtype == torch.float32 and not torch.equal(logits, exact)
    torch.testing.assert_close(logits, exact, rtol=0.05, atol=0.05)
    assert rec.attentions.dtype == torch.float32
    torch.testing.assert_close(rec.attentions.sum(-1), torch.ones(rec.attentions.shape[:-1]))


def test_fit_in_bf16_trains_and_leaves_a_float32_model(tmp_path):
    train, val = tiny_digits(256), tiny_digits(128, seed=1)
    model = tiny_vit()
    history = fit(model, train, val, epochs=3, lr=5e-3, batch_size=16, precision="bf16", progress=False,
                  checkpoint_dir=tmp_path)
    losses = history.step_column("loss")
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4
    assert history.epochs[-1]["val_accuracy"] > 0.3  # chance is 0.1
    assert all(m.matmul_dtype is None for m in model.modules() if isinstance(m, Linear))
    # Validation ran in float32: the recorded loss is a float32 evaluation's of the saved model, not a bf16 one's.
    saved, _ = load_checkpoint(tmp_path / "last.pt")
    assert history.epochs[-1]["val_loss"] == evaluate(saved, val)["loss"]
    assert history.epochs[-1]["val_loss"] != evaluate(saved, val, precision="bf16")["loss"]
    recipe = torch.load(tmp_path / "last.pt", weights_only=True)["extra"]["fit"]["recipe"]
    assert recipe["precision"] == "bf16"


def test_evaluate_runs_in_its_own_precision_whatever_block_it_is_called_in():
    model, data = tiny_vit(), tiny_digits(64)
    exact = evaluate(model, data)
    with matmuls_in(model, "bf16"):  # as when a training loop scores the model between its bf16 steps
        inside = evaluate(model, data)
        assert all(m.matmul_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, Linear))
        told = evaluate(model, data, precision="fp32")
    assert inside == told == exact
    in_bf16 = evaluate(model, data, precision="bf16")
    assert in_bf16["loss"] != exact["loss"]
    with matmuls_in(model, "bf16"):
        assert evaluate(model, data, precision="bf16") == in_bf16
    assert all(m.matmul_dtype is None for m in model.modules() if isinstance(m, Linear))
    with pytest.raises(ValueError, match=r"precision.*'fp16'"):
        evaluate(model, data, precision="fp16")


def test_native_bf16_answers_for_each_device_kind():
    assert isinstance(native_bf16("cpu"), bool)
    assert native_bf16("meta") is False
    capabilities = torch.cpu.get_capabilities()
    assert native_bf16() == bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))
    assert set(precision.PRECISIONS) == {"fp32", "bf16"}
