"""The layers of ARCHITECTURE.md hold: every import of every module (function-level ones included) goes to
its own layer or one below, and the four entry points import in any order in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # lowest first; a module belongs to the first prefix that names it
    ["mxfx.formats"],
    ["mxfx.ops", "mxfx.targets", "mxfx.selection", "mxfx.stored_weights", "mxfx.tensor_cache", "mxfx.metrics",
     "mxfx.calibration", "mxfx.recovery", "mxfx.outliers"],
    ["mxfx.schemes", "mxfx.prepared", "mxfx.recipes"],
    ["passes"],
    ["mxfx.dynamo_backend", "mxfx.weight_watch", "mxfx.checkpoint", "mxfx.evaluation", "mxfx.textdata",
     "mxfx.parallel", "mxfx.calibrating", "mxfx.mixed_precision"],
    ["mxfx.cli"],
]


def _layer(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    return None


def _modules() -> dict[str, Path]:
    files = [*ROOT.glob("mxfx/**/*.py"), *ROOT.glob("passes/**/*.py")]
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = f"{base}.{node.module}" if node.level and node.module else (base if node.level else node.module)
            found.add(name)
            found |= {f"{name}.{alias.name}" for alias in node.names if f"{name}.{alias.name}" in _modules()}
    return {name for name in found if name == "mxfx" or name.startswith(("mxfx.", "passes"))}


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m != "mxfx" and _layer(m) is None] == []


def test_imports_go_down_the_layers():
    upward = []
    for module, path in _modules().items():
        if module == "mxfx":  # the face, whose names load lazily
            continue
        for imported in _imports(module, path):
            if imported != "mxfx" and _layer(imported) > _layer(module):
                upward.append(f"{module} imports {imported}")
    assert upward == []


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself can fail: a formats module importing the passes is caught."""
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from passes import quantize_linears\n")
    assert _layer("passes") > _layer("mxfx.formats") and "passes" in _imports("mxfx.formats.bad", fake)


@pytest.mark.parametrize("first", ["passes", "mxfx", "mxfx.formats", "mxfx.checkpoint"])
def test_entry_points_import_in_any_order(first):
    others = [m for m in ("passes", "mxfx", "mxfx.formats", "mxfx.checkpoint") if m != first]
    code = (f"import sys, {first}\n"
            "light = 'passes' not in sys.modules and 'mxfx.dynamo_backend' not in sys.modules\n"
            f"import {', '.join(others)}\n"
            "import mxfx\nassert callable(mxfx.backend) and mxfx.backend.__module__ == 'mxfx.dynamo_backend'\n"
            "print(light)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    if first == "mxfx.formats":
        assert result.stdout.strip() == "True", "import mxfx.formats loaded the passes or the backend"
