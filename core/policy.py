"""A session's policy: one typed model of everything a session runs under (budgets,
retries, compaction, guardrails, permissions, timeouts, …), with every default here.

Read from a TOML policy file (`load_policy`, strict: an unknown key, a wrong type or a
bad regular expression is a `PolicyError` naming the file and the dotted key) or built
in Python; recorded in SessionStarted's `config_json` (`SessionPolicy.to_config_json`)
and folded into `state.policy` (`recorded_policy`). The field reference is docs/policy.md.
"""
from __future__ import annotations

import difflib
import functools
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import jsonschema
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from loopstream.core.tomlfile import read_toml

Action = Literal["allow", "deny", "ask"]
OnTrip = Literal["tell_model", "stop"]
ACTIONS = ("allow", "deny", "ask")
CODE_TOOLS = frozenset({"shell"})  # tools that run code: they run under the sandbox policy
DELEGATION_TOOLS = frozenset({"delegate", "spawn_agents", "spawn_over"})  # tools that start child sessions (docs/subagents.md)
MAX_POLICY_BYTES = 1 << 20


class PolicyError(ValueError):
    """A policy that cannot be used; the message (one line) names where, the key and the problem."""


GuardrailError = PolicyError  # the name older code caught


def _regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    return pattern


def _arg_pattern(pattern: str) -> str:
    if pattern.startswith("re:"):
        _regex(pattern[3:])
    return pattern


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a JSON schema: {exc.message}") from None
    return schema


Regex = Annotated[str, AfterValidator(_regex)]
ArgPattern = Annotated[str, AfterValidator(_arg_pattern)]


class _Section(BaseModel):
    # strict: no "5" for 5, no 1 for true; a recorded config is read with strict=False.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)


class Prices(_Section):
    input: float = Field(0.0, ge=0)
    """USD per million input tokens."""
    output: float = Field(0.0, ge=0)
    """USD per million output tokens."""


class Budgets(_Section):
    """Checked before every model step; the first one exceeded fails the session naming it."""

    max_tokens: int | None = Field(None, ge=1)
    """Input + output tokens for the whole session (replies and tool-call reviews); none: no limit."""
    max_wall_seconds: float | None = Field(None, gt=0)
    """Wall time from SessionStarted; none: no limit."""
    max_cost_usd: float | None = Field(None, ge=0)
    """Spend in USD, computed with `price_per_mtok`; none (or no prices): no limit."""
    price_per_mtok: Prices | None = None
    """Prices for the cost budget: `{ input = 3.0, output = 15.0 }`."""


class Retries(_Section):
    """Backoff for failed model calls and transient tool failures (processors/retry.py)."""

    max_model_attempts: int = Field(3, ge=1)
    """Attempts of one model step before falling back to the next model (or failing)."""
    base_ms: int = Field(500, ge=0)
    """First backoff step; each further attempt doubles it (half fixed, half jittered)."""
    max_ms: int = Field(30_000, ge=0)
    """Largest backoff step."""
    retry_after_max_ms: int = Field(120_000, ge=0)
    """Longest server Retry-After honoured; a longer one counts as a failure."""
    max_tool_attempts: int = Field(3, ge=1)
    """Attempts of an idempotent tool call that fails transiently (timeout, lost connection)."""


class Compaction(_Section):
    """Summarizing older turns when the context grows too large (processors/compaction.py)."""

    context_budget_tokens: int | None = Field(None, ge=1)
    """Estimated prompt tokens of a request (messages, tool specs, action instructions) above
    which older turns are summarized; none: never."""
    keep_recent: int = Field(4, ge=0)
    """Newest messages always kept verbatim."""
    summary_chars: int = Field(800, ge=1)
    """Longest summary (and never more than half of what it replaces)."""
    estimator: Literal[1, 2] = 2
    """How the context is measured. 2: the whole request (messages as the adapter sends them,
    tool specs, action instructions), corrected by the prompt tokens the provider reported for
    the last reply. 1: characters of the messages only, what sessions recorded before 2 were
    decided with (a recorded budget without this key reads as 1, so they replay the same)."""


class Guardrails(_Section):
    """Checks on the goal, the final answer and each proposed tool call (processors/guardrails.py)."""

    input_deny: list[Regex] = []
    """Regular expressions searched in the goal and user messages; a match stops the session."""
    output_deny: list[Regex] = []
    """Regular expressions searched in the final answer."""
    tool_deny: list[Regex] = []
    """Regular expressions searched in `tool {json arguments}` of each proposed call."""
    output_schema: Annotated[dict[str, Any], AfterValidator(_json_schema)] | None = None
    """A JSON schema the final answer (parsed as JSON) must match."""
    review_tool_calls: bool = False
    """A reviewer model approves each tool call before it runs (a ToolCallReviewed event)."""
    on_output: OnTrip = "tell_model"
    """What a tripped output check does: tell the model (it answers again) or stop."""
    on_tool_call: OnTrip = "tell_model"
    """What a blocked tool call does: tell the model or stop."""
    max_output_retries: int = Field(2, ge=0)
    """Answers the model may redo after an output trip before the session fails."""


class PermissionRule(_Section):
    """One rule: the first whose tool and argument patterns all match decides."""

    tool: str = "*"
    """Tool name, a glob (`*`, `write_*`)."""
    args: dict[str, ArgPattern] = {}
    """Argument name -> pattern on its text: a glob (`*.py`), or `re:REGEX` (searched)."""
    action: Action
    """allow, deny (the model is told why) or ask (a person approves or denies)."""
    reason: str = ""
    """Why, as the model or the person is told."""


class Permissions(_Section):
    """Allow, deny or ask per tool and argument (tools/permissions.py)."""

    default: Action = "allow"
    """The action when no rule matches."""
    rules: list[PermissionRule] = []
    """Rules in order; the first match wins."""


class Timeouts(_Section):
    tool_timeout_s: float = Field(300.0, gt=0)
    """A tool call's time limit unless the tool declares its own."""


class SecretHandling(_Section):
    """What happens to secrets (core/secrets.py): the log always holds `[REDACTED:NAME]`."""

    reveal_to_tools: bool = True
    """A `[REDACTED:NAME]` in a tool call's arguments is replaced by the value of the environment
    variable NAME when the tool runs, if the placeholder reached the context from outside the model
    (goal, user message, tool result). Off: tools get the placeholder itself."""


SandboxMode = Literal["workspace-write", "read-only", "full", "none"]


class Sandbox(_Section):
    """How code tools (`shell`) run: under bubblewrap (tools/sandbox.py), or not at all (`none`)."""

    mode: SandboxMode = "workspace-write"
    """workspace-write: the workdir (and a private /tmp) writable, `.git` and `.loopstream` and the
    rest of the file system read-only, home directories hidden; read-only: nothing writable but a
    private /tmp; full: the whole file system writable (explicit opt-in; still its own processes and
    limits); none: no sandbox at all (a plain shell; explicit opt-out)."""
    network: bool = False
    """Give code tools the host's network (default: an empty network namespace, no network at all)."""
    memory_mb: int = Field(4096, ge=16)
    """Address-space limit of each process a code tool starts (RLIMIT_AS), in MiB."""
    file_size_mb: int = Field(1024, ge=1)
    """Largest file a code tool may write (RLIMIT_FSIZE), in MiB."""
    cpu_seconds: int = Field(600, ge=1)
    """CPU time of each process a code tool starts (RLIMIT_CPU)."""
    max_processes: int = Field(256, ge=1)
    """Processes and threads a code tool may have at once (a pids cgroup; RLIMIT_NPROC when not root)."""


class Scope(_Section):
    """What the agent may touch, checked before a tool call runs (tools/scope.py); a call outside is
    ToolFailed `scope_denied` naming the rule."""

    allowed_paths: list[str] = []
    """Paths a tool may name besides the workdir: absolute paths or globs (`/data/*`), or globs relative
    to the workdir (`src/*`: then a relative path must match one of them). Empty: the workdir."""
    allowed_commands: list[str] = []
    """Globs (`git *`, `pytest*`) or `re:REGEX` (matched whole); every simple command of a `shell` call
    (split at `;`, `&&`, `||`, `|`, newlines) must match one. Empty: any command."""


class GoalMode(_Section):
    """Goal mode: a final answer is not the end until a verify command passes (processors/verifier.py)."""

    verify_command: str | None = None
    """A shell command run in the workdir, in the session's sandbox, after each final answer;
    exit code 0 ends the session done, anything else is fed back to the model. None: no goal mode."""
    max_iterations: int = Field(10, ge=1)
    """Verifications before the session fails (`goal_not_verified`); steps, tokens, cost and wall
    time are `[budgets]` and `max_steps`, as for any session."""
    verify_timeout_s: float = Field(300.0, gt=0, le=600)
    """Time limit of one verification."""


HookPoint = Literal["PreToolUse", "PostToolUse", "SessionStart", "SessionEnd", "PreCompact", "PreModelCall",
                    "PostModelCall", "PermissionRequest", "Failure"]
HOOK_POINTS = get_args(HookPoint)


class Hook(_Section):
    """A hook (processors/hooks.py): a command (JSON on stdin, a JSON decision on stdout) or a
    Python callable (`module:function`) run at one point of the loop; its decision is an event."""

    event: HookPoint
    """Where it runs (docs/composability.md#hooks): PreToolUse (may allow, deny, ask or rewrite the
    arguments), PostToolUse (may add a note to the result), PermissionRequest (may approve or deny a
    call a person would be asked about), PreModelCall (may add a note, or stop), PostModelCall,
    PreCompact (may add instructions for the summary), Failure (a failed model or tool call),
    SessionStart, SessionEnd."""
    matcher: str = "*"
    """Tool name glob for the tool events (PreToolUse, PostToolUse, PermissionRequest; Failure: the
    tool's name, or `model` for a failed model call)."""
    command: list[str] = []
    """argv of an executable (no shell), run in the session's workdir."""
    python: str = ""
    """`module:function` called with the input dict, returning a decision dict."""
    timeout_s: float = Field(10.0, gt=0)
    """Seconds before the hook counts as failed."""
    on_error: Literal["deny", "allow", "stop"] = "deny"
    """A failing hook (non-zero exit, timeout, bad JSON): deny the call, let it through, or stop the session."""

    def model_post_init(self, _context: Any) -> None:
        if bool(self.command) == bool(self.python):
            raise ValueError("a hook needs exactly one of `command` (argv list) or `python` (module:function)")

    @property
    def label(self) -> str:
        return self.python or " ".join(self.command)[:200]


class Loops(_Section):
    """Noticing a model that repeats itself (processors/loops.py): the model is told, with the
    earlier result, `nudges` times; the next repeat ends the session (error kind `loop`)."""

    enabled: bool = True
    """Detect loops at all. Sessions recorded before loop detection existed replay with it off."""
    max_identical_calls: int = Field(2, ge=1)
    """Times a tool call with the same name and arguments may be made within the window; the
    next one is a loop (repeated_call)."""
    max_identical_replies: int = Field(2, ge=1)
    """Consecutive identical replies (text and calls) before the next one is a loop (repeated_reply)."""
    oscillation: bool = True
    """Replies alternating between two calls, A B A B, are a loop (oscillation)."""
    window: int = Field(8, ge=2, le=64)
    """Replies looked back over."""
    nudges: int = Field(1, ge=0)
    """Times the model is told before a loop ends the session."""


class Shaping(_Section):
    """What the model is sent, made to fit a small context (processors/shaping.py); the log
    keeps every message whole."""

    enabled: bool = True
    """Shape the conversation sent. Sessions recorded before shaping existed run without it."""
    dedupe_results: bool = True
    """A tool result identical to a later one (a file read twice) is sent once, at its latest place."""
    max_result_chars: int = Field(8000, ge=0)
    """A longer tool result is sent as its head and tail with a note of what was left out; 0: whole."""
    final_answer_nudge: bool = True
    """On the last step the step budget allows, the model is told to answer now."""


class Answers(_Section):
    """Checks on a final answer that a small model gets wrong (processors/answers.py): the
    model is told why the answer is refused, `nudges` times in all; then its answer stands."""

    enabled: bool = False
    """Check final answers (off by default: on the 0.5B model they cost steps and did not raise
    the pass rate, docs/small-models.md). Sessions recorded without this section ran without it."""
    echoed_error: bool = True
    """An answer that repeats the last tool call's error is refused: the model is told to fix
    the call or answer the goal (echoed_error)."""
    named_tool: bool = True
    """An answer given before any tool call, when the goal names one of the session's tools
    ("use the add tool"), is refused: the model is told to call it (named_tool)."""
    nudges: int = Field(1, ge=0)
    """Answers refused in all before the model's answer is accepted as it is."""


def _namespace(value: str) -> str:
    if not value.strip() or len(value) > 200 or any(ord(c) < 32 for c in value):
        raise ValueError("a namespace is 1 to 200 printable characters")
    unknown = set(re.findall(r"\{([^{}]*)\}", value)) - {"user", "agent", "project"}
    if unknown:
        raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}} (known: {{user}}, {{agent}}, {{project}})")
    return value


class Memory(_Section):
    """Memory across sessions (core/memory.py, docs/memory.md): the `remember` and `recall` tools,
    and what is recalled at the start, recorded as a MemoryRecalled event before the goal."""

    enabled: bool = False
    """Use memory at all. Sessions recorded without this section ran without it."""
    namespace: Annotated[str, AfterValidator(_namespace)] = "{user}/{agent}/{project}"
    """Whose memories: `{user}` (LOOPSTREAM_USER, else the login name), `{agent}` (the agent's
    name), `{project}` (the project folder's name) are filled in at the start and recorded."""
    budget_tokens: int = Field(400, ge=0, le=8000)
    """Estimated tokens of the memories given to the agent at its start; 0: none."""
    max_recalled: int = Field(8, ge=0, le=100)
    """Memories given at the start, at most: lessons first, then those that match the goal best."""
    lessons: bool = True
    """Give the namespace's lessons (from feedback: `loopstream memory learn`) at every start."""
    tools: bool = True
    """Offer the model the `remember` and `recall` tools."""
    max_chars: int = Field(1000, ge=1, le=4000)
    """Longest memory the `remember` tool keeps (a longer one is refused, not cut)."""
    max_writes: int = Field(20, ge=0)
    """Memories one session may keep."""
    max_items: int = Field(1000, ge=1)
    """Memories one namespace may hold; `remember` is refused beyond it."""


class Delegation(_Section):
    """Sub-agents (docs/subagents.md): limits on the child sessions the `delegate` and
    `spawn_agents` tools start. A session with either tool records this section whole."""

    max_depth: int = Field(2, ge=0, le=16)
    """How deep a tree may grow: a session at this depth (top level: 0) may not delegate."""
    max_children: int = Field(8, ge=1, le=1000)
    """Children one call may start."""
    max_parallel: int = Field(4, ge=1, le=256)
    """Children of one call that run at once, in-process (a bounded pool)."""
    max_task_chars: int = Field(20_000, ge=1, le=100_000)
    """Longest task text a child may be given."""
    agents: list[str] = []
    """Agent names a child may run as, besides the parent's own definition (`agent` omitted);
    the project file's `sub_agents` of the parent's agent join them."""


class SessionPolicy(_Section):
    """Everything a session runs under besides its model, tools and prompt; recorded in
    SessionStarted and folded into `state.policy`. Build it in Python, or `load_policy` a file."""

    budgets: Budgets = Budgets()
    retries: Retries = Retries()
    compaction: Compaction = Compaction()
    guardrails: Guardrails = Guardrails()
    permissions: Permissions = Permissions()
    timeouts: Timeouts = Timeouts()
    secrets: SecretHandling = SecretHandling()
    sandbox: Sandbox = Sandbox()
    scope: Scope = Scope()
    goal: GoalMode = GoalMode()
    loops: Loops = Loops()
    shaping: Shaping = Shaping()
    answers: Answers = Answers()
    memory: Memory = Memory()
    delegation: Delegation = Delegation()
    fallback_models: list[str] = []
    """Models to switch to, in order, when the current one keeps failing."""
    checkpoint_exclude: list[str] = []
    """gitignore patterns never snapshotted before a side-effect tool (nor restored)."""
    progress_updates: bool = False
    """Publish every event as a progress update to the goal's reply topic (Kafka)."""
    hooks: list[Hook] = []
    """Hooks run at points of the loop (processors/hooks.py); each decision is a HookDecided event."""

    _unreadable: str | None = PrivateAttr(None)

    @property
    def unreadable(self) -> str | None:
        """Why the recorded policy this stands in for could not be read (see `recorded_policy`)."""
        return self._unreadable

    def to_config_json(self, *, code_tools: bool = False, delegates: bool = False) -> str:
        """The JSON recorded in SessionStarted: what differs from the defaults, with a context
        budget the estimator it is measured with, and the settings of loop detection, shaping
        and answer checks whole (defaults may change; a replay decides as the session was
        decided). A session with a code tool (`code_tools`: shell) always records its sandbox
        mode and network, one with a delegation tool (`delegates`) its delegation limits."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        if code_tools:
            data["sandbox"] = {**data.get("sandbox", {}), "mode": self.sandbox.mode, "network": self.sandbox.network}
        if self.compaction.context_budget_tokens is not None:
            data.setdefault("compaction", {})["estimator"] = self.compaction.estimator
        if delegates:  # a session that may start children records their limits whole
            data["delegation"] = self.delegation.model_dump(mode="json")
        for name in WHOLE_WHEN_ON:  # recorded whole: a session without them ran without them
            if getattr(self, name).enabled:
                data[name] = getattr(self, name).model_dump(mode="json")
        return json.dumps(data, sort_keys=True)

    def updated(self, changes: dict[str, Any], where: str = "policy") -> SessionPolicy:
        """A copy with `changes` (nested dicts, as in a policy file) merged in and validated."""
        return parse_policy(_merge(self.model_dump(exclude_defaults=True), changes), where)


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# -- validation errors as one line ---------------------------------------------------
_EXPECTED = {"dict_type": "a table", "model_type": "a table", "list_type": "an array", "string_type": "a string",
             "int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}


def _dotted(loc: tuple, legacy_file: bool) -> str:
    if legacy_file and loc[:2] == ("permissions", "rules"):  # reported as the file spells it
        loc = ("permissions", *loc[2:])
    elif legacy_file and loc[:2] == ("permissions", "default"):
        loc = loc[1:]
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model inside a field's type (`Budgets`, `Prices | None`, `list[PermissionRule]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _submodel(a)) is not None), None)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = SessionPolicy
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        model = _submodel(field.annotation) if field is not None else None
    return model


def _reason(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    if kind == "extra_forbidden":
        known = list((_model_at(error["loc"][:-1]) or SessionPolicy).model_fields)
        close = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        return "unknown key" + (f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(known)})")
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind == "missing":
        return "required key missing"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg[:1].lower()}{msg[1:]}, got {got}"


def _one_line(exc: ValidationError, where: str, legacy_file: bool = False) -> PolicyError:
    errors = exc.errors()
    first = errors[0]
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    text = f"{where}: {_dotted(first['loc'], legacy_file)}: {_reason(first)}{more}"
    return PolicyError(" ".join(text.split()))


def parse_policy(data: Any, where: str = "policy") -> SessionPolicy:
    """A policy from nested dicts (a policy file's tables), strictly; PolicyError names the key."""
    if not isinstance(data, dict):
        raise PolicyError(f"{where}: expected a table of policy sections, got {type(data).__name__}")
    try:
        return SessionPolicy.model_validate(data)
    except ValidationError as exc:
        raise _one_line(exc, where) from None


# -- the policy file -----------------------------------------------------------------
def load_policy(path: str | Path) -> SessionPolicy:
    """Read a TOML policy file into a SessionPolicy, or raise PolicyError (one line: the file,
    the dotted key, the reason). The older shape (top-level `default`, `[[permissions]]` as
    the rule list) is read too."""
    path = Path(path)
    raw = read_toml(path, f"policy file {path}", MAX_POLICY_BYTES, PolicyError)
    legacy = isinstance(raw.get("permissions"), list) or ("default" in raw and "permissions" not in raw)
    if legacy:
        raw["permissions"] = {"default": raw.pop("default", "allow"), "rules": raw.get("permissions", [])}
    try:
        return SessionPolicy.model_validate(raw)
    except ValidationError as exc:
        raise _one_line(exc, str(path), legacy) from None


# -- what a session recorded ---------------------------------------------------------
# The flat keys sessions recorded before the policy was typed, and where they live now.
LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "max_tokens": ("budgets", "max_tokens"),
    "max_wall_seconds": ("budgets", "max_wall_seconds"),
    "max_cost_usd": ("budgets", "max_cost_usd"),
    "price_per_mtok": ("budgets", "price_per_mtok"),
    "max_model_attempts": ("retries", "max_model_attempts"),
    "retry_base_ms": ("retries", "base_ms"),
    "retry_max_ms": ("retries", "max_ms"),
    "retry_after_max_ms": ("retries", "retry_after_max_ms"),
    "max_tool_attempts": ("retries", "max_tool_attempts"),
    "context_budget_tokens": ("compaction", "context_budget_tokens"),
    "compaction_keep_recent": ("compaction", "keep_recent"),
    "compaction_summary_chars": ("compaction", "summary_chars"),
    "tool_timeout_s": ("timeouts", "tool_timeout_s"),
}


def from_legacy(config: dict[str, Any]) -> dict[str, Any]:
    """A flat config of the old shape (`{"max_tokens": …, "retry_base_ms": …}`) as nested
    sections. Keys already in the new shape pass through."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key in LEGACY_KEYS:
            section, name = LEGACY_KEYS[key]
            if not isinstance(out.get(section), dict):
                out[section] = {}
            out[section][name] = value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**value, **out[key]}
        else:
            out[key] = value
    return out


def _known_only(model: type[BaseModel], data: Any) -> Any:
    """`data` without the keys `model` does not know, at every level (a recorded config may
    hold keys the code that wrote it ignored)."""
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        sub = _submodel(field.annotation)
        if sub is not None:
            value = [_known_only(sub, v) for v in value] if isinstance(value, list) else _known_only(sub, value)
        out[key] = value
    return out


@functools.lru_cache(maxsize=256)
def recorded_policy(config_json: str) -> SessionPolicy:
    """The policy a SessionStarted recorded, for the fold: never raises. Old flat configs are
    read (`from_legacy`), keys the code does not know are ignored, values are coerced as the
    old code did (`"3"` → 3). A config that still cannot be read gives a fail-closed policy
    (every tool call denied) whose `unreadable` says why; the orchestrator fails the session."""
    try:
        raw = json.loads(config_json or "{}")
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
        config = _recorded_off_when_absent(_recorded_estimator(_known_only(SessionPolicy, from_legacy(raw))))
        return SessionPolicy.model_validate(config, strict=False)
    except (ValueError, TypeError, RecursionError) as exc:
        why = str(_one_line(exc, "recorded policy")) if isinstance(exc, ValidationError) else f"recorded policy: {exc}"
        return _fail_closed(why)


def _recorded_estimator(config: dict[str, Any]) -> dict[str, Any]:
    """A recorded context budget without `estimator` was written before estimator 2 existed:
    it was measured with estimator 1, and replays with it."""
    compaction = config.get("compaction")
    if isinstance(compaction, dict) and compaction.get("context_budget_tokens") is not None:
        config["compaction"] = {"estimator": 1, **compaction}
    return config


# Sections recorded whole while on; a recorded policy without one was written before it existed
# (or with it off) and replays with it off.
WHOLE_WHEN_ON = ("loops", "shaping", "answers", "memory")


def _recorded_off_when_absent(config: dict[str, Any]) -> dict[str, Any]:
    """Sections of `WHOLE_WHEN_ON` a recorded policy lacks are off."""
    if isinstance(config, dict):
        for name in WHOLE_WHEN_ON:
            config.setdefault(name, {"enabled": False})
    return config


def _fail_closed(why: str) -> SessionPolicy:
    reason = f"the session's {why[:300]}; nothing runs under it"
    policy = SessionPolicy(permissions=Permissions(default="deny", rules=[
        PermissionRule(tool="*", action="deny", reason=reason)]))
    policy._unreadable = reason
    return policy


def reference() -> str:
    """The policy's fields as a Markdown table (docs/policy.md holds it; a test keeps it current)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key, sub = f"{prefix}{name}", _submodel(field.annotation)
            if sub is not None and sub is not Prices:
                walk(sub, f"{key}[]." if get_origin(field.annotation) is list else f"{key}.")
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.default
                default = json.dumps(value.model_dump() if isinstance(value, BaseModel) else value)
            rows.append(f"| `{key}` | {_type_name(field.annotation)} | {default} | "
                        f"{' '.join((field.description or '').split())} |")

    walk(SessionPolicy, "")
    return "\n".join(rows)


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Annotated:
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) is Literal:
        return " or ".join(json.dumps(a) for a in get_args(annotation))
    if annotation is type(None):
        return "none"
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"table {{{', '.join(annotation.model_fields)}}}"
    if isinstance(annotation, type) and not get_args(annotation):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__)
    args = [_type_name(a) for a in get_args(annotation)]
    origin = get_origin(annotation)
    if origin is list:
        return f"list of {args[0]}"
    if origin is dict:
        return f"table of {args[1]}"
    return " or ".join(args)
