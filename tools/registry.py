"""Python functions as tools: `@tool` reads the signature and docstring, pydantic
validates arguments, and bad arguments come back as a `ToolError` for the model to
read (the tool processor turns it into a ToolFailed event), never a crash.
"""
from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from pydantic import BaseModel, ValidationError, create_model

from loopstream.core.events import Payload
from loopstream.core.memory import MemoryStore
from loopstream.core.policy import SessionPolicy
from loopstream.providers.base import ToolSpec


class ToolError(Exception):
    """A failure the model should read: unknown tool, bad arguments, or the tool's own error."""

    def __init__(self, message: str, kind: str = "tool_error") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ToolContext:
    """What a tool may know about where it runs. File tools stay inside `workdir`."""

    workdir: Path
    session_id: str = ""
    policy: SessionPolicy = field(default_factory=SessionPolicy)  # the session's: sandbox and scope
    memory: MemoryStore | None = None  # the log's memory store (tools/memory.py), where the log has one


@dataclass(frozen=True)
class ToolOutcome:
    """A tool's result with events to record before it, in the same batch as its ToolCompleted
    (the memory `remember` keeps): they are in the log exactly when the result is."""

    text: str
    events: tuple[Payload, ...] = ()


@dataclass
class Tool:
    name: str
    description: str
    fn: Callable[..., Any]
    args_model: type[BaseModel]
    wants_context: bool = False
    read_only: bool = True  # no side effects outside the process
    idempotent: bool = True
    timeout_s: float | None = None  # None: the session's tool_timeout_s

    def spec(self) -> ToolSpec:
        schema = self.args_model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return ToolSpec(name=self.name, description=self.description, parameters=schema)

    def validate(self, arguments: dict[str, Any]) -> BaseModel:
        """The arguments as the tool's model, or a ToolError (kind invalid_arguments) saying what is wrong."""
        try:
            return self.args_model.model_validate(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()
            )
            raise ToolError(f"invalid arguments for {self.name}: {problems}", "invalid_arguments") from None

    def invoke(self, arguments: dict[str, Any], ctx: ToolContext) -> str | ToolOutcome:
        args = self.validate(arguments)
        kwargs = {k: getattr(args, k) for k in self.args_model.model_fields}
        if self.wants_context:
            kwargs["ctx"] = ctx
        result = self.fn(**kwargs)
        return result if isinstance(result, str | ToolOutcome) else json.dumps(result, default=str)


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    read_only: bool = True,
    idempotent: bool = True,
    timeout_s: float | None = None,
) -> Any:
    """Declare a Python function as a tool. A parameter named `ctx` receives a ToolContext.

    `read_only=False` marks side effects (the workspace is checkpointed before each call);
    `idempotent=False` means it is not run again after a crash; `timeout_s` bounds a call."""

    def wrap(f: Callable[..., Any]) -> Tool:
        hints = get_type_hints(f)
        fields: dict[str, Any] = {}
        wants_context = False
        for pname, param in inspect.signature(f).parameters.items():
            if pname == "ctx":
                wants_context = True
                continue
            annotation = hints.get(pname, Any)
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[pname] = (annotation, default)
        tool_name = name or f.__name__
        model = create_model(f"{tool_name}_args", **fields)  # type: ignore[call-overload]
        doc = inspect.getdoc(f) or ""
        return Tool(tool_name, doc, f, model, wants_context, read_only, idempotent, timeout_s)

    return wrap(fn) if fn is not None else wrap


@dataclass
class ToolRegistry:
    tools: dict[str, Tool] = field(default_factory=dict)

    def add(self, *tools: Tool) -> ToolRegistry:
        for t in tools:
            self.tools[t.name] = t
        return self

    def select(self, names: Iterable[str]) -> ToolRegistry:
        missing = [n for n in names if n not in self.tools]
        if missing:
            raise KeyError(f"unknown tool(s): {', '.join(missing)}; known: {', '.join(sorted(self.tools))}")
        return ToolRegistry({n: self.tools[n] for n in names})

    def specs(self) -> list[ToolSpec]:
        return [t.spec() for t in self.tools.values()]

    def names(self) -> list[str]:
        return list(self.tools)

    def call(self, name: str, arguments: dict[str, Any], ctx: ToolContext) -> str | ToolOutcome:
        t = self.tools.get(name)
        if t is None:
            raise ToolError(
                f"unknown tool {name!r}; available tools: {', '.join(sorted(self.tools)) or 'none'}",
                "unknown_tool",
            )
        return t.invoke(arguments, ctx)
