"""docs/architecture.md stays true: its diagram, event list and folder table come from the code."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from loopstream.core import events as ev
from loopstream.core.fsm import mermaid
from tests.test_layers import ALLOWED

ROOT = Path(__file__).resolve().parents[1]
ARCH = (ROOT / "docs" / "architecture.md").read_text()


def between(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name}:begin -->\n(.*?)<!-- {name}:end -->", text, re.S)
    assert m, f"marker {name} missing"
    return m.group(1)


def test_state_diagram_matches_the_table() -> None:
    assert between(ARCH, "fsm").strip() == f"```mermaid\n{mermaid()}\n```"


def test_every_event_type_is_documented() -> None:
    rows = re.findall(r"^\| (\w+) \|", between(ARCH, "events"), re.M)
    assert set(rows) - {"event"} == set(ev.PAYLOAD_TYPES)
    assert between(ARCH, "events").strip() == ev.events_table()  # python -m loopstream.core.fsm docs/architecture.md


def _layout_rows() -> dict[str, tuple[str, str]]:
    rows = re.findall(r"^\| `(\w+)/` \| ([^|]*) \| (.*) \|$", between(ARCH, "layout"), re.M)
    return {folder: (may, what) for folder, may, what in rows}


def test_the_folder_table_names_every_layer_and_what_it_may_import() -> None:
    rows = _layout_rows()
    assert set(rows) == set(ALLOWED)
    for folder, (may, _) in rows.items():
        named = set() if may.strip() in ("—", "anything") else {m.strip() for m in may.split(",")}
        expected = set() if folder in ("cli", "api") else ALLOWED[folder]
        assert named == expected, folder


def test_the_folder_table_names_every_module() -> None:
    for folder, (_, what) in _layout_rows().items():
        named = set(re.findall(r"`(\w+\.py)`", what))
        present = {p.name for p in (ROOT / folder).glob("*.py")} - {"__init__.py"}
        if folder == "api":
            present |= {"__init__.py"}
        assert named == present, f"{folder}/: missing {sorted(present - named)}, stale {sorted(named - present)}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = subprocess.run(
        ["awk", "/<!-- test-command/{found=1; next} found && /^pip install/{print; exit}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert command and command in readme and "pytest" in command
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


def readme_policy(tmp_path: Path) -> Path:
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[agents." not in b)  # not the project file
    path = tmp_path / "policy.toml"
    path.write_text("\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines()))
    return path


def test_readme_policy_example_loads(tmp_path) -> None:
    from loopstream.tools.permissions import decide, load_policy

    policy = load_policy(readme_policy(tmp_path))
    assert decide(policy.permissions, "shell", {"command": "rm -rf x"}).action == "deny"
    assert decide(policy.permissions, "shell", {"command": "ls"}).action == "allow"
    assert decide(policy.permissions, "write_file", {"path": "a"}).action == "ask"
    assert policy.guardrails.input_deny and policy.budgets.max_tokens


def test_policy_doc_example_loads(tmp_path) -> None:
    from loopstream.tools.permissions import decide, load_policy

    block = re.search(r"```toml\n(.*?)```", (ROOT / "docs" / "policy.md").read_text(), re.S).group(1)
    (tmp_path / "p.toml").write_text(block)
    policy = load_policy(tmp_path / "p.toml")
    assert decide(policy.permissions, "shell", {"command": "rm x"}).reason == "no deletions"


def test_readme_embedding_example_builds_its_policy() -> None:
    """The Python example's imports and policy line run as written (the rest needs a model)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if "SessionPolicy" in b]
    setup = block.split("\nwith ")[0]
    scope: dict = {}
    exec(setup, scope)
    assert scope["policy"].budgets.max_tokens == 20_000 and scope["policy"].retries.max_model_attempts == 5


@pytest.mark.local
@pytest.mark.slow
def test_readme_policy_example_passes_on_the_local_model(tmp_path, local_cache) -> None:
    """The example policy is one the bundled local model can run under (an output_schema or a
    reviewer it cannot satisfy would fail every session)."""
    from tests.test_cli import cli

    env = {"LOOPSTREAM_CACHE_DIR": str(local_cache), "LOOPSTREAM_LOCAL_IDLE_SECONDS": "2"}  # its own shared server
    r = cli("run", "What is 40213 + 1999? Use the add tool.", "--policy", str(readme_policy(tmp_path)),
            cwd=tmp_path, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "42212" in r.stdout


def test_the_console_script_points_at_a_real_function() -> None:
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
