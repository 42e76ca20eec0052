"""The inspector's HTTP server: the page (static files) and the JSON API beneath it.

Routes, auth and the event stream are documented in docs/inspector.md. Every error is JSON
(`{"error": "...", "status": N}`), never a traceback page."""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loopstream.core.codec import decode_prefix
from loopstream.core.describe import status_of
from loopstream.core.fsm import ANNOTATIONS
from loopstream.core.log import SessionNotFound
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.observe.feedback import FeedbackError, give_feedback
from loopstream.replay.diff import diff as diff_sessions
from loopstream.replay.fork import ForkError, ForkNeedsAcknowledgement, fork
from loopstream.replay.inspect import INTERRUPTED, session_rows, show_session
from loopstream.runtime import lease
from loopstream.runtime.decisions import DecisionError, cancel, decide, load
from loopstream.web import views
from loopstream.web.guard import Guard, is_loopback
from loopstream.web.links import Links, events_of_types
from loopstream.web.runner import Runner, RunSettings, StartError

STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 * 1024 * 1024
POLL_S = 0.2
KEEPALIVE_S = 15.0
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    token: str | None = None
    person: str = "person:ui"  # the actor recorded for decisions made on the page


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return views.dumps(content)


def _error(status: int, message: str) -> JSON:
    return JSON({"error": message, "status": status}, status_code=status)


def create_app(run: RunSettings, server: ServerSettings | None = None) -> Starlette:
    """The ASGI app over the SQLite log `run.db` (created if missing)."""
    server = server or ServerSettings()
    db = run.db
    SQLiteLog(db).close()  # create the log, so a fresh server lists nothing rather than failing
    runner = Runner(run)
    tree_links = Links()  # read incrementally: each call reads only the events appended since

    def log() -> SQLiteLog:
        return SQLiteLog(db)

    def known(lg: SQLiteLog, sid: str) -> str:
        if not sid or lg.next_seq(sid) == 0:
            raise ApiError(404, f"no session {sid!r}")
        return sid

    # -- reading ---------------------------------------------------------------------
    def list_sessions(request: Request) -> JSON:
        q = request.query_params
        query, status = q.get("q", "").strip().lower(), q.get("status", "").strip().lower()
        limit = _int(q.get("limit", "200"), "limit", 1)
        with log() as lg:
            rows = session_rows(lg, None if query or status else limit)  # unfiltered: only the rows shown
            total = len(lg.sessions())
            found = tree_links.read(lg)
        picked = [r for r in reversed(rows)
                  if (not status or r.status == status)
                  and (not query or query in r.goal.lower() or query in r.session_id.lower()
                       or query in r.model.lower())]
        return JSON({"sessions": [views.row(r, found.get(r.session_id)) for r in picked[:limit]],
                     "total": total, "matched": len(picked) if query or status else total})

    def read_session(request: Request) -> JSON:
        with log() as lg:
            sid = known(lg, request.path_params["sid"])
            shown = show_session(lg, sid)
            rows = {r.session_id: r for r in session_rows(lg, only={sid})}
            try:  # a damaged session: the state its readable events fold to
                state = fold(shown.events) if shown.events else None
            except Exception:  # noqa: BLE001 - a log the fold refuses still shows its events
                state = None
            link = tree_links.read(lg).get(sid)
        out = views.session(shown, rows[sid].status if sid in rows else "unknown", state, link)
        out["driver_error"] = runner.errors.get(sid)
        return JSON(out)

    def session_tree(request: Request) -> JSON:
        with log() as lg:
            sid = known(lg, request.path_params["sid"])
            found = tree_links.read(lg)
            rows = session_rows(lg, only=views.members(found, sid))
        return JSON(views.tree(found, sid, {r.session_id: r.status for r in rows},
                               {r.session_id: r.goal for r in rows}))

    def diff(request: Request) -> JSON:
        a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
        with log() as lg:
            known(lg, a), known(lg, b)
            return JSON(views.diff(diff_sessions(lg, a, b)))

    def evals(request: Request) -> JSON:
        with log() as lg:
            return JSON({"suites": views.grades(events_of_types(lg, ["EvalGraded"])[0])})

    # -- the stream --------------------------------------------------------------------
    async def stream(request: Request) -> StreamingResponse:
        sid = request.path_params["sid"]
        with log() as lg:
            known(lg, sid)
        start = request.headers.get("last-event-id") or request.query_params.get("from")
        first = _int(start, "from", 0) + (1 if request.headers.get("last-event-id") else 0) if start else 0
        return StreamingResponse(_events(request, sid, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def _events(request: Request, sid: str, next_seq: int) -> AsyncIterator[bytes]:
        lg = log()
        try:
            yield b"retry: 1000\n\n"
            last_status, status_at, quiet = None, -1, 0.0
            while not await request.is_disconnected():
                if await run_in_threadpool(lg.next_seq, sid) != status_at:
                    quiet = 0.0
                    # one read for the events and the status: the status never runs ahead of what was sent
                    decoded, error, status, status_at = await run_in_threadpool(_snapshot, lg, sid)
                    for e in decoded[next_seq:]:
                        yield _sse("event", views.dumps(views.event(e)), e.seq)
                    next_seq = max(next_seq, len(decoded))
                    if error is not None:
                        yield _sse("problem", views.dumps({"seq": len(decoded), "error": error}))
                        return
                    if status != last_status:
                        last_status = status
                        yield _sse("status", views.dumps(status))
                    if status["terminal"]:
                        yield _sse("end", views.dumps({"status": status["status"]}))
                        return
                elif (quiet := quiet + POLL_S) >= KEEPALIVE_S:
                    quiet = 0.0
                    yield b": keepalive\n\n"
                await asyncio.sleep(POLL_S)
        finally:
            lg.close()

    # -- writing ---------------------------------------------------------------------
    async def start(request: Request) -> JSON:
        body = await _body(request)
        goal = _str(body, "goal", required=True)
        if not goal.strip():
            raise ApiError(400, "goal is empty: say what the agent should do")
        model = _str(body, "model") or None
        try:
            sid = await run_in_threadpool(runner.start, goal, model)
        except StartError as exc:
            raise ApiError(400, str(exc)) from None
        return JSON({"session_id": sid}, status_code=201)

    async def approve(request: Request) -> JSON:
        return await _decide(request, True)

    async def deny(request: Request) -> JSON:
        return await _decide(request, False)

    async def _decide(request: Request, approved: bool) -> JSON:
        sid, body = request.path_params["sid"], await _body(request)
        call_id = _str(body, "call_id", required=True)
        reason = _str(body, "reason")

        def act() -> dict:
            with log() as lg:
                known(lg, sid)
                d = decide(lg, sid, call_id, approved, by=server.person, reason=reason)
            runner.ensure_driven(sid)  # nobody drives it (the server restarted since): continue it here
            return {"session_id": sid, "call_id": call_id, "approved": d.approved, "status": str(d.state.status)}

        return JSON(await run_in_threadpool(act))

    async def cancel_session(request: Request) -> JSON:
        sid, body = request.path_params["sid"], await _body(request)
        reason = _str(body, "reason") or "cancelled from the inspector"

        def act() -> dict:
            with log() as lg:
                known(lg, sid)
                state = cancel(lg, sid, by=server.person, reason=reason)
            return {"session_id": sid, "status": str(state.status)}

        return JSON(await run_in_threadpool(act))

    async def fork_session(request: Request) -> JSON:
        sid, body = request.path_params["sid"], await _body(request)
        at = body.get("at_seq")
        if not isinstance(at, int) or isinstance(at, bool):
            raise ApiError(400, "at_seq: an integer (the parent's event to fork after) is required")
        options = {k: _str(body, k) or None for k in ("model", "provider", "system_prompt", "message")}
        reason, ack, run = _str(body, "reason"), _bool(body, "acknowledge_side_effects"), _bool(body, "run")
        try:
            runner.check_choice(options["provider"], options["model"])
        except StartError as exc:
            raise ApiError(400, str(exc)) from None

        def act() -> dict:
            with log() as lg:
                known(lg, sid)
                result = fork(lg, sid, at, reason=reason, acknowledge_side_effects=ack, actor=server.person,
                              **options)
            driven = runner.ensure_driven(result.child_session_id) if run else False
            return {"session_id": result.child_session_id, "parent_session_id": sid, "at_seq": at,
                    "events_copied": result.events_copied, "events_referred": result.events_referred,
                    "running": driven}

        return JSON(await run_in_threadpool(act), status_code=201)

    async def resume(request: Request) -> JSON:
        sid = request.path_params["sid"]

        def act() -> dict:
            with log() as lg:
                known(lg, sid)
                state = load(lg, sid)
            if state.terminal:
                raise ApiError(409, f"session {sid} already ended ({state.status}); fork it to continue")
            return {"session_id": sid, "running": runner.ensure_driven(sid)}

        return JSON(await run_in_threadpool(act))

    async def feedback(request: Request) -> JSON:
        sid, body = request.path_params["sid"], await _body(request)
        score = body.get("score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            raise ApiError(400, "score: a number")
        comment = _str(body, "comment")

        def act() -> dict:
            with log() as lg:
                known(lg, sid)
                give_feedback(lg, sid, server.person.removeprefix("person:"), score, comment)
            return {"session_id": sid}

        return JSON(await run_in_threadpool(act), status_code=201)

    # -- the page ------------------------------------------------------------------------
    def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def health(request: Request) -> JSON:
        return JSON({"ok": True, "log": str(db), "running": runner.running()})

    routes = [
        Route("/", page),
        Route("/api/health", health),
        Route("/api/sessions", list_sessions, methods=["GET"]),
        Route("/api/sessions", start, methods=["POST"]),
        Route("/api/sessions/{sid}", read_session),
        Route("/api/sessions/{sid}/events", stream),
        Route("/api/sessions/{sid}/tree", session_tree),
        Route("/api/sessions/{sid}/approve", approve, methods=["POST"]),
        Route("/api/sessions/{sid}/deny", deny, methods=["POST"]),
        Route("/api/sessions/{sid}/cancel", cancel_session, methods=["POST"]),
        Route("/api/sessions/{sid}/fork", fork_session, methods=["POST"]),
        Route("/api/sessions/{sid}/resume", resume, methods=["POST"]),
        Route("/api/sessions/{sid}/feedback", feedback, methods=["POST"]),
        Route("/api/diff", diff),
        Route("/api/evals", evals),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await run_in_threadpool(runner.close)

    app = Starlette(routes=routes, exception_handlers=_handlers(), lifespan=lifespan)
    app.state.runner = runner
    app.add_middleware(_Headers)
    app.add_middleware(Guard, loopback=is_loopback(server.host), token=server.token)
    return app


def _snapshot(lg: SQLiteLog, sid: str) -> tuple[list, str | None, dict, int]:
    """The session's readable events, why the next one cannot be read (None), its status (as
    the list shows it) after those events, and how many events were read."""
    raw = lg.read_raw(sid)
    events, error = decode_prefix(raw)
    try:
        out = views.state(fold(events))
    except Exception as exc:  # noqa: BLE001 - a log the fold refuses: the stream says so and stops
        return events, error or f"{type(exc).__name__}: {exc}", {}, len(raw)
    status = status_of(next((e.type for e in reversed(events) if e.type not in ANNOTATIONS), ""))
    if status == "running" and lease.holder(lg.path, sid) is None and not lease.workers_attached(lg.path):
        status = INTERRUPTED  # as the list shows it: nothing drives it
    out["status"] = status
    return events, None if error is None else str(error), out, len(raw)


def _sse(kind: str, data: bytes, seq: int | None = None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\n".encode() + b"data: " + data + b"\n\n"  # data: one line (JSON, ASCII)


# -- input -------------------------------------------------------------------------------
async def _body(request: Request) -> dict:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY // (1024 * 1024)} MiB")
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"the request body is larger than {MAX_BODY // (1024 * 1024)} MiB")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


_SURROGATE = re.compile("[\ud800-\udfff]")


def _str(body: dict, name: str, required: bool = False) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise ApiError(400, f"{name}: required")
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{name}: a string")
    return _SURROGATE.sub("\ufffd", value)  # JSON may escape a lone surrogate; the log stores valid text


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"{name}: true or false")
    return value


def _int(text: str | None, name: str, low: int) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise ApiError(400, f"{name}: an integer") from None
    if value < low:
        raise ApiError(400, f"{name}: at least {low}")
    return value


# -- errors and headers -----------------------------------------------------------------------
def _handlers() -> dict[Any, Callable]:
    async def api_error(request: Request, exc: Exception) -> JSON:
        if isinstance(exc, ApiError):
            return _error(exc.status, str(exc))
        if isinstance(exc, HTTPException):
            return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")
        if isinstance(exc, SessionNotFound):
            return _error(404, str(exc))
        if isinstance(exc, ForkNeedsAcknowledgement):
            return JSON({"error": str(exc).splitlines()[0], "status": 409,
                         "side_effects": [s.as_json() for s in exc.side_effects]}, status_code=409)
        if isinstance(exc, DecisionError | ForkError | FeedbackError):
            return _error(409, str(exc))
        return _error(500, f"internal error: {type(exc).__name__}")

    return {Exception: api_error, HTTPException: api_error, ApiError: api_error, SessionNotFound: api_error,
            DecisionError: api_error, ForkError: api_error, FeedbackError: api_error}


class _Headers:
    """Security headers on every response: the page runs only its own script (no inline code)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)
