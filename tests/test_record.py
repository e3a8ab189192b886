"""The recorder: what it records, that recording changes nothing, and that it never leaves a hook behind."""

import gc
import sys

import pytest
import torch
from torch.testing import assert_close

import vitlab
from vitlab.attention import local_window_mask
from vitlab.model import ViT
from vitlab.record import Recording, record

recorder = sys.modules[Recording.__module__]  # the module; `vitlab.record` is the function

SMALL = dict(image_size=12, patch_size=4, in_channels=2, num_classes=5, dim=16, depth=3, heads=4, mlp_dim=24)
B, L, H, N, D = 2, 3, 4, 10, 16


def small(**overrides):
    torch.manual_seed(0)
    return ViT(**{**SMALL, **overrides}).eval()


def images(b=B, size=12):
    return torch.randn(b, 2, size, size, generator=torch.Generator().manual_seed(1))


def hooks_left(model):
    """The model's modules' hooks, and any process-wide module hook."""
    own = [(name, kind) for name, m in model.named_modules()
           for kind in ("_forward_hooks", "_forward_pre_hooks") if getattr(m, kind)]
    return own + [("every module", kind) for kind in ("_global_forward_hooks", "_global_forward_pre_hooks")
                  if getattr(torch.nn.modules.module, kind)]


def test_record_is_exported():
    assert vitlab.record is record and vitlab.Recording is Recording


def test_attentions_shape_and_rows_sum_to_one():
    model = small()
    with record(model) as rec:
        model(images())
    assert rec.attentions.shape == (B, L, H, N, N)
    assert_close(rec.attentions.sum(-1), torch.ones(B, L, H, N))
    assert (rec.attentions >= 0).all()
    assert not rec.attentions.requires_grad


def test_attentions_match_the_softmax_of_q_k_by_hand():
    model = small()
    x = images()
    with record(model, keep_all=True) as rec:
        model(x)
    q, k = rec.steps["blocks.1.attn.q"], rec.steps["blocks.1.attn.k"]
    by_hand = torch.softmax(q @ k.transpose(-2, -1) / (D // H) ** 0.5, dim=-1)
    assert_close(rec.attentions[:, 1], by_hand)


def test_recording_does_not_change_the_logits_on_the_explicit_path():
    model = small()
    assert not any(b.attn.fused for b in model.blocks)
    x = images()
    plain = model(x)
    with record(model) as rec:
        recorded = model(x)
    assert torch.equal(recorded, plain)
    assert torch.equal(rec.logits, plain)


def test_recording_a_fused_model_switches_to_explicit_and_restores_it():
    model = small(attn_impl="fused")
    x = images()
    plain = model(x)
    with record(model) as rec:
        assert not any(b.attn.fused for b in model.blocks)
        recorded = model(x)
    assert all(b.attn.fused for b in model.blocks)
    assert_close(recorded, plain)
    assert rec.attentions.shape == (B, L, H, N, N)


def test_recording_restores_a_mix_of_paths():
    model = small()
    model.blocks[1].attn.fused = True
    with record(model):
        assert [b.attn.fused for b in model.blocks] == [False, False, False]
    assert [b.attn.fused for b in model.blocks] == [False, True, False]


def test_no_hook_is_left_after_the_context():
    model = small()
    assert hooks_left(model) == []
    with record(model, keep_all=True):
        assert ("every module", "_global_forward_hooks") in hooks_left(model)  # sanity: the check below sees them
        model(images())
    assert hooks_left(model) == []


def test_no_hook_is_left_after_an_exception_in_the_with_block():
    model = small(attn_impl="fused")
    with pytest.raises(KeyError):
        with record(model):
            model(images())
            raise KeyError("user code failed")
    assert hooks_left(model) == []
    assert all(b.attn.fused for b in model.blocks)


def test_no_hook_is_left_after_an_exception_in_the_forward_pass():
    model = small(attn_impl="fused")
    with pytest.raises(ValueError, match="expected 2 channel"):
        with record(model):
            model(torch.randn(1, 3, 12, 12))  # wrong channel count
    assert hooks_left(model) == []
    assert all(b.attn.fused for b in model.blocks)
    with pytest.raises(ValueError, match="ending in"):
        with record(model):
            model(images(), torch.ones(4, 4, dtype=torch.bool))  # raises inside the first block
    assert hooks_left(model) == []
    assert all(b.attn.fused for b in model.blocks)


def test_tokens_equal_running_the_blocks_by_hand():
    model = small()
    x = images()
    with record(model) as rec:
        model(x)
    assert rec.tokens.shape == (B, L, N, D)
    with torch.no_grad():
        h = model.pos_embed(model.cls_token(model.patch_embed(x)))
        assert torch.equal(rec.embeddings, h)
        for i, block in enumerate(model.blocks):
            h = block(h)
            assert torch.equal(rec.tokens[:, i], h)
    assert torch.equal(rec.images, x)
    assert torch.equal(rec.patches, vitlab.patchify(x, 4))


@pytest.mark.parametrize("kind, embed_steps", [
    ("linear", ["patch_embed.patches", "patch_embed.proj"]),  # flattened patches, then the Linear
    ("conv", ["patch_embed.proj"]),  # the conv's (B, D, G, G) map
])
def test_shape_trace_order(kind, embed_steps):
    model = small(depth=2, patch_embed=kind)
    with record(model) as rec:
        model(images())
    names = [name for name, _ in rec.shapes]
    assert rec.shapes[0] == ("input", (B, 2, 12, 12))
    assert rec.shapes[-1] == ("logits", (B, 5))
    assert names[: 4 + len(embed_steps)] == ["input", *embed_steps, "patch_embed", "cls_token", "pos_embed"]
    steps = ["q", "k", "v", "scores", "attend", "merge"]
    positions = []
    for i in range(2):
        positions += [names.index(f"blocks.{i}.attn.{s}") for s in steps]
        assert names.index(f"blocks.{i}.attn.qkv") < names.index(f"blocks.{i}.attn.q")
        assert names.index(f"blocks.{i}.attn.merge") < names.index(f"blocks.{i}.attn.proj") < names.index(f"blocks.{i}")
    assert positions == sorted(positions)  # q, k, v, scores, attend, merge; block 0 before block 1
    shapes = dict(rec.shapes)
    assert shapes["blocks.0.attn.q"] == (B, H, N, D // H)
    assert shapes["blocks.0.attn.scores"] == (B, H, N, N)
    assert shapes["blocks.0.attn.merge"] == (B, N, D)
    assert names.index("pool") < names.index("head") < names.index("logits")
    table = rec.format_shapes()
    assert table.splitlines()[2].split() == ["input", "(2,", "2,", "12,", "12)"]
    assert len(table.splitlines()) == len(rec.shapes) + 2


@pytest.mark.parametrize("final_norm, tail", [
    ("tokens", [("norm", (B, N, D)), ("pool", (B, D)), ("head", (B, 5)), ("logits", (B, 5))]),
    ("pooled", [("pool", (B, D)), ("norm", (B, D)), ("head", (B, 5)), ("logits", (B, 5))]),  # timm's fc_norm
])
def test_the_trace_shows_where_the_final_norm_acts(final_norm, tail):
    model = small(final_norm=final_norm)
    with record(model) as rec:
        model(images())
    assert rec.shapes[-4:] == tail


def test_a_model_without_a_head_records_its_features_as_the_output():
    model = small(num_classes=0)
    with record(model) as rec:
        features = model(images())
    assert features.shape == (B, D)
    assert torch.equal(rec.logits, features)
    assert rec.shapes[-2:] == [("pool", (B, D)), ("logits", (B, D))]  # no head module to trace
    assert rec.attentions.shape == (B, L, H, N, N)


def test_seed_numbers_224_image_16_pixel_patches():
    torch.manual_seed(0)
    model = ViT(image_size=224, patch_size=16, in_channels=3, dim=768, depth=1, heads=12, mlp_dim=64,
                patch_embed="conv").eval()
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(1, 3, 224, 224))
    shapes = dict(rec.shapes)
    assert shapes["input"] == (1, 3, 224, 224)
    assert shapes["patch_embed.proj"] == (1, 768, 14, 14)  # the conv: 14 x 14 x 768
    assert shapes["patch_embed"] == (1, 196, 768)  # 196 tokens of 768
    assert shapes["cls_token"] == (1, 197, 768)  # 197 after the CLS token
    assert shapes["blocks.0.attn.q"] == (1, 12, 197, 64)
    assert rec.attentions.shape == (1, 1, 12, 197, 197)


def test_recording_twice_keeps_only_the_last_pass():
    model = small()
    with record(model) as rec:
        model(images(b=3))
        model(images(b=1))
    assert rec.attentions.shape == (1, L, H, N, N)
    assert rec.tokens.shape == (1, L, N, D)
    assert rec.logits.shape == (1, 5)
    assert [name for name, _ in rec.shapes].count("input") == 1
    with record(model) as again:
        model(images(b=2))
    assert again.attentions.shape[0] == 2
    assert rec.attentions.shape[0] == 1  # an earlier recording is not touched


def test_nothing_recorded_yet_raises():
    model = small()
    with record(model) as rec:
        pass
    for name in ("attentions", "tokens", "patches"):
        with pytest.raises(RuntimeError, match="nothing recorded yet"):
            getattr(rec, name)


def test_record_rejects_other_modules():
    with pytest.raises(ValueError, match="expected a vitlab ViT .*; got Sequential"):
        with record(torch.nn.Sequential(torch.nn.Linear(2, 2))):
            pass
    with pytest.raises(ValueError, match="got Block"):
        with record(vitlab.Block(16, 4, 24)):
            pass


def test_keep_all_fills_steps():
    model = small()
    x = images()
    with record(model) as rec:
        model(x)
    assert rec.steps == {}
    with record(model, keep_all=True) as rec:
        logits = model(x)
    assert set(rec.steps) == {name for name, _ in rec.shapes} - {"logits"}
    assert torch.equal(rec.steps["head"], logits)
    assert torch.equal(rec.steps["blocks.2"], rec.tokens[:, 2])
    assert torch.equal(rec.steps["blocks.0.attn.attend"], rec.attentions[:, 0])


def test_window_mask_probabilities_are_exactly_zero_where_masked():
    model = small(window=1)
    with record(model) as rec:
        model(images())
    mask = local_window_mask(3, 1).expand(B, L, H, N, N)
    assert (rec.attentions[~mask] == 0).all()
    assert (rec.attentions[mask] > 0).all()
    assert_close(rec.attentions.sum(-1), torch.ones(B, L, H, N))


def test_recording_in_training_mode_records_probabilities_before_dropout():
    model = small(attn_dropout=0.5).train()
    with record(model) as rec:
        model(images())
    assert_close(rec.attentions.sum(-1), torch.ones(B, L, H, N))


def test_recording_keeps_gradients_flowing():
    model = small()
    with record(model):
        model(images()).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_a_finished_recordings_buffers_serve_the_next_one_and_a_live_one_is_never_overwritten(monkeypatch):
    monkeypatch.setattr(recorder, "_spare", [])
    model = small()
    with record(model) as first:
        model(images())
    kept = first.attentions
    buffer = first._buffers["attentions"]
    with record(model) as second:  # `first` is alive: its buffers stay its own
        model(images(b=2) * 3)
    assert second._buffers["attentions"] is not buffer
    assert torch.equal(first.attentions, kept)
    embeddings = first.embeddings
    del first
    gc.collect()
    assert any(spare is buffer for spare in recorder._spare)
    with record(model) as third:
        model(images())
    assert third._buffers["attentions"] is buffer  # handed on, not allocated again
    assert torch.equal(third.attentions, kept)  # and filled by the new pass
    assert torch.equal(embeddings, third.embeddings)  # what the first one returned was a copy


def test_buffers_beyond_the_spare_budget_are_let_go(monkeypatch):
    monkeypatch.setattr(recorder, "_spare", [])
    monkeypatch.setattr(recorder, "SPARE_BYTES", 1000)  # smaller than the attention buffer (B*L*H*N*N floats)
    model = small()
    with record(model) as rec:
        model(images())
    del rec
    gc.collect()
    assert recorder._spare == []


def test_a_buffer_made_in_inference_mode_serves_a_later_pass_with_autograd(monkeypatch):
    monkeypatch.setattr(recorder, "_spare", [])
    model = small()
    with torch.inference_mode(), record(model) as rec:
        model(images())
    del rec
    gc.collect()
    x = images().requires_grad_()
    with record(model) as rec:
        model(x).sum().backward()  # filling a reused buffer must not touch autograd
    assert x.grad is not None and not rec.attentions.requires_grad
    assert_close(rec.attentions.sum(-1), torch.ones(B, L, H, N))


def test_another_model_run_during_a_recording_is_not_traced():
    model, other = small(), small(depth=1)
    with record(model) as rec:
        model(images())
        other(images())  # its modules pass the process-wide hook, which ignores them
    assert rec.attentions.shape == (B, L, H, N, N)
    assert [name for name, _ in rec.shapes].count("blocks.0.attn.attend") == 1


def test_what_a_recording_returns_is_a_copy_that_later_passes_leave_alone():
    model = small()
    with record(model) as rec:
        model(images(b=1))
        attentions, tokens, embeddings = rec.attentions, rec.tokens, rec.embeddings
        kept = [t.clone() for t in (attentions, tokens, embeddings)]
        model(images(b=1) * 5)  # same shapes: the same buffers are refilled
        assert not torch.equal(rec.attentions, kept[0])
    for returned, before in zip((attentions, tokens, embeddings), kept):
        assert torch.equal(returned, before) and returned.is_contiguous()
