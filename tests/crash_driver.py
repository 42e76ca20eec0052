"""Runs one scripted session in its own process and SIGKILLs itself at a chosen point.

python -m tests.crash_driver DB SESSION_ID start|resume [--kill-after-events N] [--kill-in-model-call K]
                              [--kafka HOST:PORT --topic T] [--tool-steps N]

DB is the SQLite log, or with --kafka the KafkaLog's local projection file.

--kill-after-events N: die right after the N-th event this process appended (an event boundary).
--kill-in-model-call K: die inside the K-th model call, before its reply is appended.
"""
from __future__ import annotations

import argparse
import os
import signal

from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.runtime.assembly import build_runtime
from loopstream.runtime.inline import SessionConfig
from loopstream.tools import default_registry

TOOL_STEPS = 3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("session_id")
    ap.add_argument("mode", choices=["start", "resume"])
    ap.add_argument("--kill-after-events", type=int, default=0)
    ap.add_argument("--kill-in-model-call", type=int, default=0)
    ap.add_argument("--kafka", default="", help="bootstrap servers: run over a KafkaLog instead")
    ap.add_argument("--topic", default="loopstream.crash")
    ap.add_argument("--tool-steps", type=int, default=TOOL_STEPS)
    ap.add_argument("--side-effects", metavar="WORKDIR", default="",
                    help="script: shell (not idempotent), then write_file (idempotent), then answer")
    args = ap.parse_args()

    appended = 0

    def on_event(_event) -> None:
        nonlocal appended
        appended += 1
        if appended == args.kill_after_events:
            os.kill(os.getpid(), signal.SIGKILL)

    inner = adder_script(args.tool_steps)
    calls = 0

    def script(messages):
        nonlocal calls
        calls += 1
        if calls == args.kill_in_model_call:
            os.kill(os.getpid(), signal.SIGKILL)
        return inner(messages)

    if args.kafka:
        from loopstream.kafka.log import KafkaLog

        log = KafkaLog(args.kafka, topic=args.topic, projection_path=args.db, partitions=1)
    else:
        log = SQLiteLog(args.db)
    provider, registry, tools, workdir = ScriptedProvider(script), None, ["add"], "."
    if args.side_effects:
        registry, tools, workdir = default_registry(allow_writes=True), ["shell", "write_file"], args.side_effects
        provider = ScriptedProvider([
            ModelReply(tool_calls=[ToolCall(call_id="1", name="shell", arguments={"command": "echo ran >> ran.txt"})]),
            ModelReply(tool_calls=[ToolCall(call_id="2", name="write_file", arguments={"path": "out.txt", "content": "hi"})]),
            ModelReply(text="done with side effects"),
        ])
    runtime = build_runtime(log, provider, registry, on_event=on_event)
    if args.mode == "start":
        runtime.start_session("count", SessionConfig(provider="scripted", model="s", tools=tools, workdir=workdir),
                              session_id=args.session_id)
    state = runtime.run_session(args.session_id)
    print(state.status)


if __name__ == "__main__":
    main()
