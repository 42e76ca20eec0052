"""The README's "Configure an agent" runs as shown: examples/compose with the scripted model, in
process and on a worker; the README's files are the example's files."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_project_file import cli

ROOT = Path(__file__).parent.parent
EXAMPLE = ROOT / "examples" / "compose"


def section_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Configure an agent"):readme.index("## Debugging: replay, fork, diff")]
    return re.findall(r"```\w+\n(.*?)```", section, flags=re.S)


def test_the_readme_shows_the_example_files_whole() -> None:
    blocks = section_blocks()
    for path in ("loopstream.toml", "prompts/calc.md", ".loopstream/skills/haiku/SKILL.md", "hooks/guard.py",
                 "hooks/audit.py", "numbers_server.py"):
        assert (EXAMPLE / path).read_text().rstrip() + "\n" in blocks, f"README does not show {path} as it is"


def test_the_compose_example_runs_as_the_readme_says(tmp_path: Path) -> None:
    pytest.importorskip("mcp")
    work = tmp_path / "compose"
    shutil.copytree(EXAMPLE, work)
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # python3: this one
    # the worker line: started first (it starts while the in-process runs go on); it runs the same agent
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPSTREAM_", "OPENAI_", "ANTHROPIC_"))}
    full_env.update(env, LOOPSTREAM_CONFIG_DIR=str(work / ".no-user-config"))
    out = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "loopstream.cli.app", "worker", "--db", "agents.db",
                               "--provider", "scripted", "--model", "adder", "-q"], cwd=work, env=full_env,
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        listed = cli("agents", cwd=work, env=env)
        assert listed.returncode == 0 and "calc" in listed.stdout and "haiku" in listed.stdout, listed.stderr
        cases = [
            ([], "The result is 1."),
            (["--model", 'calls:numbers__square:{"n": 12}'], "144"),
            (["--model", 'calls:multiply:{"a": 2000000, "b": 3}'], "numbers above a million need a person"),
        ]
        for extra, expected in cases:
            r = cli("run", "--agent", "calc", *extra, "g", cwd=work, env=env)
            assert r.returncode == 0 and expected in r.stdout, r.stderr
        r = cli("run", "--agent", "poet", "--model", 'calls:load_skill:{"name": "haiku"}', "g", cwd=work, env=env)
        assert r.returncode == 0 and "5, 7 and 5 syllables" in r.stdout
        audit = (work / "audit.log").read_text().splitlines()
        assert len(audit) == 3 and all(line.startswith("SessionEnd ") and line.endswith(" done") for line in audit)
        deadline = time.monotonic() + 60
        while "worker " not in (tmp_path / "worker.log").read_text():
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            time.sleep(0.05)
        r = cli("submit", "--db", "agents.db", "--agent", "calc", "--wait", "--timeout", "60", "What is 2 + 1?",
                cwd=work, env=env)
        assert r.returncode == 0 and r.stdout.strip() == "The result is 1.", r.stderr
        deadline = time.monotonic() + 30
        while len((work / "audit.log").read_text().splitlines()) < 4:  # the worker's SessionEnd hook
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        worker.terminate()
        worker.wait(30)
        out.close()
