"""The folders are layers and imports flow one way: this test fails when one crosses a
layer the wrong way, when a module imports one of ours inside a function (outside cli/),
and when the kernel grows past a third of the package."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# layer -> the layers it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "core": {"schemas"},
    "providers": {"core"},
    "tools": {"core", "providers"},
    "processors": {"core", "providers", "tools"},
    "runtime": {"core", "processors", "providers", "tools"},
    "replay": {"core", "processors", "tools", "runtime"},
    "kafka": {"core", "runtime", "schemas"},  # schemas: the goal contract's .avsc files
    "observe": {"core", "providers", "tools", "processors", "runtime", "replay"},
    "agents": {"core", "providers", "tools", "processors", "runtime"},
    "web": {"core", "providers", "tools", "processors", "runtime", "replay", "observe", "agents"},
    "cli": {"core", "providers", "tools", "processors", "runtime", "replay", "kafka", "schemas", "observe", "agents", "web"},
    "api": {"core", "providers", "tools", "processors", "runtime", "replay", "kafka", "schemas", "observe", "agents"},
}
LAYERS = sorted(ALLOWED)


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported layer, line, inside a function) for each `loopstream.<layer>` import."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [child.module] + ([f"{child.module}.{a.name}" for a in child.names]
                                          if child.module == "loopstream" else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "loopstream" and len(parts) > 1 and parts[1] in ALLOWED:
                    found.append((parts[1], child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_python_folder_of_the_package_is_a_known_layer():
    folders = {p.parent.relative_to(ROOT).parts[0] for p in ROOT.glob("*/__init__.py")}
    assert folders - {"tests", "bench", "examples"} == set(ALLOWED)


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_flow_one_way(layer):
    wrong = [f"{p.relative_to(ROOT)}:{line} imports loopstream.{target}"
             for p in (ROOT / layer).rglob("*.py") for target, line, _ in _imports(p)
             if target != layer and target not in ALLOWED[layer]]
    assert not wrong, f"{layer} may import only {sorted(ALLOWED[layer]) or 'nothing of ours'}:\n" + "\n".join(wrong)


def test_no_function_local_imports_of_our_modules_outside_the_cli():
    local = [f"{p.relative_to(ROOT)}:{line}" for p in _modules() if p.relative_to(ROOT).parts[0] != "cli"
             for _, line, in_function in _imports(p) if in_function]
    assert not local, "import at the top of the module instead:\n" + "\n".join(local)


def test_the_kernel_is_under_a_third_of_the_package():
    lines = {layer: sum(len(p.read_text().splitlines()) for p in (ROOT / layer).rglob("*.py")) for layer in LAYERS}
    assert lines["core"] < sum(lines.values()) / 3, lines


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from loopstream.runtime.inline import Runtime\ndef f():\n    import loopstream.cli.app\n")
    assert _imports(bad) == [("runtime", 1, False), ("cli", 3, True)]
