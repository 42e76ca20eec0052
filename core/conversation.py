"""The conversation the fold builds from events: messages, tool calls, tool specs.

Providers translate these to and from their wire formats (loopstream.providers.base
re-exports them); the fold (core/state.py) builds them from events.
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator, MutableSequence
from typing import Any, Literal

from pydantic import BaseModel, Field

from loopstream.core.construct import factory


class ToolSpec(BaseModel):
    """A tool as the model sees it: name, description, JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolCall(BaseModel):
    call_id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    """One turn of the normalized conversation."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    tool_call_id: str | None = None  # role == "tool": which call this answers
    name: str | None = None  # role == "tool": the tool's name
    seq: int | None = None  # the log event this message came from (compaction names seq ranges)


_GROW = threading.Lock()  # one check-and-append on a shared buffer at a time


class MessageList(MutableSequence[Message]):
    """The session's messages: a list whose copy costs O(1) however long the session is.

    Copies share one append-only buffer and each keeps its own length: appending to the copy
    that ends at the buffer's end extends the buffer in place; appending to any other copy
    (one that is behind, because another copy grew since) first takes its own prefix of the
    buffer. Replacing or deleting an item takes a private copy first. So every copy sees only
    its own messages, and the fold's clone before each write no longer copies them all.
    """

    __slots__ = ("_buf", "_n")

    def __init__(self, items: Iterable[Message] = ()) -> None:
        self._buf: list[Message] = list(items)
        self._n = len(self._buf)

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> MessageList:
        """A list of the messages `rows(...)` gave, each built when first read (a state read
        from a snapshot costs what its rows cost, not what building every message costs)."""
        new = cls.__new__(cls)
        new._buf, new._n = _Rows(rows), len(rows)
        return new

    def rows(self, start: int = 0) -> list[tuple]:
        """The messages from index `start` on as plain tuples (what `from_rows` takes); those not
        built yet are not built for it."""
        return [m if type(m) is tuple else (m.role, m.content, [(c.call_id, c.name, c.arguments) for c in m.tool_calls],
                                            m.tool_call_id, m.name, m.seq)
                for m in itertools.islice(self._buf, start, self._n)]

    def _ready(self) -> None:
        buf = self._buf
        if type(buf) is _Rows and buf.pending:
            with _GROW:
                if buf.pending:
                    buf[:] = [_from_row(r) if type(r) is tuple else r for r in buf]
                    buf.pending = False

    def copy(self) -> MessageList:
        """A copy sharing this one's buffer (O(1))."""
        new = MessageList.__new__(MessageList)
        new._buf, new._n = self._buf, self._n
        return new

    def append(self, message: Message) -> None:
        with _GROW:
            if len(self._buf) != self._n:  # another copy grew the buffer past us: take our prefix
                buf = self._buf
                self._buf = buf[: self._n] if type(buf) is not _Rows or not buf.pending else _Rows(buf[: self._n])
            self._buf.append(message)
            self._n += 1

    def _own(self) -> list[Message]:
        self._ready()
        self._buf = self._buf[: self._n]
        return self._buf

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):  # type: ignore[override]
        self._ready()
        if isinstance(index, slice):
            return self._buf[: self._n][index]
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError("message index out of range")
        return self._buf[index]

    def __iter__(self) -> Iterator[Message]:
        self._ready()
        return itertools.islice(self._buf, self._n)

    def __setitem__(self, index, value) -> None:  # type: ignore[override]
        self._own()[index] = value
        self._n = len(self._buf)

    def __delitem__(self, index) -> None:  # type: ignore[override]
        del self._own()[index]
        self._n = len(self._buf)

    def insert(self, index: int, value: Message) -> None:
        self._own().insert(index, value)
        self._n = len(self._buf)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (MessageList, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __add__(self, other: Iterable[Message]) -> list[Message]:
        return [*self, *other]

    def __radd__(self, other: Iterable[Message]) -> list[Message]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"MessageList({list(self)!r})"


class _Rows(list):
    """A buffer of message rows not built yet (MessageList.from_rows)."""

    pending = True


_new_message = factory(Message)
_new_call = factory(ToolCall)


def _from_row(row: tuple) -> Message:
    role, content, calls, call_id, name, seq = row
    return _new_message({"role": role, "content": content, "tool_calls": [
        _new_call({"call_id": i, "name": n, "arguments": a}) for i, n, a in calls],
        "tool_call_id": call_id, "name": name, "seq": seq})
