"""The package's layout: subpackages in the order a learner meets them, lower layers never importing
higher ones, and no native code anywhere in vitlab."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "vitlab"
# Lowest first. The command lines (vitlab/train.py, vitlab/evaluate.py) and __init__ sit on top of all four.
LAYERS = ["model", "inside", "training", "lab"]
TOP = len(LAYERS)


def layer_of(module: str) -> int:
    """'vitlab.model.attention' -> 0; 'vitlab.train' -> TOP."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else TOP


def imported_vitlab_modules(path: Path) -> list[str]:
    """Every vitlab module that ``path`` imports, relative imports resolved, as dotted names."""
    module = "vitlab." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names] if not node.module else [target]
            found += [name for name in names if name.startswith("vitlab")]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("vitlab")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_layer(path):
    module = "vitlab." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    own = layer_of(module)
    # vitlab.__version__ is the package's metadata, not code of a higher layer (checkpoints record it).
    higher = [name for name in imported_vitlab_modules(path) if layer_of(name) > own and name != "vitlab.__version__"]
    assert higher == [], f"{module} (layer {own}) imports from higher layers: {higher}"


def test_the_layer_check_sees_a_violation():
    # vitlab/__init__.py imports vitlab.training.pretrained: at layer "model" that would be refused.
    imports = imported_vitlab_modules(PACKAGE / "__init__.py")
    assert "vitlab.training.pretrained" in imports and layer_of("vitlab.training.pretrained") > layer_of("vitlab.model")


def test_no_native_code_in_the_package():
    native = [p for p in PACKAGE.rglob("*") if p.suffix in {".c", ".cc", ".cpp", ".cu", ".h", ".hpp", ".so", ".pyd"}]
    assert native == []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in node.names}
        modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not ({"ctypes", "cffi", "load_inline", "cpp_extension"} & (names | modules)), path
        assert not any(m.startswith(("ctypes", "torch.utils.cpp_extension")) for m in modules), path


def test_importing_vitlab_and_building_a_vit_loads_no_library_of_its_own():
    code = (
        "import sys, vitlab; vitlab.ViT(); vitlab.load_pretrained_mnist()\n"
        "maps = open('/proc/self/maps').read() if sys.platform == 'linux' else ''\n"
        "import os; root = os.path.dirname(vitlab.__file__)\n"
        "print([line for line in maps.splitlines() if root in line or 'vitlab' in line.split('/')[-1]])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
