"""loopstream: an agent harness whose loop is a state machine over an Avro event log.

The public API, in one import line::

    from loopstream import Sampling, SQLiteLog, SessionConfig, SessionPolicy, build_runtime, open_provider

Sub-agents: `fan_out(runtime, goals, config)` maps goals over an agent (docs/subagents.md).

Everything else lives in the layer folders (`loopstream.core`, `.runtime`, `.processors`,
`.providers`, `.tools`, `.replay`, `.kafka`, `.cli`); see docs/architecture.md.
"""
from loopstream.core.policy import SessionPolicy, load_policy
from loopstream.core.sampling import Sampling
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.factory import open_provider
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.children import ChildRunner
from loopstream.runtime.fanout import Result, fan_out
from loopstream.runtime.inline import Runtime
from loopstream.runtime.writer import SessionConfig, SessionWriter
from loopstream.tools.builtin import default_registry
from loopstream.tools.registry import ToolRegistry, tool

__all__ = ["ChildRunner", "Result", "Runtime", "SQLiteLog", "Sampling", "SessionConfig", "SessionPolicy", "SessionWriter", "ToolRegistry", "build_runtime",
           "default_registry", "fan_out", "load_policy", "open_provider", "tool"]
