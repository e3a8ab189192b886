"""The recorder: what it records, that recording changes nothing, and that it never leaves a hook behind."""

import sys
import threading

import pytest
import torch
from torch.testing import assert_close

import vitlab
from vitlab.inside.record import Recording, record
from vitlab.model import ViT
from vitlab.model.attention import local_window_mask

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
        assert ("blocks.0.attn.attend", "_forward_hooks") in hooks_left(model)  # sanity: the check below sees them
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
    with pytest.raises(ValueError, match="broadcastable to"):
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
    with record(model, every_step=True) as rec:
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


def test_the_default_trace_lists_the_main_steps_only():
    model = small(depth=2)
    with record(model) as rec:
        model(images())
    assert rec.shapes == [
        ("input", (B, 2, 12, 12)), ("patch_embed", (B, N - 1, D)), ("cls_token", (B, N, D)), ("pos_embed", (B, N, D)),
        ("blocks.0.attn.attend", (B, H, N, N)), ("blocks.0", (B, N, D)),
        ("blocks.1.attn.attend", (B, H, N, N)), ("blocks.1", (B, N, D)),
        ("norm", (B, N, D)), ("pool", (B, D)), ("head", (B, 5)), ("logits", (B, 5)),
    ]
    hooked = [name for name, m in model.named_modules() if m._forward_hooks]
    assert hooked == []  # and none is left


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
    with torch.no_grad(), record(model, every_step=True) as rec:
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


def test_another_model_run_during_a_recording_is_not_traced():
    model, other = small(), small(depth=1)
    with record(model) as rec:
        model(images())
        other(images())  # no hook of the recording is on its modules
    assert rec.attentions.shape == (B, L, H, N, N)
    assert [name for name, _ in rec.shapes].count("blocks.0.attn.attend") == 1


def test_what_a_recording_returns_is_left_alone_by_later_passes():
    model = small()
    with record(model) as rec:
        model(images(b=1))
        attentions, tokens, embeddings = rec.attentions, rec.tokens, rec.embeddings
        kept = [t.clone() for t in (attentions, tokens, embeddings)]
        model(images(b=1) * 5)
        assert not torch.equal(rec.attentions, kept[0])
    for returned, before in zip((attentions, tokens, embeddings), kept):
        assert torch.equal(returned, before)


@pytest.mark.parametrize("order", ["inner first", "outer first"])
def test_nested_recordings_exited_in_any_order_restore_every_path(order):
    model = small(attn_impl="fused")
    outer, inner = record(model), record(model)
    rec_outer, rec_inner = outer.__enter__(), inner.__enter__()
    model(images())
    assert rec_outer.attentions.shape == rec_inner.attentions.shape == (B, L, H, N, N)  # both saw the pass
    first, second = (inner, outer) if order == "inner first" else (outer, inner)
    first.__exit__(None, None, None)
    assert not any(b.attn.fused for b in model.blocks)  # the other one still records
    second.__exit__(None, None, None)
    assert all(b.attn.fused for b in model.blocks)  # the config's path again
    assert hooks_left(model) == []


def test_a_second_thread_cannot_record_the_same_model_meanwhile():
    model = small()
    errors = []

    def other_thread():
        try:
            with record(model):
                pass
        except RuntimeError as error:
            errors.append(str(error))

    with record(model):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and "being recorded in another thread" in errors[0]
    thread = threading.Thread(target=other_thread)  # once the first recording has ended, it may
    thread.start()
    thread.join()
    assert len(errors) == 1


def test_two_threads_may_record_two_models_at_once():
    models = [small(), small(depth=1)]
    shapes = {}

    def run(i):
        with record(models[i]) as rec:
            models[i](images())
        shapes[i] = tuple(rec.attentions.shape)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shapes == {0: (B, 3, H, N, N), 1: (B, 1, H, N, N)}


def test_a_compiled_model_is_refused_with_what_to_do():
    model = small()
    with pytest.raises(ValueError, match=r"record the model itself, not the torch.compile'd wrapper"):
        with record(torch.compile(model)):
            pass
    assert hooks_left(model) == []


def test_a_batch_over_max_bytes_is_refused_before_the_pass_and_names_the_bytes():
    model = small()
    need = recorder.recorded_bytes(model, 2)
    assert need == 2 * (L * H * N * N + (L + 1) * N * D) * 4
    calls = []
    model.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=rf"recording 2 images needs {need:,} bytes; max_bytes is {need - 1:,}. "
                                         r"Record fewer images"):
        with record(model, max_bytes=need - 1):
            model(images())
    assert calls == []  # nothing was computed
    with record(model, max_bytes=need) as rec:
        model(images())
    assert rec.attentions.shape[0] == 2
    with pytest.raises(ValueError, match=r"max_bytes must be a positive int; got 0"):
        with record(model, max_bytes=0):
            pass
