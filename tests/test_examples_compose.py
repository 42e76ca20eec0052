"""The README's "Configure an agent" runs as shown: examples/compose with the scripted model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_project_file import cli

EXAMPLE = Path(__file__).parent.parent / "examples" / "compose"


def test_the_compose_example_runs_as_the_readme_says(tmp_path: Path) -> None:
    pytest.importorskip("mcp")
    work = tmp_path / "compose"
    shutil.copytree(EXAMPLE, work)
    listed = cli("agents", cwd=work)
    assert listed.returncode == 0 and "calc" in listed.stdout and "haiku" in listed.stdout, listed.stderr
    cases = [
        ([], "The result is 1."),
        (["--model", 'calls:numbers__square:{"n": 12}'], "144"),
        (["--model", 'calls:multiply:{"a": 2000000, "b": 3}'], "numbers above a million need a person"),
    ]
    for extra, expected in cases:
        r = cli("run", "--agent", "calc", *extra, "g", cwd=work)
        assert r.returncode == 0 and expected in r.stdout, r.stderr
    r = cli("run", "--agent", "poet", "--model", 'calls:load_skill:{"name": "haiku"}', "g", cwd=work)
    assert r.returncode == 0 and "5, 7 and 5 syllables" in r.stdout
