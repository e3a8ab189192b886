"""Every code block of README.md runs, so that an example can never name a function that does not exist.

The ```python blocks are executed one by one, each in a fresh namespace, from the repository root; the
first one's comments (shapes, predictions, the shape trace) are checked against what it computed. Each
command line of the ```bash blocks is run, or skipped for a reason given in SKIPPED: a new command line
fails here until it is one or the other. The two ```text blocks are checked against what they quote: the
shipped model's training command (``pretrained.TRAIN_COMMAND``, its flags parsed by the command line) and
the notebooks' first cell (whose install line tests/test_install.py runs).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
BIN = Path(sys.executable).parent  # the environment's scripts: python, vitlab-train, vitlab-evaluate

SKIPPED = {
    "make lab": "tests/test_make_lab.py runs it until JupyterLab answers",
    "make test": "the whole suite, this file included: minutes, and it would run itself",
}


def blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README) if lang == language]


def bash_commands() -> list[str]:
    """Each command line of the bash blocks, its comment dropped."""
    lines = (line.split("#")[0].strip() for code in blocks("bash") for line in code.splitlines())
    return [line for line in lines if line]


def test_the_readme_has_the_blocks_this_file_runs():
    assert len(blocks("python")) == 2
    assert bash_commands()[:2] == ["make lab", "make test"]  # the two commands come first
    assert {lang for lang, _ in BLOCK.findall(README)} == {"python", "bash", "text"}  # no block of another kind
    assert len(blocks("text")) == 2


def test_the_training_command_is_the_shipped_models_and_parses():
    from vitlab.train import build_parser
    from vitlab.training.pretrained import TRAIN_COMMAND

    command = " ".join(blocks("text")[0].replace("\\\n", " ").split())
    assert command == TRAIN_COMMAND
    args = build_parser().parse_args(command.split()[3:])  # after "python -m vitlab.train"
    assert (args.epochs, args.seed, args.elastic, args.val_fraction) == (300, 0, 1.0, 0.1)


def test_the_colab_cell_is_every_notebooks_first_cell():
    import json

    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [cell for cell in json.loads(notebook.read_text())["cells"] if cell["cell_type"] == "code"]
        assert blocks("text")[1].strip() in "".join(cells[0]["source"]), notebook.name


def test_the_library_in_ten_lines_runs_and_its_comments_hold(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(blocks("python")[0], "README.md (the library in ten lines)", "exec"), scope)
    out = capsys.readouterr().out
    rec, logits, labels = scope["rec"], scope["logits"], scope["digits"].labels[:8]
    assert scope["images"].shape == (8, 1, 28, 28) and logits.shape == (8, 10)
    assert (logits.argmax(dim=1) == labels).sum() >= 7  # the shipped model reads real digits
    assert rec.attentions.shape == (8, 6, 4, 17, 17)
    torch.testing.assert_close(rec.attentions.sum(-1), torch.ones(8, 6, 4, 17))
    assert scope["rollout"].shape == (8, 17, 17)
    steps = [name for name, _ in rec.shapes]
    assert steps[:4] == ["input", "patch_embed", "cls_token", "pos_embed"] and steps[-1] == "logits"
    assert "torch.Size([8, 6, 4, 17, 17])" in out and rec.format_shapes() in out


def test_the_interop_example_runs(monkeypatch):
    import vitlab

    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(blocks("python")[1], "README.md (interop)", "exec"), scope)
    vit = scope["vit"]
    assert isinstance(vit, vitlab.ViT) and vit.config.image_size == 224 and vit.config.patch_size == 16


@pytest.mark.parametrize("command", bash_commands())
def test_each_bash_command_runs_or_is_skipped_for_a_reason(command):
    if command in SKIPPED:
        pytest.skip(SKIPPED[command])
    assert command.endswith(" --help"), f"{command!r}: run it here, or add it to SKIPPED with the reason"
    program, *args = command.split()
    if program == "python":
        program = sys.executable
    else:
        assert program in ("vitlab-train", "vitlab-evaluate"), command
        program = str(BIN / program)
    done = subprocess.run([program, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: "), done.stdout


@pytest.mark.parametrize("script", ["vitlab-train", "vitlab-evaluate"])
def test_the_console_scripts_the_readme_names_are_installed(script):
    assert f"installed as {script}" in README
    done = subprocess.run([str(BIN / script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage: "), done.stderr


def test_every_file_the_readme_links_exists():
    links = re.findall(r"\]\(((?!https?:|#)[^)\s]+)\)", README)
    assert "docs/explorer.png" in links and "benchmarks/README.md" in links
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
