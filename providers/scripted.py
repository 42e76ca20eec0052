"""A scripted model for tests and benchmarks of the loop (never a user's default).

It answers from a list of replies or a function of the conversation, so a test can
drive any sequence of tool calls and answers without a model server.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from loopstream.core import cancel
from loopstream.providers.base import (
    Message,
    ModelReply,
    ProviderError,
    Sampling,
    ToolCall,
    ToolSpec,
)

Script = Callable[[list[Message]], ModelReply]


class ScriptedProvider:
    name = "scripted"

    def __init__(self, script: Script | Sequence[ModelReply | ProviderError], model: str = "scripted") -> None:
        self.model = model
        self.calls = 0
        self.samplings: list[Sampling | None] = []  # what each call was asked to sample with
        self.timeouts: list[float | None] = []  # the time each call was given (a script does not stop early)
        self._script = script

    def complete(self, messages: list[Message], tools: list[ToolSpec], sampling: Sampling | None = None, *,
                 timeout: float | None = None) -> ModelReply:
        self.calls += 1
        self.samplings.append(sampling)
        self.timeouts.append(timeout)
        if callable(self._script):
            return self._script(messages)
        step = sum(1 for m in messages if m.role == "assistant")
        item = self._script[min(step, len(self._script) - 1)]
        if isinstance(item, ProviderError):
            raise item
        return item


def adder_script(tool_steps: int | str = 1) -> Script:
    """Calls `add` (adding 1 to the last result) until the result reaches `tool_steps`,
    then answers with it. It reads only the latest tool result, so it keeps counting
    correctly when older turns were compacted away."""
    tool_steps = int(tool_steps)

    def script(messages: list[Message]) -> ModelReply:
        results = [m.content for m in messages if m.role == "tool"]
        done = int(results[-1]) if results else 0
        if done < tool_steps:
            call = ToolCall(call_id=f"c{done}", name="add", arguments={"a": done, "b": 1})
            return ModelReply(text="", tool_calls=[call], input_tokens=10 + done, output_tokens=5, mode="native")
        return ModelReply(text=f"The result is {done}.", input_tokens=10 + done, output_tokens=6)

    return script


def reviewer_script(allow: int | str = 1) -> Script:
    """A tool-call reviewer (processors/guardrails.py) that allows every call (`reviewer`)
    or blocks every one (`reviewer:0`)."""
    verdict = '{"allow": true, "reason": "scripted reviewer allows"}' if int(allow) else \
        '{"allow": false, "reason": "scripted reviewer blocks every call"}'

    def script(messages: list[Message]) -> ModelReply:
        return ModelReply(text=verdict, input_tokens=20, output_tokens=10)

    return script


def down_script() -> Script:
    """A model that is always down (a retryable 503), to exercise retries and fallbacks."""

    def script(messages: list[Message]) -> ModelReply:
        raise ProviderError("the scripted model is down", retryable=True, status=503, kind="server_error")

    return script


def slow_script(seconds: str = "1") -> Script:
    """The adder counting to 1, waiting `seconds` before each reply (to interrupt a run): a
    wait that a cancel of the current token ends at once, as it ends a real model's request."""
    adder, delay = adder_script(1), float(seconds)

    def script(messages: list[Message]) -> ModelReply:
        cancel.sleep(delay)
        return adder(messages)

    return script


def reads_script(path: str = "reply.txt") -> Script:
    """Calls read_file(path), then answers with the file's text exactly (undecodable bytes
    as lone surrogates): a reply and a tool result that say whatever the file says."""

    def script(messages: list[Message]) -> ModelReply:
        if not any(m.role == "tool" for m in messages):
            call = ToolCall(call_id="r0", name="read_file", arguments={"path": path})
            return ModelReply(text="", tool_calls=[call], input_tokens=10, output_tokens=5, mode="native")
        text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
        return ModelReply(text=text, input_tokens=10, output_tokens=5)

    return script


def shell_script(command: str = "echo hello") -> Script:
    """Calls shell(command) once, then answers with the tool's result (or its error) exactly."""

    def script(messages: list[Message]) -> ModelReply:
        results = [m.content for m in messages if m.role == "tool"]
        if not results:
            call = ToolCall(call_id="s0", name="shell", arguments={"command": command})
            return ModelReply(text="", tool_calls=[call], input_tokens=10, output_tokens=5, mode="native")
        return ModelReply(text=results[-1] or "(empty)", input_tokens=10, output_tokens=5)

    return script


FIX_VERSIONS = ("def add(a, b):\n    return a - b\n", "def add(a, b):\n    return a * b  # try\n",
                "def add(a, b):\n    return a + b  # fixed\n")  # sizes differ: a stale .pyc is never used


def goalfix_script(delay: str = "0") -> Script:
    """Goal mode's test model: fixes `calc.py` over several iterations. Each turn that starts
    from the goal or from a failed verification logs the attempt with `shell` (a
    non-idempotent call) and writes the next version of calc.py (two wrong ones, then the
    right one); after the tool results it says it is done. It waits `delay` seconds per reply."""
    wait = float(delay)

    def script(messages: list[Message]) -> ModelReply:
        if wait:
            cancel.sleep(wait)
        failures = sum(1 for m in messages if m.role == "user" and m.content.startswith("The goal is not reached"))
        if messages[-1].role == "tool":
            return ModelReply(text=f"attempt {failures + 1} is written", input_tokens=20, output_tokens=5)
        version = FIX_VERSIONS[min(failures, len(FIX_VERSIONS) - 1)]
        calls = [ToolCall(call_id=f"log{failures}", name="shell",
                          arguments={"command": f"echo attempt-{failures + 1} >> attempts.log"}),
                 ToolCall(call_id=f"fix{failures}", name="write_file", arguments={"path": "calc.py", "content": version})]
        return ModelReply(text="", tool_calls=calls, input_tokens=20, output_tokens=10, mode="native")

    return script


def calls_script(spec: str) -> Script:
    """`TOOL:JSON_ARGUMENTS`: calls TOOL once with those arguments, then answers with what the
    tool returned (or the failure the model was told), exactly."""
    name, _, arguments = spec.partition(":")
    args = json.loads(arguments or "{}")
    if not name or not isinstance(args, dict):
        raise ValueError(spec)

    def script(messages: list[Message]) -> ModelReply:
        results = [m for m in messages if m.role == "tool"]
        if not results:
            return ModelReply(text="", tool_calls=[ToolCall(call_id="c0", name=name, arguments=args)],
                              input_tokens=10, output_tokens=5, mode="native")
        return ModelReply(text=results[-1].content or "(empty)", input_tokens=10, output_tokens=5)

    return script


def fanout_script(children: int | str = 3, mode: str = "all") -> Script:
    """Sub-agents (docs/subagents.md). A session whose goal is `add A B` is a child: it calls
    add(A, B) and answers with the sum. Any other goal is the parent: it calls spawn_agents
    with `children` tasks `add i i+1` (i = 1..children), then answers `total T` with the sum of
    the children's answers (a failed child counts 0)."""
    n = int(children)

    def script(messages: list[Message]) -> ModelReply:
        goal = next((m.content for m in messages if m.role == "user"), "")
        results = [m.content for m in messages if m.role == "tool"]
        if goal.startswith("add "):
            if not results:
                try:
                    a, b = (float(x) for x in goal.split()[1:3])
                except ValueError:  # a child that fails: its session fails, the parent reads why
                    raise ProviderError(f"cannot add {goal[:60]!r}", retryable=False, kind="bad_request") from None
                return ModelReply(tool_calls=[ToolCall(call_id="a0", name="add", arguments={"a": a, "b": b})],
                                  input_tokens=10, output_tokens=5, mode="native")
            return ModelReply(text=results[-1], input_tokens=12, output_tokens=3)
        if not results:
            tasks = [{"task": f"add {i} {i + 1}"} for i in range(1, n + 1)]
            return ModelReply(tool_calls=[ToolCall(call_id="d0", name="spawn_agents",
                                                   arguments={"tasks": tasks, "mode": mode})],
                              input_tokens=20, output_tokens=10, mode="native")
        try:
            rows = json.loads(results[-1])["results"]
            total = sum(float(r["answer"]) for r in rows if r["status"] == "done")
        except (ValueError, KeyError, TypeError):
            return ModelReply(text=f"could not read: {results[-1][:200]}", input_tokens=20, output_tokens=5)
        return ModelReply(text=f"total {total:g}", input_tokens=30, output_tokens=4)

    return script


SCRIPTS: dict[str, Callable[..., Script]] = {"adder": adder_script, "reviewer": reviewer_script,
                                             "down": down_script, "slow": slow_script, "reads": reads_script,
                                             "shell": shell_script, "goalfix": goalfix_script,
                                             "calls": calls_script, "fanout": fanout_script}
SCRIPT_TOOLS: dict[str, tuple[str, ...]] = {"adder": ("add",), "slow": ("add",), "reads": ("read_file",),
                                            "shell": ("shell",), "goalfix": ("shell", "write_file"),
                                            "fanout": ("add", "spawn_agents")}  # tools called


def missing_tools(spec: str, tools: Sequence[str]) -> list[str]:
    """The tools the script `spec` calls that `tools` lacks (a session without them cannot run it)."""
    name = spec.removeprefix("scripted:").partition(":")[0]
    return [t for t in SCRIPT_TOOLS.get(name, ()) if t not in tools]


def scripted_from_spec(spec: str) -> ScriptedProvider:
    """`adder` or `adder:5` (or `scripted:adder:5`, as sessions record it) → the adder script;
    `reviewer` / `reviewer:0` → a tool-call reviewer that allows / blocks every call;
    `down` → a model that always fails (retryable); `slow:SECONDS` → the adder, slowly;
    `reads:FILE` → reads FILE and answers with its text; `shell:COMMAND` → runs COMMAND with
    the shell tool and answers with its result; `calls:TOOL:JSON` → calls TOOL with the JSON
    arguments and answers with its result."""
    spec = spec.removeprefix("scripted:")
    name, _, arg = spec.partition(":")
    if name not in SCRIPTS:
        raise ValueError(f"unknown script {name!r}; known: {', '.join(SCRIPTS)}")
    try:
        script = SCRIPTS[name](*([arg] if arg else []))
    except ValueError:
        raise ValueError(f"bad argument {arg!r} for script {name!r}") from None
    return ScriptedProvider(script, model=f"scripted:{spec}")
