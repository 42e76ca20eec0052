"""The shell tool under bubblewrap (tools/sandbox.py) and scope control (tools/scope.py):
real escape attempts through real bwrap, each of which must fail, and the policy that
records the sandbox a session ran under."""
from __future__ import annotations

import http.server
import json
import os
import shutil
import socketserver
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loopstream.cli.app import app
from loopstream.core.policy import PolicyError, Sandbox, Scope, SessionPolicy, load_policy, parse_policy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.tools import ToolContext, ToolError, default_registry
from loopstream.tools import sandbox as sb
from loopstream.tools.scope import check as scope_check
from loopstream.tools.scope import split_commands
from loopstream.tools.workspace import side_effect_registry
from tests.helpers import wait_for

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap (apt-get install bubblewrap)")


@pytest.fixture
def home(tmp_path: Path, monkeypatch) -> Path:
    """A home directory with an SSH key, outside the workdir."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True)
    (h / ".ssh" / "id_rsa").write_text("-----BEGIN PRIVATE KEY----- SECRET-KEY-MATERIAL\n")
    monkeypatch.setenv("HOME", str(h))
    return h


@pytest.fixture
def work(tmp_path: Path, home: Path) -> Path:
    root = tmp_path / "work"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "config").write_text("[core]\n")
    (root / "a.txt").write_text("a\n")
    return root


def sh(work: Path, command: str, timeout_s: float = 30, **sandbox) -> str:
    ctx = ToolContext(workdir=work, policy=SessionPolicy(sandbox=Sandbox(**sandbox)))
    return side_effect_registry().call("shell", {"command": command, "timeout_s": timeout_s}, ctx)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def procs_with(marker: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes() and alive(int(d)):
                    out.append(int(d))
            except OSError:
                pass
    return out


# -- the file system ---------------------------------------------------------------------
def test_the_workdir_is_writable_and_the_rest_is_not(work: Path, tmp_path: Path) -> None:
    out = sh(work, "echo new > b.txt; mkdir -p sub && echo x > sub/c; cat a.txt")
    assert out.startswith("exit code 0") and (work / "b.txt").read_text() == "new\n" and (work / "sub/c").exists()
    outside = tmp_path / "outside.txt"  # a sibling of the workdir
    target = f"/usr/loopstream-escape-{uuid.uuid4().hex[:8]}"
    out = sh(work, f"echo pwned > {outside}; echo pwned > {target}; echo pwned > ../sibling.txt; echo done")
    assert "done" in out and not outside.exists() and not Path(target).exists()
    assert not (tmp_path / "sibling.txt").exists()
    assert "Read-only file system" in out


def test_git_and_loopstream_inside_the_workdir_are_read_only(work: Path) -> None:
    (work / ".loopstream").mkdir()
    out = sh(work, "echo evil >> .git/config; rm -rf .git; touch .loopstream/x; echo done")
    assert "done" in out and (work / ".git" / "config").read_text() == "[core]\n"
    assert not (work / ".loopstream" / "x").exists()


def test_home_and_ssh_keys_are_hidden(work: Path, home: Path) -> None:
    out = sh(work, "cat ~/.ssh/id_rsa; ls -a ~; cat $HOME/.ssh/id_rsa; echo done")
    assert "SECRET-KEY-MATERIAL" not in out and "done" in out
    assert "No such file" in out


def test_symlinks_do_not_escape(work: Path, home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "to_outside").symlink_to(outside)
    (work / "to_ssh").symlink_to(home / ".ssh")
    (work / "to_usr").symlink_to("/usr")
    out = sh(work, "echo pwned > to_outside/x; cat to_ssh/id_rsa; echo pwned > to_usr/x; echo done")
    assert "done" in out and "SECRET-KEY-MATERIAL" not in out
    assert not (outside / "x").exists() and not Path("/usr/x").exists()


def test_read_only_mode_writes_nothing_and_full_mode_writes_outside(work: Path, tmp_path: Path) -> None:
    out = sh(work, "echo x > new.txt; echo done", mode="read-only")
    assert "done" in out and not (work / "new.txt").exists()
    outside = tmp_path / "full.txt"
    assert sh(work, f"echo x > {outside}", mode="full").startswith("exit code 0") and outside.exists()
    none = sh(work, f"echo $$ > pid.txt; cat {tmp_path}/full.txt", mode="none")
    assert none.startswith("exit code 0\nx")


# -- processes ----------------------------------------------------------------------------
def test_host_processes_are_invisible_and_unkillable(work: Path) -> None:
    victim = subprocess.Popen(["sleep", "300"])
    try:
        out = sh(work, f"kill -9 {victim.pid}; ls /proc/{victim.pid}; ps -e -o pid= | wc -l; echo done")
        assert "done" in out and alive(victim.pid)
        count = int(out.strip().splitlines()[-2])
        assert count < 10  # only the sandbox's own processes (bwrap's init, bash, ps, wc)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("how", ["setsid sleep {m} &", "nohup sleep {m} > /dev/null 2>&1 &",
                                 "( (sleep {m} &) & )", "setsid -f sh -c 'sleep {m}'"])
def test_background_processes_do_not_survive_the_call(work: Path, how: str) -> None:
    marker = f"{time.time() % 1000:.6f}".lstrip("0") + "1"
    seconds = f"1000{marker}"
    out = sh(work, how.format(m=seconds) + "; echo started")
    assert "started" in out
    deadline = time.monotonic() + 5
    while procs_with(seconds) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert procs_with(seconds) == []


def test_a_fork_bomb_is_bounded_and_cleaned_up(work: Path) -> None:
    limits = sb.Limits.make(Sandbox(max_processes=40))
    bounded = limits.processes_bounded
    limits.close()
    if not bounded:
        pytest.skip("running as root without a writable pids cgroup: the process count cannot be bounded")
    marker = f"bomb{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        out = sh(work, f"{marker}() {{ {marker} | {marker} & }}; {marker}; sleep 3; echo survived", timeout_s=20,
                 max_processes=40)
    except ToolError as exc:  # a timeout (bash retrying its forks) is a bound too
        out = str(exc)
    assert "Resource temporarily unavailable" in out and time.monotonic() - started < 25
    time.sleep(0.3)
    assert procs_with(marker) == []
    parent = sb.PIDS_CGROUP / "loopstream"
    wait_for(lambda: not [d for d in parent.glob("*") if d.is_dir()], timeout=5)
    assert not [d for d in parent.glob("*") if d.is_dir()] if parent.exists() else True  # its cgroup is removed


def test_memory_cpu_and_file_size_are_limited(work: Path) -> None:
    out = sh(work, "python3 -c 'x = bytearray(1 << 30); print(len(x))'", memory_mb=256)
    assert "MemoryError" in out and not out.startswith("exit code 0")
    out = sh(work, "head -c 5000000 /dev/zero > big.bin; echo $?", file_size_mb=1)
    assert (work / "big.bin").stat().st_size <= 1 << 20 and "File size limit" in out or "too large" in out.lower()
    start = time.monotonic()
    out = sh(work, "python3 -c 'while True: pass'", cpu_seconds=1)
    assert time.monotonic() - start < 15 and not out.startswith("exit code 0")


def test_huge_output_is_capped(work: Path) -> None:
    out = sh(work, "head -c 50000000 /dev/zero | tr '\\0' a; echo; echo END")
    assert len(out) < 20_000 and "bytes omitted" in out and out.rstrip().endswith("END")


# -- the network ---------------------------------------------------------------------------
@pytest.fixture
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"REACHED-THE-HOST")

        def log_message(self, *a):
            pass

    httpd = socketserver.TCPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_no_network_by_default_and_network_when_allowed(work: Path, server: int) -> None:
    fetch = (f"python3 -c \"import urllib.request; "
             f"print(urllib.request.urlopen('http://127.0.0.1:{server}/', timeout=3).read().decode())\"")
    out = sh(work, fetch)
    assert "REACHED-THE-HOST" not in out and not out.startswith("exit code 0")
    assert "REACHED-THE-HOST" in sh(work, fetch, network=True)


# -- unavailable ---------------------------------------------------------------------------
def test_missing_or_broken_bwrap_refuses_instead_of_running_unsandboxed(work: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    monkeypatch.setenv(sb.BWRAP_ENV, str(tmp_path / "no-such-bwrap"))
    with pytest.raises(ToolError) as err:
        sh(work, "echo ran > ran.txt")
    assert err.value.kind == "sandbox_unavailable" and "--sandbox none" in str(err.value)
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv(sb.BWRAP_ENV, str(broken))
    with pytest.raises(ToolError) as err:
        sh(work, "echo ran > ran.txt")
    assert err.value.kind == "sandbox_unavailable" and "No permissions" in str(err.value)
    assert not (work / "ran.txt").exists()
    assert sh(work, "echo ran > ran.txt", mode="none").startswith("exit code 0")  # the explicit opt-out


# -- scope -----------------------------------------------------------------------------------
def test_scope_checks_commands_and_paths(work: Path, home: Path) -> None:
    scope = Scope(allowed_commands=["echo *", "cat *", "re:python3? -m pytest.*"], allowed_paths=["/opt/data"])
    ok = [("shell", "echo hi && cat a.txt | cat -n"), ("shell", "python -m pytest -q"),
          ("shell", "cat /opt/data/x"), ("read_file", None)]
    for tool, command in ok:
        args = {"command": command} if command else {"path": "a.txt"}
        assert scope_check(scope, tool, args, work) is None, command
    denied = {"rm -rf a.txt": "matches none of allowed_commands", "echo $(id)": "command substitution",
              "cat ~/.ssh/id_rsa": "outside the workdir", "cat ../../etc/passwd": "outside the workdir",
              "echo x > /etc/x": "outside the workdir", "echo a; curl x": "'curl x'"}
    for command, why in denied.items():
        assert why in (scope_check(scope, "shell", {"command": command}, work) or ""), command
    assert "outside" in scope_check(scope, "read_file", {"path": "../secret"}, work)
    assert scope_check(Scope(allowed_paths=["src/*"]), "write_file", {"path": "docs/x.md"}, work)
    assert scope_check(Scope(allowed_paths=["src/*"]), "write_file", {"path": "src/x.py"}, work) is None
    assert split_commands("a 'b;c' | d\ne") == [["a", "b;c"], ["d"], ["e"]]
    assert "cannot be parsed" in scope_check(scope, "shell", {"command": "echo 'unclosed"}, work)


def test_a_scope_violation_is_a_scope_denied_event_and_nothing_runs(tmp_path: Path, work: Path) -> None:
    policy = SessionPolicy(scope=Scope(allowed_commands=["echo *"]))
    provider = ScriptedProvider([
        ModelReply(tool_calls=[ToolCall(call_id="c1", name="shell", arguments={"command": "touch pwned"})]),
        ModelReply(tool_calls=[ToolCall(call_id="c2", name="shell", arguments={"command": "echo fine"})]),
        ModelReply(text="ok"),
    ])
    config = SessionConfig(provider="scripted", model="scripted", tools=["shell"], workdir=str(work), policy=policy)
    with SQLiteLog(tmp_path / "log.db") as log:
        rt = build_runtime(log, provider, default_registry(allow_writes=True))
        sid = rt.start_session("try", config)
        assert rt.run_session(sid).status == "done"
        events = log.read(sid)
    failed = [e.payload for e in events if e.type == "ToolFailed"]
    assert [(f.call_id, f.error_kind) for f in failed] == [("c1", "scope_denied")] or \
        [f.error_kind for f in failed] == ["scope_denied"]
    assert "allowed_commands" in failed[0].message and not (work / "pwned").exists()
    assert [e.payload.call_id.endswith("c1") for e in events if e.type == "WorkspaceCheckpointed"] == [False]
    started = json.loads(events[0].payload.config_json)
    assert started["sandbox"] == {"mode": "workspace-write", "network": False}
    assert started["scope"] == {"allowed_commands": ["echo *"]}


# -- policy and CLI -------------------------------------------------------------------------
def test_policy_sections_are_strict(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text('[sandbox]\nmode = "workspace-write"\nnetwrok = true\n')
    with pytest.raises(PolicyError, match=r"sandbox\.netwrok: unknown key; did you mean 'network'"):
        load_policy(f)
    with pytest.raises(PolicyError, match=r"sandbox\.mode"):
        parse_policy({"sandbox": {"mode": "danger"}})
    with pytest.raises(PolicyError, match=r"scope\.allowed_commands"):
        parse_policy({"scope": {"allowed_commands": "git *"}})
    f.write_text('[sandbox]\nmode = "read-only"\nmemory_mb = 512\n[scope]\nallowed_paths = ["src/*"]\n')
    p = load_policy(f)
    assert p.sandbox.mode == "read-only" and p.scope.allowed_paths == ["src/*"]
    assert "sandbox" not in json.loads(SessionPolicy().to_config_json())  # no code tool: not recorded


def test_cli_run_sandbox_flags_and_errors(tmp_path: Path, work: Path, server: int, monkeypatch) -> None:
    runner = CliRunner()
    db = str(tmp_path / "cli.db")
    base = ["run", "--db", db, "--provider", "scripted", "--tools", "shell", "--allow-writes", "--workdir", str(work)]
    r = runner.invoke(app, base + ["go"])  # the adder script with no add tool: one clear line
    assert r.exit_code == 2 and "calls add, which --tools does not include" in r.output and "Traceback" not in r.output
    fetch = f"shell:curl -s -m 3 http://127.0.0.1:{server}/ || echo NO-NETWORK"
    r = runner.invoke(app, base + ["--model", fetch, "-q", "go"])
    assert r.exit_code == 0 and "NO-NETWORK" in r.output
    r = runner.invoke(app, base + ["--model", fetch, "--network", "-q", "go"])
    assert r.exit_code == 0 and "REACHED-THE-HOST" in r.output
    r = runner.invoke(app, base + ["--model", "shell:touch x", "--sandbox", "read-only", "-q", "go"])
    assert "Read-only file system" in r.output and not (work / "x").exists()
    r = runner.invoke(app, base + ["--sandbox", "danger", "go"])
    assert r.exit_code == 2 and "--sandbox 'danger'" in r.output
    monkeypatch.setenv(sb.BWRAP_ENV, "/nonexistent/bwrap")
    r = runner.invoke(app, base + ["--model", "shell:touch y", "go"])
    assert "sandbox_unavailable" in r.output and not (work / "y").exists()
    with SQLiteLog(db) as log:
        modes = [json.loads(log.read(s.session_id)[0].payload.config_json)["sandbox"]["mode"] for s in log.sessions()]
    assert sorted(modes) == ["read-only", "workspace-write", "workspace-write", "workspace-write"]


def test_escape_attempts_in_a_session_fail_and_each_is_in_the_log(tmp_path: Path, work: Path, home: Path,
                                                                   server: int) -> None:
    attempts = {
        "outside": f"echo pwned > {tmp_path}/outside.txt",
        "ssh": "cat ~/.ssh/id_rsa",
        "git": "echo evil >> .git/config",
        "net": f"curl -s -m 3 http://127.0.0.1:{server}/ || echo NO-NETWORK",
        "orphan": "setsid sleep 4242.4242 & echo left",
        "memory": "python3 -c 'bytearray(1 << 33)'",
    }
    calls = [ToolCall(call_id=k, name="shell", arguments={"command": c}) for k, c in attempts.items()]
    provider = ScriptedProvider([ModelReply(tool_calls=calls), ModelReply(text="tried")])
    config = SessionConfig(provider="scripted", model="scripted", tools=["shell"], workdir=str(work),
                           policy=SessionPolicy(sandbox=Sandbox(memory_mb=512)))
    with SQLiteLog(tmp_path / "log.db") as log:
        rt = build_runtime(log, provider, default_registry(allow_writes=True))
        sid = rt.start_session("escape", config)
        assert rt.run_session(sid).status == "done"
        results = {e.payload.call_id.rsplit(".", 1)[-1]: e.payload.result for e in log.read(sid)
                   if e.type == "ToolCompleted"}
    assert set(results) == set(attempts)  # every attempt ran, and its outcome is an event
    assert not (tmp_path / "outside.txt").exists()  # it went to the sandbox's private /tmp, gone with it
    assert "No such file" in results["ssh"] and "SECRET-KEY-MATERIAL" not in results["ssh"]
    assert "Read-only file system" in results["git"] and (work / ".git/config").read_text() == "[core]\n"
    assert "NO-NETWORK" in results["net"] and "REACHED-THE-HOST" not in results["net"]
    assert "MemoryError" in results["memory"]
    assert wait_for(lambda: not procs_with("4242.4242"), timeout=5)


def test_limits_without_prlimit_are_set_in_the_child(work: Path, tmp_path: Path, monkeypatch) -> None:
    """No prlimit on PATH: the rlimits (and the pids cgroup) are applied by a preexec_fn instead."""
    monkeypatch.setenv(sb.BWRAP_ENV, shutil.which("bwrap"))
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there: no prlimit, no bash
    assert sb.Limits(Sandbox()).wrap(["x"])[1] is not None
    out = sh(work, "/usr/bin/python3 -c 'bytearray(1 << 30)'; echo $?", memory_mb=256)
    assert "MemoryError" in out
    out = sh(work, "/usr/bin/python3 -c 'import resource; print(resource.getrlimit(resource.RLIMIT_FSIZE))'",
             file_size_mb=3)
    assert f"({3 << 20}, {3 << 20})" in out
