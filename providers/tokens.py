"""Token counting for context budgets: pure estimates of what a request really carries.

`estimate_request(messages, tools, family, mode)` estimates the prompt tokens of the request
an adapter builds: every message as that action mode writes it (native tool calls, or JSON
actions and "Result of tool …" turns), the chat template's markers, and what the adapter adds
besides the messages — the tool specs (names, descriptions, JSON schemas) and the template's
tool preamble in native mode, the JSON-action instructions in the json modes. Text is counted
by the shape of its pieces (words, digits, punctuation, non-ASCII bytes), not by a flat
characters-per-token ratio, so numbers, JSON and non-Latin text come out close as well
(docs/architecture.md, "Context budget and compaction", has the figures against llama.cpp).
The estimate decides *when* to compact and is corrected by the prompt tokens the provider
reports (processors/context.py); `count_tokens` asks a provider that can count exactly.

`estimate_tokens_v1` is the estimate sessions recorded before the request estimate existed
(policy `compaction.estimator = 1`) were decided with; it never changes.
"""
from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from loopstream.providers.actions import action_instructions, render_action, render_final
from loopstream.providers.base import Message, ToolSpec

# -- estimator 1 (frozen: sessions recorded with it replay the same decisions) ---------------
CHARS_PER_TOKEN = {"anthropic": 3.5, "openai": 4.0, "local": 3.6, "scripted": 4.0}
PER_MESSAGE_OVERHEAD = 4  # role markers and separators of chat templates


def estimate_tokens_v1(messages: Sequence[Message], family: str = "openai") -> int:
    """Estimator 1: characters of the messages (content and tool calls) over the family's
    ratio. Counts no tool specs and no action instructions."""
    ratio = CHARS_PER_TOKEN.get(family, 4.0)
    total = 0
    for m in messages:
        chars = len(m.content) + sum(len(c.name) + len(json.dumps(c.arguments)) for c in m.tool_calls)
        total += math.ceil(chars / ratio) + PER_MESSAGE_OVERHEAD
    return total


# -- estimator 2: the request ------------------------------------------------------------------
MESSAGE_OVERHEAD = 5  # <|im_start|>role\n … <|im_end|>\n and its equivalents
CALL_OVERHEAD = 12  # a native tool call's wrapper (<tool_call>{"name": …, "arguments": …}</tool_call>, ids)
RESULT_OVERHEAD = 5  # a native tool result's wrapper (<tool_response>, the call id)
# Tokens a family's template or API adds once when native tools are present: llama.cpp's
# chat templates (Qwen: "# Tools … <tools></tools> … <tool_call>"), Anthropic's tool-use
# system prompt (346 tokens, their documentation), OpenAI's tool namespace header.
NATIVE_TOOLS_PREAMBLE = {"local": 100, "anthropic": 346, "openai": 20, "scripted": 20}
# Tokenizers that write every digit as its own token (Qwen, llama.cpp's local model); the
# others take up to three digits per token.
DIGIT_PER_TOKEN_FAMILIES = frozenset({"local"})
# Families whose reported input tokens are not a real count (the scripted test model).
UNCOUNTED_FAMILIES = frozenset({"scripted"})

_PIECES = re.compile(
    r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])"  # words, split at case changes (identifiers, base64)
    r"|\d+"  # numbers
    r"| (?=\d)"  # a space before a number is its own token in digit-per-token vocabularies
    r"|\n+|[ \t]{2,}| "  # line breaks, indentation, the single space a word takes with it
    r"|[^\x00-\x7f]+"  # non-ASCII runs: counted by their UTF-8 bytes
    r"|[^\sA-Za-z\d\x80-\U0010ffff]+"  # ASCII punctuation runs
)
WORD_CHARS = 6  # a word piece of up to 6 letters is about one token
PUNCT_PER_CHAR = 0.4  # '{"', '":', '"}}' merge: about two and a half characters a token
INDENT = 1.0
NON_ASCII_PER_BYTE = 0.2  # accented, Cyrillic, CJK (2-3 bytes): 0.4-0.6 a character
ASTRAL = 2.5  # a 4-byte character (emoji): split into byte tokens


def text_tokens(text: str, family: str = "openai") -> int:
    """Estimated tokens of `text` for a family's tokenizer (any str: hostile text and lone
    surrogates included). Cached: the same context is measured again at every step."""
    return _text_tokens(text, family in DIGIT_PER_TOKEN_FAMILIES)


@functools.lru_cache(maxsize=8192)
def _text_tokens(text: str, digit_per_token: bool) -> int:
    total = 0.0
    for piece in _PIECES.findall(text):
        c = piece[0]
        if c.isascii() and c.isalpha():
            total += math.ceil(len(piece) / WORD_CHARS)
        elif c.isascii() and c.isdigit():
            total += len(piece) if digit_per_token else math.ceil(len(piece) / 3)
        elif piece == " ":
            continue  # merged into the word after it
        elif c == " " and len(piece) == 1:
            total += 1 if digit_per_token else 0
        elif c == "\n":
            continue  # merged with neighbouring punctuation or markers
        elif c in " \t":
            total += INDENT
        elif not c.isascii():
            total += _non_ascii(piece)
        else:
            total += PUNCT_PER_CHAR * len(piece)
    return math.ceil(total)


def _non_ascii(run: str) -> float:
    out = 0.0
    for ch in run:
        point = ord(ch)
        if point >= 0x10000:
            out += ASTRAL
        else:  # 2 or 3 UTF-8 bytes (a lone surrogate counts as 3)
            out += NON_ASCII_PER_BYTE * (2 if point < 0x800 else 3)
    return out


@dataclass(frozen=True)
class RequestEstimate:
    """Estimated prompt tokens of one request, and the part of them no compaction removes
    because the adapter adds it to every request (tool specs, action instructions)."""

    total: int
    tools: int


def estimate_request(messages: Sequence[Message], tools: Sequence[ToolSpec] = (), family: str = "openai",
                     mode: str = "native") -> RequestEstimate:
    """The prompt tokens of the request a `family` adapter sends in action `mode`."""
    tool_part = tools_tokens(tools, family, mode)
    return RequestEstimate(messages_tokens(messages, family, mode) + tool_part, tool_part)


def estimate_tokens(messages: Sequence[Message], family: str = "openai", mode: str = "native",
                    tools: Sequence[ToolSpec] = ()) -> int:
    """`estimate_request(...).total`: the whole request's estimated prompt tokens."""
    return estimate_request(messages, tools, family, mode).total


def messages_tokens(messages: Sequence[Message], family: str = "openai", mode: str = "native") -> int:
    """The messages' share of a request: each as the adapter writes it in `mode`."""
    json_mode = mode in ("json_schema", "json_text") and family != "anthropic"
    return sum(message_tokens(m, family, json_mode) for m in messages)


def message_tokens(m: Message, family: str = "openai", json_mode: bool = False) -> int:
    """One message: its text as sent, the template's markers, its tool calls."""
    if json_mode and m.role == "assistant":
        text = "\n".join(render_action(c) for c in m.tool_calls) if m.tool_calls else render_final(m.content)
        return MESSAGE_OVERHEAD + text_tokens(text, family)
    if json_mode and m.role == "tool":
        head = f"Result of tool {m.name or 'unknown'} ({m.tool_call_id or '?'}): "
        return MESSAGE_OVERHEAD + text_tokens(head, family) + text_tokens(m.content, family)
    total = MESSAGE_OVERHEAD + text_tokens(m.content, family) + (RESULT_OVERHEAD if m.role == "tool" else 0)
    for call in m.tool_calls:
        args = json.dumps(call.arguments)
        total += CALL_OVERHEAD + text_tokens(f"{call.call_id} {call.name} {args}", family)
    return total


def tools_tokens(tools: Sequence[ToolSpec], family: str = "openai", mode: str = "native") -> int:
    """What the adapter adds to every request besides the messages: in native mode the tool
    specs as the API takes them plus the template's tool preamble; in the json modes the
    action instructions (they describe the tools) in the system message."""
    if mode in ("json_schema", "json_text") and family != "anthropic":
        return text_tokens(action_instructions(list(tools)), family)
    if not tools:
        return 0
    if family == "anthropic":
        specs = [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in tools]
    else:
        specs = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.parameters}} for t in tools]
    return NATIVE_TOOLS_PREAMBLE.get(family, 20) + text_tokens("\n".join(map(json.dumps, specs)), family)


def count_tokens(provider: object, messages: Sequence[Message], tools: Sequence[ToolSpec] = ()) -> int:
    """Exact when the provider can count (it is asked: I/O), else the request estimate for
    its family and action mode."""
    exact = getattr(provider, "count_tokens", None)
    if callable(exact):
        try:
            return int(exact(list(messages), list(tools)) if tools else exact(list(messages)))
        except Exception:  # counting is advisory: fall back rather than fail the step
            pass
    family = getattr(provider, "name", "openai")
    return estimate_tokens(messages, family, getattr(provider, "action_mode", "native"), tools)
