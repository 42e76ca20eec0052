"""JSON "action" protocol for models without (reliable) native tool calling.

Small local models are asked to answer with one JSON object:
    {"action": "call_tool", "tool": "add", "arguments": {"a": 1, "b": 2}}
    {"action": "final_answer", "answer": "..."}
What they actually write varies: code fences, prose around the JSON, Qwen's <tool_call> tags,
OpenAI-style {"name", "arguments"} objects, lists of calls, single quotes, trailing commas.
`parse_action_text` accepts all of these.
"""
from __future__ import annotations

import ast
import json
import re
from typing import Any

from .base import ToolCall, ToolSpec

CALL_ACTIONS = {"call_tool", "tool_call", "call", "use_tool", "tool", "function_call"}
FINAL_ACTIONS = {"final_answer", "final", "answer", "respond", "finish", "final answer"}
_ARG_KEYS = ("arguments", "args", "parameters", "params", "input", "tool_input", "action_input")
_ANSWER_KEYS = ("answer", "final_answer", "content", "text", "response", "action_input", "output")
_NAME_KEYS = ("tool", "name", "tool_name", "function")
# Markers some chat templates make models emit around calls; meaningless once calls are extracted.
_MARKERS = re.compile(
    r"</?tool_call>|</?tool_calls>|</?function_call>|<\|python_tag\|>|\[TOOL_CALLS\]|<\|im_end\|>|<\|eot_id\|>"
)
_EMPTY_FENCE = re.compile(r"```[a-zA-Z]*\s*```")


# ---------------------------------------------------------------- schema and instructions


def _tool_arguments_schema(tool: ToolSpec) -> dict[str, Any]:
    params = tool.parameters if isinstance(tool.parameters, dict) else {}
    return params if params.get("type") == "object" else {"type": "object"}


def action_schema(tools: list[ToolSpec]) -> dict[str, Any]:
    """JSON schema for one action object.

    One `anyOf` branch per tool (action, tool, that tool's argument schema) plus a final-answer
    branch. Per-tool branches let grammar-constrained decoding (llama.cpp) force well-typed
    arguments, which is what makes a 0.5B model reliable; the flat shape is still
    {action: call_tool|final_answer, tool: <name>, arguments: {...}, answer: str}.
    """
    final = {
        "type": "object",
        "properties": {"action": {"type": "string", "enum": ["final_answer"]}, "answer": {"type": "string"}},
        "required": ["action", "answer"],
        "additionalProperties": False,
    }
    branches = [
        {
            "type": "object",
            "properties": {
                "action": {"type": "string", "enum": ["call_tool"]},
                "tool": {"type": "string", "enum": [tool.name]},
                "arguments": _tool_arguments_schema(tool),
            },
            "required": ["action", "tool", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return {"anyOf": [*branches, final]} if branches else final


def action_instructions(tools: list[ToolSpec]) -> str:
    """System-prompt text describing the tools and the JSON action format."""
    lines = ["Respond with exactly one JSON object and nothing else."]
    if tools:
        lines += [
            "To call a tool:",
            '{"action": "call_tool", "tool": "<tool name>", "arguments": {<arguments>}}',
            "To give your final answer to the user:",
            '{"action": "final_answer", "answer": "<your answer>"}',
            "",
            "Available tools:",
        ]
        for tool in tools:
            desc = f": {tool.description.strip()}" if tool.description.strip() else ""
            lines.append(f"- {tool.name}{desc}")
            lines.append(f"  arguments schema: {json.dumps(_tool_arguments_schema(tool), separators=(',', ':'))}")
        lines += [
            "",
            (
                "Call one tool at a time and wait: the user replies with the tool's result. "
                "Then call another tool or give the final answer. Never make up tool results."
            ),
        ]
    else:
        lines.append('Format: {"action": "final_answer", "answer": "<your answer>"}')
    return "\n".join(lines)


def render_action(call: ToolCall) -> str:
    """A past tool call written back in the action format (for json modes' history)."""
    return json.dumps({"action": "call_tool", "tool": call.name, "arguments": call.arguments})


def render_final(text: str) -> str:
    return json.dumps({"action": "final_answer", "answer": text})


# ---------------------------------------------------------------- lenient JSON


def _python_literals(src: str) -> str:
    """Rewrite JSON literals true/false/null to Python outside of strings, for ast.literal_eval."""
    out: list[str] = []
    i, quote = 0, ""
    words = {"true": "True", "false": "False", "null": "None"}
    while i < len(src):
        ch = src[i]
        if quote:
            out.append(ch)
            if ch == "\\" and i + 1 < len(src):
                out.append(src[i + 1])
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
            out.append(ch)
        else:
            m = re.match(r"true|false|null", src[i:])
            if m and not (i and (src[i - 1].isalnum() or src[i - 1] == "_")):
                out.append(words[m.group()])
                i += len(m.group())
                continue
            out.append(ch)
        i += 1
    return "".join(out)


def loads_lenient(src: str) -> Any:
    """json.loads, then tolerate trailing commas, then Python-literal syntax (single quotes)."""
    try:
        return json.loads(src)
    except ValueError:
        pass
    fixed = re.sub(r",\s*([}\]])", r"\1", src)
    try:
        return json.loads(fixed)
    except ValueError:
        pass
    try:
        return ast.literal_eval(_python_literals(fixed))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("not JSON") from None


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the bracket matching text[start], respecting quoted strings."""
    stack: list[str] = []
    quote = ""
    i = start
    pairs = {"{": "}", "[": "]"}
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            # An apostrophe inside prose-like JSON is rare; only treat ' as a quote after a delimiter.
            if ch == '"' or text[i - 1] in "{[,: \n\t":
                quote = ch
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return None
            if not stack:
                return i + 1
        i += 1
    return None


def _json_segments(text: str) -> list[tuple[int, int, Any]]:
    """Top-level JSON values embedded in text, as (start, end, value)."""
    found: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(text):
        if text[i] in "{[":
            end = _balanced_end(text, i)
            if end is not None:
                try:
                    found.append((i, end, loads_lenient(text[i:end])))
                    i = end
                    continue
                except ValueError:
                    pass
        i += 1
    return found


# ---------------------------------------------------------------- interpreting objects


def _arguments(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):  # OpenAI style: arguments as a JSON string
        try:
            value = loads_lenient(value) if value.strip() else {}
        except ValueError:
            return {"input": value}
    return value if isinstance(value, dict) else {"input": value}


def _first(obj: dict[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in keys:
        if key in obj:
            return key, obj[key]
    return None, None


def _interpret(obj: Any, tool_names: set[str]) -> tuple[list[tuple[str | None, str, dict]], str | None] | None:
    """(calls as (id, name, args), final answer) if obj is an action, else None."""
    if isinstance(obj, list):
        calls: list[tuple[str | None, str, dict]] = []
        answer = None
        for item in obj:
            got = _interpret(item, tool_names)
            if got is None:
                return None  # a list of plain data is not a list of actions
            calls += got[0]
            answer = got[1] if got[1] is not None else answer
        return (calls, answer) if obj else None
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("tool_calls"), list):
        return _interpret(obj["tool_calls"], tool_names)
    call_id = obj.get("id") if isinstance(obj.get("id"), str) else None
    if isinstance(obj.get("function"), dict):  # {"type": "function", "function": {"name", "arguments"}}
        fn = obj["function"]
        if isinstance(fn.get("name"), str):
            return [(call_id, fn["name"], _arguments(fn.get("arguments", fn.get("parameters"))))], None
    action = obj.get("action")
    if isinstance(action, str):
        norm = action.strip().lower()
        if norm in FINAL_ACTIONS or (norm not in CALL_ACTIONS and norm not in tool_names and "answer" in obj):
            _, answer = _first(obj, _ANSWER_KEYS)
            if answer is None:
                return None
            return [], answer if isinstance(answer, str) else json.dumps(answer)
        if norm in CALL_ACTIONS:
            _, name = _first(obj, _NAME_KEYS)
            if not isinstance(name, str) or not name:
                return None
            _, args = _first(obj, _ARG_KEYS)
            return [(call_id, name, _arguments(args))], None
        if action in tool_names:  # ReAct style: {"action": "add", "action_input": {...}}
            _, args = _first(obj, _ARG_KEYS)
            return [(call_id, action, _arguments(args))], None
        return None
    name_key, name = _first(obj, _NAME_KEYS)
    if not isinstance(name, str) or not name:
        return None
    arg_key, args = _first(obj, _ARG_KEYS)
    if arg_key is not None:
        return [(call_id, name, _arguments(args))], None
    if name in tool_names:  # {"name": "add", "a": 1, "b": 2}: arguments inlined
        rest = {k: v for k, v in obj.items() if k not in (name_key, "id", "type")}
        return [(call_id, name, rest)], None
    return None


_TRUNCATED_FINAL = re.compile(
    r'^\s*(?:```[a-zA-Z]*\s*)?\{\s*"action"\s*:\s*"final_answer"\s*,\s*"answer"\s*:\s*"((?:[^"\\]|\\.)*)(?:\\|"\s*)?$', re.DOTALL
)


def _truncated_answer(text: str) -> str | None:
    """The answer of a final_answer object cut off by the token limit (small models loop)."""
    m = _TRUNCATED_FINAL.match(text)
    if not m:
        return None
    try:
        return json.loads(f'"{m.group(1)}"').strip()
    except ValueError:  # e.g. cut inside a \u escape
        return m.group(1).strip()


def parse_action_text(text: str, tools: list[ToolSpec]) -> tuple[list[ToolCall], str]:
    """Extract tool calls from model text. Returns (calls, remaining final text).

    With no calls, the remaining text is the final answer (the `answer` of a final_answer
    action if there is one, else the text itself). Calls without ids get call_0, call_1, ...
    in order; the caller makes them globally unique. Unknown tool names are kept.
    """
    tool_names = {t.name for t in tools}
    calls: list[ToolCall] = []
    answers: list[str] = []
    kept: list[str] = []
    pos = 0
    for start, end, value in _json_segments(text):
        got = _interpret(value, tool_names)
        if got is None:
            continue
        kept.append(text[pos:start])
        pos = end
        for call_id, name, args in got[0]:
            calls.append(ToolCall(call_id=call_id or f"call_{len(calls)}", name=name, arguments=args))
        if got[1] is not None:
            answers.append(got[1])
    if pos == 0:
        partial = _truncated_answer(text)
        return [], (partial if partial is not None else text.strip())
    kept.append(text[pos:])
    prose = _EMPTY_FENCE.sub("", _MARKERS.sub("", "".join(kept))).strip()
    if answers and not calls:
        return [], "\n\n".join(answers).strip()
    return calls, prose
