"""Everything the package and the notebooks import is declared, in pyproject.toml (pip) and in
environment.yml (Binder, conda-forge), and the two files ask for the same versions.

Binder installs vitlab with ``pip install --no-deps`` on top of environment.yml, so a package missing there,
or older than pyproject.toml allows, would only show when a notebook fails to import it.
"""

import ast
import json
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ENVIRONMENT = yaml.safe_load((ROOT / "environment.yml").read_text())
# The groups Binder needs: the package, its notebooks, pretrained models from elsewhere; not the tests (dev).
BINDER_GROUPS = ("notebooks", "interop")
CONDA_NAMES = {"torch": "pytorch-cpu"}  # pip name -> conda-forge name, where they differ
IMPORT_NAMES = {"IPython": "ipython", "skimage": "scikit-image"}  # import name -> pip name, where not installed here


def requirements(groups=BINDER_GROUPS) -> dict[str, Requirement]:
    """{canonical pip name: Requirement} of pyproject.toml's dependencies and the given extras."""
    lines = list(PYPROJECT["project"]["dependencies"])
    for group in groups:
        lines += PYPROJECT["project"]["optional-dependencies"][group]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if canonicalize_name(r.name) != "vitlab"}


def conda_requirements() -> dict[str, str]:
    """{canonical conda name: version specifier ('' for none)} of environment.yml's conda packages."""
    found = {}
    for entry in ENVIRONMENT["dependencies"]:
        if not isinstance(entry, str):
            continue  # a pip: section
        name, spec = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", entry).groups()
        found[canonicalize_name(name)] = spec.replace(" ", "")
    return found


def code_of_notebook(path: Path) -> str:
    """The code cells of a notebook as one Python source, IPython magics (%pip, %config) left out."""
    cells = json.loads(path.read_text())["cells"]
    lines = []
    for cell in cells:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"])
            lines += [line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
                      for line in source.splitlines()]  # a magic becomes a `pass`, so an `if` above it still parses
    return "\n".join(lines)


def imported_modules(source: str) -> set[str]:
    """Top-level names of every module that ``source`` imports (also inside functions), relative imports left out."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def third_party_imports() -> dict[str, set[str]]:
    """{top-level module: files that import it} over vitlab/ and notebooks/, the standard library left out."""
    sources = {path: path.read_text() for path in sorted((ROOT / "vitlab").rglob("*.py"))}
    sources.update({path: code_of_notebook(path) for path in sorted((ROOT / "notebooks").glob("*.ipynb"))})
    found: dict[str, set[str]] = {}
    for path, source in sources.items():
        for name in imported_modules(source) - set(sys.stdlib_module_names) - {"vitlab", "__future__"}:
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def distribution(module: str) -> str:
    """Top-level import name -> canonical pip name of the distribution that provides it."""
    dists = packages_distributions().get(module) or [IMPORT_NAMES.get(module, module)]
    return canonicalize_name(dists[0])


def test_the_scan_sees_the_imports_it_should():
    found = third_party_imports()
    assert {"torch", "einops", "matplotlib", "pandas", "IPython", "skimage", "timm"} <= set(found)
    assert "notebooks/04_dimension_walk.ipynb" in found["pandas"]
    assert not {"os", "math", "vitlab"} & set(found)


def test_every_import_is_declared_in_pyproject():
    declared = requirements()
    missing = {module: sorted(files) for module, files in third_party_imports().items()
               if distribution(module) not in declared}
    assert not missing, f"imported but not in pyproject.toml's dependencies or {BINDER_GROUPS} extras: {missing}"


def test_every_import_is_declared_in_environment_yml():
    conda = conda_requirements()
    missing = {}
    for module, files in third_party_imports().items():
        name = distribution(module)
        if canonicalize_name(CONDA_NAMES.get(name, name)) not in conda:
            missing[module] = sorted(files)
    assert not missing, f"imported but not in environment.yml: {missing}"


@pytest.mark.parametrize("name", sorted(requirements()))
def test_environment_yml_asks_for_pyprojects_versions(name):
    conda = conda_requirements()
    conda_name = canonicalize_name(CONDA_NAMES.get(name, name))
    assert conda_name in conda, f"pyproject.toml needs {requirements()[name]}; environment.yml has no {conda_name}"
    wanted = str(requirements()[name].specifier)
    assert conda[conda_name] == wanted, (
        f"pyproject.toml asks for {name}{wanted}; environment.yml for {conda_name}{conda[conda_name]}"
    )


def test_environment_yml_runs_the_notebooks():
    conda = conda_requirements()
    assert "ipykernel" in conda and "pip" in conda
    assert any(entry.startswith("python=") for entry in ENVIRONMENT["dependencies"] if isinstance(entry, str))


def test_postbuild_installs_without_dependencies_and_then_checks_them():
    postbuild = (ROOT / "postBuild").read_text()
    assert "pip install --no-deps -e ." in postbuild
    assert 'requires("vitlab")' in postbuild and "raise SystemExit" in postbuild
