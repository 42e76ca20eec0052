"""Skills from real SKILL.md folders: names and descriptions in the prompt, the body loaded by
a tool call whose result is an event (a replay never reads the file), hostile skills skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loopstream.agents.skills import SkillError, discover, read_skill
from loopstream.core.sqlite_log import SQLiteLog
from tests.test_project_file import cli

BODY = "Greet the user by name.\nAlways end with 'cheers'."
SKILL = f"---\nname: greeting\ndescription: How to greet people politely.\n---\n{BODY}\n"


def skill(root: Path, folder: str, text: str | bytes) -> Path:
    (root / folder).mkdir(parents=True, exist_ok=True)
    path = root / folder / "SKILL.md"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_skill_is_listed_then_loaded_by_a_tool_call_and_replayed_without_the_file(tmp_path: Path) -> None:
    skills = tmp_path / ".loopstream" / "skills"
    path = skill(skills, "greeting", SKILL)
    (tmp_path / "loopstream.toml").write_text(
        '[agents.greeter]\nprovider = "scripted"\nskills = ["greeting"]\ntools = []\n')
    model = 'calls:load_skill:{"name": "greeting"}'
    r = cli("run", "--agent", "greeter", "--model", model, "--db", "x.db", "greet Ann", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"# skill greeting\n\n{BODY}"
    log = SQLiteLog(tmp_path / "x.db")
    sid = log.sessions()[0].session_id
    events = log.read(sid)
    started = events[0].payload
    assert "greeting: How to greet people politely." in started.system_prompt
    assert "cheers" not in started.system_prompt  # progressive disclosure: the body is not in the context
    assert started.tools == ["load_skill"]
    recorded = json.loads(started.agent_json)["skills"]
    assert recorded[0]["name"] == "greeting" and recorded[0]["path"] == str(path.resolve())
    completed = [e.payload for e in events if e.type == "ToolCompleted"]
    assert completed[0].name == "load_skill" and BODY in completed[0].result
    path.unlink()  # replay reads the log, never the skill
    replayed = cli("replay", sid, "--db", "x.db", cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr


def test_unknown_skill_name_is_one_line(tmp_path: Path) -> None:
    skill(tmp_path / ".loopstream" / "skills", "greeting", SKILL)
    (tmp_path / "loopstream.toml").write_text('[agents.a]\nprovider = "scripted"\nskills = ["greetings"]\n')
    r = cli("run", "--agent", "a", "g", cwd=tmp_path)
    assert r.returncode == 2 and "agents.a.skills: unknown skill 'greetings' (found: greeting)" in r.stderr


@pytest.mark.parametrize(("text", "reason"), [
    (b"---\nname: big\ndescription: d\n---\n" + b"x" * 300_000, "larger than"),
    (b"---\nname: [unclosed\ndescription: d\n---\nbody", "front matter is not valid YAML"),
    (b"---\ndescription: no name\n---\nbody", "name: required"),
    (b"---\nname: x\n---\nbody", "description: required"),
    (b"no front matter at all", "no YAML front matter"),
    (b"---\nname: x\ndescription: \xff\n---\n", "not UTF-8"),
    (b"---\nname: Bad Name!\ndescription: d\n---\n", "is not lowercase letters"),
    (b"---\n- a list\n---\n", "front matter must be a mapping"),
    (b"---\nname: x\ndescription: <script>\xe2\x80\xae\n---\n", None),  # markup is only text: loads
])
def test_hostile_skills_are_skipped_with_a_warning(tmp_path: Path, text: bytes, reason: str | None) -> None:
    path = skill(tmp_path, "s", text)
    skill(tmp_path, "good", SKILL)
    found, warnings = discover([tmp_path])
    if reason is None:
        assert "x" in found and not warnings
        return
    assert list(found) == ["greeting"]
    assert len(warnings) == 1 and str(path) in warnings[0] and reason in warnings[0]
    with pytest.raises(SkillError, match=reason):
        read_skill(path.parent)


def test_symlinked_skills_are_skipped(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    skill(outside, "greeting", SKILL)
    root = tmp_path / "skills"
    root.mkdir()
    (root / "linked").symlink_to(outside / "greeting")
    (root / "file").mkdir()
    (root / "file" / "SKILL.md").symlink_to(outside / "greeting" / "SKILL.md")
    found, warnings = discover([root])
    assert not found and len(warnings) == 2 and all("symlink" in w for w in warnings)


def test_first_folder_wins_and_agents_lists_skills_and_warnings(tmp_path: Path) -> None:
    first, second = tmp_path / ".loopstream" / "skills", tmp_path / "user" / "skills"
    skill(first, "greeting", SKILL)
    skill(second, "greeting", SKILL.replace("politely", "loudly"))
    found, warnings = discover([first, second])
    assert "politely" in found["greeting"].description and "already defined" in warnings[0]
    skill(first, "broken", "---\nname: [\n---\n")
    (tmp_path / "loopstream.toml").write_text('[agents.a]\nskills = ["*"]\n')
    r = cli("agents", cwd=tmp_path, env={"LOOPSTREAM_CONFIG_DIR": str(tmp_path / "user")})
    assert r.returncode == 0, r.stderr
    assert "greeting" in r.stdout and "How to greet people politely." in r.stdout
    assert "warning: skipped skill" in r.stderr and "broken" in r.stderr
