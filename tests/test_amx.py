"""vitlab's bf16 products on AMX tiles: F.linear's numbers in bf16 up to the order of the float32 sums,
every shape (tails of rows and columns included), gradients summed in float32, one graph under
torch.compile, and F.linear wherever the operators do not run."""

import pytest
import torch
import torch.nn.functional as F
from tiny_digits import tiny_vit
from torch.utils.flop_counter import FlopCounterMode

from vitlab import amx, build, precision
from vitlab.precision import Linear, matmuls_in

needs_amx = pytest.mark.skipif(build.compiler() is None or not amx.cpu_has_amx(),
                               reason="needs a CPU with AMX-BF16 and a C++ compiler")

SHAPES = [  # (rows, in features, out features): the MNIST model's four, then tails of every kind
    (2176, 64, 192), (2176, 64, 64), (2176, 64, 128), (2176, 128, 64),
    (1, 1, 1), (5, 3, 7), (37, 40, 50), (100, 96, 33), (33, 32, 32), (31, 64, 16), (70, 200, 48),
]


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear's bf16 product, its sums in float64 and rounded to bf16 once."""
    b = None if bias is None else bias.bfloat16().double()
    return F.linear(x.double(), weight.bfloat16().double(), b).bfloat16()


def assert_within_a_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16 results one rounding apart at most: the float32 sums in another order may round the other way."""
    assert actual.dtype == expected.dtype == torch.bfloat16 and actual.shape == expected.shape
    a, e = actual.double(), expected.double()
    ulp = e.abs() * 2.0**-7 + 1e-30  # at least one bf16 step at e, wherever e lies between powers of two
    assert ((a - e).abs() <= ulp + 1e-6 * e.abs().max()).all(), (a - e).abs().max()


@needs_amx
def test_the_operators_build_and_load():
    assert amx.available(), amx.error


@needs_amx
@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
def test_integer_products_are_exact_for_every_shape(rows, k, n):
    """Small integers are exact in bf16 and in float32 sums: any slip of the packing or of a tail shows."""
    g = torch.Generator().manual_seed(rows * 1000 + k * 10 + n)
    x = torch.randint(-4, 5, (rows, k), generator=g).bfloat16()
    weight, bias = torch.randint(-4, 5, (n, k), generator=g).float(), torch.randint(-9, 10, (n,), generator=g).float()
    assert torch.equal(amx.linear(x, weight, bias), (x.double() @ weight.double().T + bias.double()).bfloat16())
    grad = torch.randint(-3, 4, (rows, n), generator=g).bfloat16()
    grad_x, grad_weight, grad_bias = torch.ops.vitlab.amx_linear_backward(grad, x, weight)
    assert torch.equal(grad_x, (grad.double() @ weight.double()).bfloat16())
    assert torch.equal(grad_weight, (grad.double().T @ x.double()).float())
    assert torch.equal(grad_bias, grad.double().sum(0).float())


@needs_amx
@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
def test_random_products_are_f_linear_in_bf16(rows, k, n):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(rows, k).bfloat16(), torch.randn(n, k) * 0.2, torch.randn(n)
    assert_within_a_rounding(amx.linear(x, weight, bias), reference(x, weight, bias))
    assert_within_a_rounding(amx.linear(x, weight), reference(x, weight, None))
    assert_within_a_rounding(amx.linear(x, weight.bfloat16(), bias.bfloat16()), reference(x, weight, bias))


@needs_amx
def test_leading_dims_and_float32_input():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 17, 64), torch.randn(96, 64), torch.randn(96)
    out = amx.linear(x, weight, bias)  # float32 input: rounded to bf16 first
    assert out.shape == (3, 17, 96) and out.dtype == torch.bfloat16
    assert_within_a_rounding(out, reference(x.bfloat16(), weight, bias))
    assert torch.equal(out, amx.linear(x.bfloat16().reshape(51, 64), weight, bias).view(3, 17, 96))


@needs_amx
@pytest.mark.parametrize(("rows", "k", "n"), [(2176, 64, 192), (2176, 128, 64), (37, 40, 50), (5, 3, 7)])
def test_gradients_are_summed_in_float32_and_rounded_once(rows, k, n):
    torch.manual_seed(1)
    x = torch.randn(rows, k).bfloat16().requires_grad_()
    weight, bias = torch.randn(n, k, requires_grad=True), torch.randn(n, requires_grad=True)
    grad = torch.randn(rows, n).bfloat16()
    amx.linear(x, weight, bias).backward(grad)
    assert x.grad.dtype == torch.bfloat16 and weight.grad.dtype == bias.grad.dtype == torch.float32
    assert_within_a_rounding(x.grad, (grad.double() @ weight.detach().bfloat16().double()).bfloat16())
    torch.testing.assert_close(weight.grad, (grad.double().T @ x.detach().double()).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, grad.double().sum(0).float(), rtol=1e-5, atol=1e-5)


@needs_amx
def test_the_thread_count_changes_no_forward_number_and_no_gradient_beyond_float32_rounding():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2176, 64).bfloat16(), torch.randn(192, 64), torch.randn(192)
    grad = torch.randn(2176, 192).bfloat16()
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((amx.linear(x, weight, bias), *torch.ops.vitlab.amx_linear_backward(grad, x, weight)))
    finally:
        torch.set_num_threads(before)
    for out, grad_x, grad_weight, grad_bias in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad_x, results[0][1])
        torch.testing.assert_close(grad_weight, results[0][2], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad_bias, results[0][3], rtol=1e-5, atol=1e-4)


@needs_amx
def test_bad_input_is_refused_with_the_shapes_and_dtypes():
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"expected input \(\.\.\., 16\) for a weight of shape \(8, 16\); got \(4, 12\)"):
        amx.linear(torch.randn(4, 12), weight)
    with pytest.raises(RuntimeError, match="expects bf16 input; got Float"):
        torch.ops.vitlab.amx_linear(torch.randn(4, 16), weight, None)
    with pytest.raises(RuntimeError, match="expected a float32 or bf16 bias of 8 values"):
        torch.ops.vitlab.amx_linear(torch.randn(4, 16).bfloat16(), weight, torch.randn(5))
    with pytest.raises(RuntimeError, match="2-D float32 or bf16 weight"):
        torch.ops.vitlab.amx_linear(torch.randn(4, 16).bfloat16(), weight.double(), None)
    with pytest.raises(RuntimeError, match=r"at least one input feature; got \[8, 0\]"):
        torch.ops.vitlab.amx_linear(torch.randn(4, 0).bfloat16(), torch.randn(8, 0), None)


@needs_amx
def test_the_flop_counter_counts_the_products():
    x, weight = torch.randn(10, 3, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        amx.linear(x, weight).float().sum().backward()
    assert counter.get_total_flops() == 2 * 30 * 16 * 8 * 3  # forward, then input and weight gradients


@needs_amx
def test_blocks_in_bf16_run_on_the_tiles_and_compile_into_one_graph(monkeypatch):
    calls = []
    real = amx.linear
    monkeypatch.setattr(amx, "linear", lambda *args: calls.append(args[1].shape) or real(*args))
    torch.manual_seed(0)
    model, images, labels = tiny_vit(), torch.randn(20, 1, 28, 28), torch.randint(0, 10, (20,))
    with matmuls_in(model, "bf16"):
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        eager = [p.grad.clone() for p in model.parameters()]
        assert len(calls) == 2 * 4  # two blocks' q/k/v, output projection and MLP layers
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: no graph break around the operators
        compiled_loss = F.cross_entropy(compiled(images), labels)
        compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-5)
    for param, grad in zip(model.parameters(), eager):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-5)


@needs_amx
def test_a_model_in_bf16_stays_close_to_float32():
    torch.manual_seed(0)
    model, images = tiny_vit(), torch.randn(20, 1, 28, 28)
    exact = model(images)
    with matmuls_in(model, "bf16"):
        assert amx.available()
        out = model(images)
    assert not torch.equal(out, exact)
    torch.testing.assert_close(out, exact, rtol=5e-2, atol=5e-2)


def test_without_the_operators_bf16_products_run_on_f_linear(monkeypatch):
    monkeypatch.setenv("VITLAB_KERNELS", "0")
    assert not amx.available()
    monkeypatch.setattr(amx, "linear", lambda *args: pytest.fail("the AMX operator ran with VITLAB_KERNELS=0"))
    torch.manual_seed(0)
    layer, x = Linear(64, 32), torch.randn(8, 64)
    with matmuls_in(layer, "bf16"):
        out = layer(x)
    assert torch.equal(out, F.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16()).float())


def test_a_cpu_without_amx_is_said_so(monkeypatch):
    monkeypatch.setattr(amx, "_state", {})
    monkeypatch.setattr(amx, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(amx, "error", None)
    assert not amx.available() and amx.error == "this CPU has no AMX-BF16"
    assert not precision.amx.applies(torch.randn(2, 4), torch.randn(3, 4))
