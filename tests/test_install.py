"""The notebooks' first cell installs vitlab where it is missing (Colab, a bare Jupyter): its logic runs here
against the local checkout, offline, so a broken install line fails CI.

The install line names the repository (``vitlab @ git+https://github.com/vitlab/vitlab``): pip clones it and
builds the package from the commit it finds, as it would from any published copy. Here the same line is
installed from this checkout, ``git+file://<repository>``, which tests what is committed: the package
builds, its shipped weights come with it, and it imports without the checkout on the path.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LESSONS = NOTEBOOKS  # every notebook opens with the same install cell
REPOSITORY = "https://github.com/vitlab/vitlab"
INSTALL_SPEC = f"vitlab @ git+{REPOSITORY}"
INSTALL_LINE = f'%pip install -q "{INSTALL_SPEC}"'
INSTALL_BLOCK = f"""import importlib.util

if importlib.util.find_spec("vitlab") is None:
    {INSTALL_LINE}
"""


def first_code_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])


def install_logic(cell: str) -> str:
    """The first cell up to its %pip line, as plain Python: the %pip line becomes ``install(<its spec>)``."""
    lines = cell.splitlines()
    end = next(i for i, line in enumerate(lines) if line.lstrip().startswith("%pip install"))
    pip = lines[end]
    spec = re.fullmatch(r'(\s*)%pip install -q "([^"]+)"', pip)
    assert spec, f"expected a line %pip install -q \"<spec>\"; got {pip!r}"
    return "\n".join(lines[:end] + [f"{spec.group(1)}install({spec.group(2)!r})"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_installs_the_same_spec(path):
    assert INSTALL_LINE in first_code_cell(path).splitlines() or f"    {INSTALL_LINE}" in first_code_cell(path)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_the_lessons_open_with_the_install_block_and_their_badges_name_the_repository(path):
    assert INSTALL_BLOCK in first_code_cell(path)
    title = "".join(json.loads(path.read_text())["cells"][0]["source"])
    assert f"colab.research.google.com/github/vitlab/vitlab/blob/main/notebooks/{path.name}" in title
    assert "mybinder.org/v2/gh/vitlab/vitlab/main" in title


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
@pytest.mark.parametrize("present", [False, True], ids=["vitlab-missing", "vitlab-present"])
def test_the_first_cell_installs_only_where_vitlab_is_missing(path, present, monkeypatch):
    import importlib.util

    calls = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: (real("json") if present else None) if name == "vitlab" else real(name))
    exec(install_logic(first_code_cell(path)), {"install": calls.append})  # noqa: S102 - the notebook's own cell
    assert calls == ([] if present else [INSTALL_SPEC])


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="installing from the checkout needs git and a git repository")
def test_the_install_line_installs_a_working_vitlab_from_the_checkout(tmp_path):
    target = tmp_path / "site"
    spec = INSTALL_SPEC.replace(f"git+{REPOSITORY}", f"git+file://{ROOT}")
    # --no-deps / --no-index / --no-build-isolation: offline, with this environment's torch and setuptools
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                    "--target", str(target), spec], check=True, cwd=tmp_path, timeout=300)
    assert (target / "vitlab" / "weights" / "mnist_vit.pt").is_file()  # the package data came with it
    script = """
import torch, vitlab
from vitlab.lab import diagrams, exercises
print(vitlab.__file__)
model = vitlab.load_pretrained_mnist()
with torch.no_grad(), vitlab.record(model) as rec:
    logits = model(torch.zeros(2, 1, 28, 28))
print(tuple(logits.shape), tuple(rec.attentions.shape))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    where, shapes = done.stdout.splitlines()
    assert Path(where).is_relative_to(target), f"imported vitlab from {where}, not from the installed copy"
    assert shapes == "(2, 10) (2, 6, 4, 17, 17)"
