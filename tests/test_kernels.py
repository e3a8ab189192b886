"""vitlab's small-attention kernel: the same function and gradients as the explicit path, used only where
it applies, and a fallback to F.scaled_dot_product_attention where it cannot be built."""

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import Attention, ViT, ViTConfig, build, kernels

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler to build the kernel with")


def spy_on_forward(monkeypatch) -> list:
    """The dtype of q/k/v at each call of the kernel's forward pass, from now until the test ends."""
    dtypes = []
    real = kernels._forward
    monkeypatch.setattr(kernels, "_forward", lambda qkv, *args: dtypes.append(qkv.dtype) or real(qkv, *args))
    return dtypes


def explicit_reference(qkv: torch.Tensor, heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's equations with plain PyTorch ops: (B, N, 3D) -> (B, N, D) and the (B, h, N, N) probabilities."""
    B, N, three_d = qkv.shape
    q, k, v = qkv.view(B, N, 3, heads, three_d // 3 // heads).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1)
    return (probs @ v).transpose(1, 2).reshape(B, N, three_d // 3), probs


@pytest.mark.parametrize(
    ("batch", "tokens", "heads", "head_dim"),
    [(3, 17, 4, 16), (37, 17, 4, 16), (16, 17, 1, 16), (2, 5, 2, 32), (2, 50, 3, 64), (18, 64, 2, 128)],
)
def test_kernel_matches_the_equations_forward_and_backward(batch, tokens, heads, head_dim):
    assert kernels.available(tokens, head_dim), kernels.errors
    torch.manual_seed(0)
    qkv = (torch.randn(batch, tokens, 3 * heads * head_dim) * 2).requires_grad_()
    grad = torch.randn(batch, tokens, heads * head_dim)
    scale = head_dim**-0.5
    out, probs = kernels._small_attention_op(qkv, heads, scale)
    probs = kernels.probabilities(probs, batch)
    (gq,) = torch.autograd.grad(out, qkv, grad)
    # The reference in float64, so that the tolerance measures the kernel's rounding and not its own;
    # float32 PyTorch lands as far from it (up to about 1e-5 at d = 128).
    qkv64 = qkv.detach().double().requires_grad_()
    ref_out, ref_probs = explicit_reference(qkv64, heads, scale)
    (ref_gq,) = torch.autograd.grad(ref_out, qkv64, grad.double())
    torch.testing.assert_close(probs, ref_probs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, heads, tokens))
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-4, atol=3e-5)
    torch.testing.assert_close(gq, ref_gq.float(), rtol=1e-4, atol=3e-5)


def test_kernel_handles_large_scores_without_overflow():
    qkv = torch.randn(2, 17, 3 * 64) * 40  # scores in the thousands: exp would overflow without the max
    out, probs = kernels._small_attention_op(qkv, 4, 0.25)
    probs = kernels.probabilities(probs, 2)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    torch.testing.assert_close(probs, explicit_reference(qkv, 4, 0.25)[1], rtol=1e-4, atol=1e-6)


def test_default_model_trains_on_the_kernel_and_matches_the_explicit_path():
    torch.manual_seed(0)
    model = ViT(ViTConfig())
    assert all(block.attn.fused for block in model.blocks)  # "auto" picks the kernel's path at 17 tokens
    images, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    grads = {}
    for fused in (True, False):
        model.set_attention(fused)
        model.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        grads[fused] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads[True][0], grads[False][0])
    for kernel_grad, explicit_grad in zip(grads[True][1], grads[False][1]):
        torch.testing.assert_close(kernel_grad, explicit_grad, rtol=1e-4, atol=1e-6)


def test_attention_uses_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = kernels.small_attention
    monkeypatch.setattr(kernels, "small_attention", lambda *args: calls.append(1) or real(*args))
    attn = Attention(64, 4, fused=True)
    x = torch.randn(2, 17, 64)
    attn(x)
    assert len(calls) == 1
    attn(x, mask=vitlab.local_window_mask(4, 3))  # masks go to F.scaled_dot_product_attention
    attn.double()(x.double())  # so does float64
    attn.float()
    handle = attn.q.register_forward_hook(lambda *args: None)  # a watched tap must see its tensor
    attn(x)
    handle.remove()
    assert len(calls) == 1
    dropped = Attention(64, 4, attn_dropout=0.1, fused=True).train()
    dropped(x)  # attention dropout in training: F.scaled_dot_product_attention
    assert len(calls) == 1
    dropped.eval()(x)
    assert len(calls) == 2


def test_record_still_sees_every_step_of_a_model_on_the_kernel():
    model = ViT(ViTConfig()).eval()
    images = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = model(images)
        with vitlab.record(model) as rec:
            recorded = model(images)
    assert all(block.attn.fused for block in model.blocks)  # restored after the recording
    assert rec.attentions.shape == (2, 6, 4, 17, 17)
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)


def test_disabled_or_unbuildable_kernel_falls_back(monkeypatch):
    monkeypatch.setenv("VITLAB_KERNELS", "0")
    assert not kernels.available(17, 16)
    assert ViTConfig().fused_attention is False  # explicit, as without the kernel
    monkeypatch.delenv("VITLAB_KERNELS")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setattr(kernels, "_libraries", {})
    monkeypatch.setattr(kernels, "errors", {})
    assert not kernels.available(17, 16)
    assert "no C++ compiler" in kernels.errors[(17, 16)]
    attn = Attention(64, 4, fused=True)
    x = torch.randn(2, 17, 64)
    attn.fused = False
    explicit = attn(x)
    attn.fused = True
    torch.testing.assert_close(attn(x), explicit, rtol=1e-5, atol=1e-6)  # F.scaled_dot_product_attention


def test_unsupported_sizes_are_not_built():
    assert not kernels.available(kernels.MAX_TOKENS + 1, 16)
    assert not kernels.available(17, 24)  # not a whole number of 16-float vectors
    assert (kernels.MAX_TOKENS + 1, 16) not in kernels._libraries


def test_tensors_no_kernel_takes_build_nothing(monkeypatch):
    monkeypatch.setattr(kernels, "_libraries", {})
    q = torch.randn(2, 4, 17, 16, dtype=torch.float64)
    assert not kernels.heads_apply(q, q, q)
    assert not kernels.softmax_applies(q, -1)
    assert not kernels.applies(torch.randn(2, 17, 64, dtype=torch.float64), 4)
    assert kernels._libraries == {}


def test_build_lands_in_the_cache_folder_whole(monkeypatch, tmp_path):
    monkeypatch.setenv("VITLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_libraries", {})
    assert kernels.available(9, 16)
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("small_attention_n9_d16_") and built[0].suffix == ".so"


def test_compiled_model_runs_the_kernel_as_one_op(monkeypatch):
    torch.manual_seed(0)
    model = ViT(ViTConfig(depth=2))
    images = torch.randn(4, 1, 28, 28)
    compiled = torch.compile(model)
    calls = spy_on_forward(monkeypatch)
    torch.testing.assert_close(compiled(images), model(images), rtol=1e-4, atol=1e-5)
    assert len(calls) == 2 * 2  # each block's attention, in the compiled model and in the eager one


@pytest.mark.parametrize("shape", [(3, 4, 17, 17), (37, 5), (2, 16), (1, 64), (5, 3, 33)])
def test_row_softmax_matches_torch_softmax_and_its_gradient(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).requires_grad_()
    grad = torch.randn(shape)
    assert kernels.softmax_applies(x, -1)
    y = kernels.row_softmax(x)
    (gx,) = torch.autograd.grad(y, x, grad)
    ref = torch.softmax(x.detach().double(), -1)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx, torch.autograd.grad(torch.softmax(x, -1), x, grad)[0], rtol=1e-5, atol=1e-6)


def test_row_softmax_gives_masked_scores_exactly_zero_weight():
    scores = torch.randn(20, 17).masked_fill(torch.rand(20, 17) < 0.5, float("-inf"))
    scores[:, 0] = 1.0  # every row keeps one key
    probs = kernels.row_softmax(scores)
    assert (probs[scores == float("-inf")] == 0).all()
    torch.testing.assert_close(probs, torch.softmax(scores, -1))


def test_attention_softmax_module_uses_the_kernel_only_where_it_applies(monkeypatch):
    calls = []
    real = kernels._row_softmax_op
    monkeypatch.setattr(kernels, "_row_softmax_op", lambda x: calls.append(x.shape) or real(x))
    attend = Attention(64, 4).attend
    x = torch.randn(2, 4, 17, 17)
    torch.testing.assert_close(attend(x), torch.softmax(x, -1))
    assert calls == [x.shape]
    for other in (x.double(), x.transpose(-2, -1), torch.randn(2, 3, 65)):  # float64, not contiguous, too long
        torch.testing.assert_close(attend(other), torch.softmax(other, -1))
    assert torch.equal(torch.softmax(x, 1), vitlab.attention.Softmax(dim=1)(x))  # not the last dim
    x.requires_grad_()
    torch.testing.assert_close(attend(x), torch.softmax(x, -1))  # with autograd: PyTorch's softmax
    with torch.no_grad():
        attend(x)
    assert len(calls) == 2


@pytest.mark.parametrize(("batch", "tokens", "heads", "head_dim"), [(37, 17, 4, 16), (3, 5, 2, 32), (18, 64, 2, 128)])
def test_head_products_match_the_matmuls_and_their_gradients(batch, tokens, heads, head_dim):
    torch.manual_seed(0)
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, requires_grad=True)
    q, k, v = (t.view(batch, tokens, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    assert kernels.heads_apply(q, k, v)
    attn = torch.softmax(torch.randn(batch, heads, tokens, tokens), -1).requires_grad_()
    scores, out = kernels.head_scores(q, k, 0.3), kernels.head_weighted_sum(attn, v)
    assert out.transpose(1, 2).is_contiguous()  # the heads already merged
    g_scores, g_out = torch.randn_like(scores), torch.randn_like(out)
    grads = torch.autograd.grad((scores, out), (qkv, attn), (g_scores, g_out))
    ref_scores, ref_out = 0.3 * q @ k.transpose(-2, -1), attn @ v
    ref_grads = torch.autograd.grad((ref_scores, ref_out), (qkv, attn), (g_scores, g_out))
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5)


def test_explicit_path_uses_the_head_products_and_a_hook_that_replaces_q_is_obeyed(monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, 4).eval()  # explicit
    x = torch.randn(3, 17, 64)
    calls = []
    real = kernels._head_scores_op
    monkeypatch.setattr(kernels, "_head_scores_op", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        expected = attn(x)
        assert calls == [1]
        with vitlab.record(ViT(ViTConfig(depth=1))):  # a recording elsewhere leaves this module alone
            torch.testing.assert_close(attn(x), expected)
        handle = attn.q.register_forward_hook(lambda module, args, q: torch.zeros_like(q))
        try:
            uniform = attn(x)  # q = 0: every query weighs the values equally
        finally:
            handle.remove()
    values = attn.qkv(x)[..., 128:].view(3, 17, 4, 16).mean(1, keepdim=True).expand(3, 17, 4, 16)
    torch.testing.assert_close(uniform, attn.proj(values.reshape(3, 17, 64)))


def test_flop_counter_counts_the_explicit_and_the_fused_path_alike(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    model, images = ViT(ViTConfig(depth=2)), torch.randn(4, 1, 28, 28)
    counts = {}
    for fused in (True, False):
        model.set_attention(fused)
        with FlopCounterMode(display=False) as counter:
            model(images).sum().backward()
        counts[fused] = counter.get_total_flops()
    monkeypatch.setenv("VITLAB_KERNELS", "0")  # the explicit path in plain PyTorch matmuls
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    assert counts[True] == counts[False] == counter.get_total_flops()


def test_bf16_kernel_is_the_float32_kernel_between_casts():
    torch.manual_seed(0)
    qkv = (torch.randn(37, 17, 3 * 64) * 2).to(torch.bfloat16).requires_grad_()
    qkv32 = qkv.detach().float().requires_grad_()
    grad = torch.randn(37, 17, 64).to(torch.bfloat16)
    out, probs = kernels._small_attention_op(qkv, 4, 0.25)
    out32, probs32 = kernels._small_attention_op(qkv32, 4, 0.25)
    assert out.dtype == torch.bfloat16 and probs.dtype == torch.float32
    assert torch.equal(out, out32.to(torch.bfloat16))  # rounded to nearest even, as PyTorch's cast
    assert torch.equal(probs, probs32)
    (g,) = torch.autograd.grad(out, qkv, grad)
    (g32,) = torch.autograd.grad(out32, qkv32, grad.float())
    assert g.dtype == torch.bfloat16 and torch.equal(g, g32.to(torch.bfloat16))
    with pytest.raises(ValueError, match="float32 or bfloat16; got torch.float64"):
        kernels._small_attention_op(qkv32.detach().double(), 4, 0.25)


def test_bf16_products_give_the_same_step_with_the_kernel_in_bf16_as_with_casts_around_it():
    from vitlab.precision import matmuls_in

    images, labels = torch.randn(20, 1, 28, 28), torch.arange(20) % 10
    results = []
    for hooked in (False, True):  # a hook on the projections keeps them float32 modules: the casts
        torch.manual_seed(0)
        model = ViT(ViTConfig(depth=2))
        if hooked:
            for block in model.blocks:
                block.attn.qkv.register_forward_pre_hook(lambda module, args: None)
        with pytest.MonkeyPatch.context() as patch:
            calls = spy_on_forward(patch)
            with matmuls_in(model, "bf16"):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
        assert calls == [torch.float32 if hooked else torch.bfloat16] * 2
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss, grads), (loss_casts, grads_casts) = results
    assert torch.equal(loss, loss_casts)
    assert all(torch.equal(g, g_casts) for g, g_casts in zip(grads, grads_casts))


def test_compiled_bf16_model_runs_the_kernel_in_bf16_and_matches_eager(monkeypatch):
    from vitlab.precision import matmuls_in

    torch.manual_seed(0)
    model = ViT(ViTConfig(depth=1))
    images = torch.randn(4, 1, 28, 28)
    compiled = torch.compile(model)
    dtypes = spy_on_forward(monkeypatch)
    with torch.no_grad(), matmuls_in(model, "bf16"):
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-3, atol=1e-3)
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the compiled graph's call, then eager's
