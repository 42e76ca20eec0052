"""Lenient extraction of tool calls from small-model text, and the JSON action schema."""
from __future__ import annotations

import json

import pytest

from loopstream.providers.actions import (
    action_instructions,
    action_schema,
    loads_lenient,
    parse_action_text,
)
from loopstream.providers.base import ToolSpec

ADD = ToolSpec(
    name="add",
    description="Add two integers.",
    parameters={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
)
READ = ToolSpec(name="read_file", description="Read a file.", parameters={"type": "object", "properties": {"path": {"type": "string"}}})
TOOLS = [ADD, READ]


def calls_of(text: str) -> list[tuple[str, str, dict]]:
    calls, _ = parse_action_text(text, TOOLS)
    return [(c.call_id, c.name, c.arguments) for c in calls]


ADD_1_2 = [("call_0", "add", {"a": 1, "b": 2})]


@pytest.mark.parametrize(
    "text",
    [
        '{"action": "call_tool", "tool": "add", "arguments": {"a": 1, "b": 2}}',
        '{"name": "add", "arguments": {"a": 1, "b": 2}}',
        '{"name": "add", "parameters": {"a": 1, "b": 2}}',
        '{"tool": "add", "args": {"a": 1, "b": 2}}',
        '```json\n{\n  "name": "add",\n  "arguments": {\n    "a": 1,\n    "b": 2\n  }\n}\n```',
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
        'Sure! I will use the add tool.\n{"action": "call_tool", "tool": "add", "arguments": {"a": 1, "b": 2}}\nLet me know.',
        '{"type": "function", "function": {"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}}',
        '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}',
        '{"action": "add", "action_input": {"a": 1, "b": 2}}',  # ReAct style
        '{"action": "add", "arguments": {"a": 1, "b": 2}}',
        '{"name": "add", "a": 1, "b": 2}',  # arguments inlined
        "{'name': 'add', 'arguments': {'a': 1, 'b': 2}}",  # Python quoting
        '{"name": "add", "arguments": {"a": 1, "b": 2,},}',  # trailing commas
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}',
        '  {"ACTION": "x"}  {"action": "call_tool", "tool": "add", "arguments": {"a": 1, "b": 2}}',
    ],
)
def test_single_call_shapes(text: str) -> None:
    assert calls_of(text) == ADD_1_2


def test_call_leaves_surrounding_prose_without_fences_or_tags() -> None:
    text = 'I will add them.\n```json\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n```\n<tool_call></tool_call>'
    calls, rest = parse_action_text(text, TOOLS)
    assert [c.name for c in calls] == ["add"]
    assert rest == "I will add them."


def test_several_calls_get_ordered_deterministic_ids() -> None:
    text = (
        '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 10, "b": 20}}\n</tool_call>'
    )
    assert calls_of(text) == [("call_0", "add", {"a": 3, "b": 4}), ("call_1", "add", {"a": 10, "b": 20})]
    assert calls_of(text) == calls_of(text)


def test_list_of_calls_and_given_ids() -> None:
    text = json.dumps([
        {"id": "abc", "name": "add", "arguments": {"a": 1, "b": 2}},
        {"name": "read_file", "arguments": {"path": "README.md"}},
    ])
    assert calls_of(text) == [("abc", "add", {"a": 1, "b": 2}), ("call_1", "read_file", {"path": "README.md"})]


def test_unknown_tool_is_still_a_call() -> None:
    assert calls_of('{"action": "call_tool", "tool": "multiply", "arguments": {"a": 2}}') == [
        ("call_0", "multiply", {"a": 2})
    ]
    assert calls_of('{"name": "search", "arguments": {"q": "x"}}') == [("call_0", "search", {"q": "x"})]


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ('{"action": "final_answer", "answer": "The sum is 42212."}', "The sum is 42212."),
        ('```json\n{"action":"final_answer","answer":"42212"}\n```', "42212"),
        ('{"action": "final_answer", "answer": 42212}', "42212"),
        ('Here you go: {"action": "Final Answer", "answer": "Paris"}', "Paris"),
        ('{"action": "final_answer", "content": "ok"}', "ok"),
        # cut off by the token limit while looping: keep what was said
        ('{\n  "action": "final_answer",\n  "answer": "README.md is a file that \\"explains', 'README.md is a file that "explains'),
        ('{"action": "final_answer", "answer": "done"', "done"),
    ],
)
def test_final_answers(text: str, answer: str) -> None:
    assert parse_action_text(text, TOOLS) == ([], answer)


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        'The user record is {"name": "Alice", "age": 31}.',  # data, not a call
        "Use a list like [1, 2, 3] or a dict {a: 1}.",
        '{"name": "add"',  # truncated call: nothing to run
        "",
        "def f(x): return {x: [x]}",
        '[{"name": "Alice"}, {"name": "Bob"}]',
    ],
)
def test_plain_text_is_the_answer(text: str) -> None:
    assert parse_action_text(text, TOOLS) == ([], text.strip())


def test_argument_edge_cases() -> None:
    assert calls_of('{"name": "add", "arguments": null}') == [("call_0", "add", {})]
    assert calls_of('{"name": "add", "arguments": ""}') == [("call_0", "add", {})]
    assert calls_of('{"name": "read_file", "arguments": "README.md"}') == [("call_0", "read_file", {"input": "README.md"})]
    assert calls_of('{"name": "add", "arguments": {"a": true, "b": null}}') == [("call_0", "add", {"a": True, "b": None})]


def test_strings_with_braces_and_quotes_inside() -> None:
    text = '{"name": "read_file", "arguments": {"path": "a}b{c\\"d.txt"}} trailing'
    calls, rest = parse_action_text(text, TOOLS)
    assert calls[0].arguments == {"path": 'a}b{c"d.txt'}
    assert rest == "trailing"


def test_loads_lenient() -> None:
    assert loads_lenient("{'a': 'it\\'s', 'b': true, 'c': null}") == {"a": "it's", "b": True, "c": None}
    assert loads_lenient('{"a": "true story"}') == {"a": "true story"}
    with pytest.raises(ValueError):
        loads_lenient("{not json at all}")


def test_action_schema_has_one_branch_per_tool_and_final() -> None:
    schema = action_schema(TOOLS)
    branches = schema["anyOf"]
    assert len(branches) == 3
    add_branch = branches[0]
    assert add_branch["properties"]["action"]["enum"] == ["call_tool"]
    assert add_branch["properties"]["tool"]["enum"] == ["add"]
    assert add_branch["properties"]["arguments"] == ADD.parameters
    assert add_branch["required"] == ["action", "tool", "arguments"]
    final = branches[-1]
    assert final["properties"]["action"]["enum"] == ["final_answer"]
    assert final["properties"]["answer"] == {"type": "string"}
    json.dumps(schema)  # serializable


def test_action_schema_without_tools_is_final_only() -> None:
    schema = action_schema([])
    assert schema["properties"]["action"]["enum"] == ["final_answer"]


def test_action_schema_tolerates_odd_parameters() -> None:
    odd = ToolSpec(name="odd", parameters={})
    assert action_schema([odd])["anyOf"][0]["properties"]["arguments"] == {"type": "object"}


def test_schema_outputs_round_trip_through_parser() -> None:
    call = '{"action": "call_tool", "tool": "read_file", "arguments": {"path": "x.py"}}'
    assert calls_of(call) == [("call_0", "read_file", {"path": "x.py"})]


def test_instructions_describe_tools_and_format() -> None:
    text = action_instructions(TOOLS)
    assert '"action": "call_tool"' in text and '"action": "final_answer"' in text
    assert "- add: Add two integers." in text
    assert '"a":{"type":"integer"}' in text
    assert "read_file" in text
    assert "call_tool" not in action_instructions([])
