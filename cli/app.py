"""The `loopstream` command line: the typer app, its commands, and how errors end a command.

Each command lives in a module by what it does (run.py: run/resume; inspect.py:
sessions/show; decide.py: approve/deny/cancel; replay.py: replay/fork/diff/export/rollback;
workers.py: worker/submit; memory.py: memory list/search/forget/learn). A command parses its options, calls a function that returns a
result, and prints it through output.py. Exit codes: 0 fine, 1 the session or the log
says no (failed run, changed log, a difference), 2 a mistake the user can fix (one line),
130 interrupted (Ctrl-C; the message says how to continue).
"""
from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from loopstream.cli import compose, decide, goal, inspect, mcp_server, memory, observe, output, replay, run, ui, workers
from loopstream.cli.common import UserError
from loopstream.core.codec import CodecError
from loopstream.core.fsm import IllegalTransition
from loopstream.core.log import LogError, SessionNotFound
from loopstream.core.sqlite_log import LogNotFound
from loopstream.kafka.bus import BusError
from loopstream.kafka.settings import KafkaConfigError
from loopstream.providers.errors import ProviderConfigError
from loopstream.runtime.decisions import DecisionError
from loopstream.runtime.lease import LeaseHeld

# Mistakes the user can fix (exit 2) and refusals of the log or the session (exit 1).
USER_ERRORS = (UserError, BusError, LogNotFound, SessionNotFound, ProviderConfigError, DecisionError, LeaseHeld,
               KafkaConfigError)
LOG_ERRORS = (run.LogDamaged, LogError, CodecError, IllegalTransition)


class Commands(TyperGroup):
    """Runs a command and turns the errors above into one line on stderr and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            output.error(str(exc))
            raise typer.Exit(2) from None
        except LOG_ERRORS as exc:
            output.error(str(exc))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            output.note("interrupted")
            raise typer.Exit(run.EXIT_INTERRUPTED) from None


app = typer.Typer(
    cls=Commands,
    help="loopstream: an agent harness whose every step is an Avro event in a log "
    "(embedded SQLite by default, Kafka when one machine is not enough).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help text is literal: `[...]` in it is never markup
)

for command in (run.run, run.resume, replay.rollback, decide.approve, decide.deny, decide.cancel,
                replay.replay, replay.fork, replay.diff, replay.export, inspect.sessions, inspect.show,
                workers.worker, workers.submit, observe.trace, observe.stats, observe.feedback,
                compose.agents, compose.plugins, ui.ui):
    app.command()(command)
app.add_typer(goal.goal_app, name="goal")
app.add_typer(memory.memory_app, name="memory")
app.add_typer(workers.kafka_app, name="kafka")
app.command("eval")(observe.eval_suite)
app.command("mcp-server")(mcp_server.mcp_server)


def main() -> None:
    """Entry point (`loopstream`)."""
    app()


if __name__ == "__main__":
    main()
