from __future__ import annotations

from pathlib import Path

import pytest

from loopstream.tools import ToolContext, ToolError, default_registry, tool


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    (tmp_path / "notes.txt").write_text("alpha\nbeta gamma\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.txt").write_text("gamma ray\n")
    return ToolContext(workdir=tmp_path)


def test_decorator_builds_schema_from_signature_and_docstring() -> None:
    @tool
    def greet(name: str, times: int = 1) -> str:
        """Greet someone."""
        return " ".join([f"hi {name}"] * times)

    spec = greet.spec()
    assert spec.description == "Greet someone."
    assert spec.parameters["properties"] == {"name": {"type": "string"}, "times": {"default": 1, "type": "integer"}}
    assert spec.parameters["required"] == ["name"]
    assert greet.invoke({"name": "ada", "times": 2}, ToolContext(Path("."))) == "hi ada hi ada"


def test_arguments_are_validated(ctx) -> None:
    reg = default_registry()
    assert reg.call("add", {"a": "2", "b": 3}, ctx) == "5"  # pydantic coerces numeric strings
    with pytest.raises(ToolError) as info:
        reg.call("add", {"a": [1]}, ctx)
    assert info.value.kind == "invalid_arguments" and "b: Field required" in str(info.value)


def test_calculator_is_safe(ctx) -> None:
    reg = default_registry()
    assert reg.call("calculate", {"expression": "(40213 + 1999) * 2 / 4"}, ctx) == "21106"
    for bad in ("__import__('os').system('true')", "2 ** 99999", "1/0", "x + 1"):
        with pytest.raises(ToolError):
            reg.call("calculate", {"expression": bad}, ctx)


def test_file_tools_read_list_grep_inside_workdir(ctx) -> None:
    reg = default_registry()
    assert reg.call("read_file", {"path": "notes.txt"}, ctx) == "alpha\nbeta gamma\n"
    assert reg.call("list_dir", {}, ctx) == "notes.txt\nsub/"
    assert reg.call("grep", {"pattern": "gamma"}, ctx) == "notes.txt:2: beta gamma\nsub/deep.txt:1: gamma ray"


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "sub/../../x"])
def test_file_tools_refuse_paths_outside_workdir(ctx, path) -> None:
    with pytest.raises(ToolError) as info:
        default_registry().call("read_file", {"path": path}, ctx)
    assert info.value.kind == "permission_denied"


def test_missing_file_and_bad_regex_are_tool_errors(ctx) -> None:
    reg = default_registry()
    with pytest.raises(ToolError, match="no such file"):
        reg.call("read_file", {"path": "nope.txt"}, ctx)
    with pytest.raises(ToolError, match="bad regular expression"):
        reg.call("grep", {"pattern": "("}, ctx)
