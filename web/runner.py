"""Sessions the server drives: goals started over the API, forks asked to run, and sessions a
decision made over the API unblocks. Each is driven in a thread of the server process
(runtime/decisions.py `drive`, which also waits for approvals), holding the session's lease
(runtime/lease.py) so no other process drives it at the same time."""
from __future__ import annotations

import sys
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from loopstream.agents.assemble import registry_for_session
from loopstream.core.policy import SessionPolicy
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.providers.base import Provider
from loopstream.runtime import lease
from loopstream.runtime.assembly import DEFAULT_SYSTEM_PROMPT, build_runtime, open_model
from loopstream.runtime.decisions import drive, load
from loopstream.runtime.inline import SessionConfig
from loopstream.tools.builtin import default_registry

ACTOR = "ui"


class StartError(ValueError):
    """A goal that cannot be started as asked (one line)."""


@dataclass
class RunSettings:
    """What a goal started over the API runs with (the server's configuration)."""

    db: Path
    provider: str | None = None
    model: str | None = None
    tools: list[str] | None = None  # None: every built-in read-only tool
    max_steps: int = 12
    workdir: Path = Path(".")
    policy: SessionPolicy = field(default_factory=SessionPolicy)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    models: tuple[str, ...] | None = ()  # the models a request may choose instead of `model` (None: any)


class Runner:
    """Drives sessions in threads; `close()` stops taking new ones and waits briefly for them."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._stack = ExitStack()
        self._providers: dict[tuple[str | None, str | None], Provider] = {}
        self.errors: dict[str, str] = {}  # session -> why its driver stopped (shown by the API)

    def _provider(self, provider: str | None, model: str | None) -> Provider:
        with self._lock:
            key = (provider, model)
            if key not in self._providers:
                self._providers[key] = self._stack.enter_context(open_model(provider, model))
            return self._providers[key]

    def start(self, goal: str, model: str | None = None) -> str:
        """Start a session on `goal` with the configured provider (and `model`, if given); its id."""
        s = self.settings
        self.check_choice(None, model)
        try:
            provider = self._provider(s.provider, model or s.model)
        except Exception as exc:  # noqa: BLE001 - any provider's configuration error is one line for the client
            raise StartError(f"the model cannot be opened: {exc}") from None
        registry = default_registry()
        names = s.tools if s.tools is not None else registry.names()
        try:
            registry = registry.select(names)
        except KeyError as exc:
            raise StartError(str(exc.args[0])) from None
        config = SessionConfig(provider=provider.name, model=provider.model, tools=list(names),
                               system_prompt=s.system_prompt, max_steps=s.max_steps,
                               workdir=str(s.workdir.resolve()), policy=s.policy)
        log = SQLiteLog(s.db)
        runtime = build_runtime(log, provider, registry)
        try:
            sid = runtime.start_session(goal, config, actor=ACTOR)
        except BaseException:
            log.close()
            raise
        self._spawn(sid, lambda: self._drive(runtime, sid, log))
        return sid

    def check_choice(self, provider: str | None, model: str | None) -> None:
        """A request may name only the server's provider and a model it allows (StartError otherwise)."""
        s = self.settings
        if provider is not None and provider != s.provider:
            raise StartError(f"provider {provider!r} may not be chosen here; this server runs {s.provider or 'the default'}")
        if model is not None and model != s.model and s.models is not None and model not in s.models:
            allowed = ", ".join(s.models) if s.models else "none (start the server with --allow-model NAME)"
            raise StartError(f"model {model!r} may not be chosen here; allowed: {allowed}")

    def ensure_driven(self, session_id: str) -> bool:
        """Drive `session_id` (with the model it records) unless it ended or something drives it."""
        with self._lock:
            thread = self._threads.get(session_id)
            if thread is not None and thread.is_alive():
                return False
        if lease.holder(self.settings.db, session_id) is not None:
            return False
        log = SQLiteLog(self.settings.db)
        state = load(log, session_id)
        if state.terminal:
            log.close()
            return False

        def run() -> None:
            provider = self._provider(state.provider, state.model)
            registry, _ = registry_for_session(state.agent_json, allow_writes=False)
            self._drive(build_runtime(log, provider, registry), session_id, log)

        self._spawn(session_id, run)
        return True

    def _spawn(self, session_id: str, target) -> None:
        def guarded() -> None:
            try:
                target()
            except lease.LeaseHeld:
                pass  # another process drives it
            except Exception as exc:  # noqa: BLE001 - a driver's failure is reported, never kills the server
                self.errors[session_id] = f"{type(exc).__name__}: {exc}"
                print(f"loopstream ui: session {session_id} stopped: {exc}", file=sys.stderr)

        thread = threading.Thread(target=guarded, name=f"drive-{session_id}", daemon=True)
        with self._lock:
            self._threads[session_id] = thread
        thread.start()

    def _drive(self, runtime, session_id: str, log: SQLiteLog) -> None:
        try:
            with lease.hold(self.settings.db, session_id):
                drive(runtime, session_id)
        finally:
            log.close()

    def running(self) -> list[str]:
        with self._lock:
            return [sid for sid, t in self._threads.items() if t.is_alive()]

    def close(self, timeout: float = 2.0) -> None:
        with self._lock:
            threads = list(self._threads.values())
        for t in threads:
            t.join(timeout / max(1, len(threads)))
        self._stack.close()
