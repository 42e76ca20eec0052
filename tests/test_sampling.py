"""Sampling settings belong to the agent: recorded in SessionStarted (v2), sent on every model
call from the session's record (so resume and fork sample the same, unless a fork overrides),
and an empty or cut-off final answer is not success."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastavro import schemaless_writer

from loopstream.core import codec
from loopstream.core import events as ev
from loopstream.core.codec import decode, encode
from loopstream.core.sampling import Sampling, SamplingError, sampling_from
from loopstream.core.sqlite_log import SQLiteLog
from loopstream.core.state import fold
from loopstream.providers.base import ModelReply, ToolCall
from loopstream.providers.scripted import ScriptedProvider, adder_script
from loopstream.replay import fork, read_archive
from loopstream.replay.fork import ForkError
from loopstream.runtime.assembly import AgentsFileError, build_runtime, default_agents
from loopstream.runtime.inline import RuntimeStuck, SessionConfig
from tests.helpers import make_event
from tests.test_cli import cli


@pytest.fixture
def log(tmp_path):
    with SQLiteLog(tmp_path / "s.db") as log:
        yield log


def config(**kw) -> SessionConfig:
    return SessionConfig(provider="scripted", model="scripted", tools=["add"], **kw)


CHOSEN = Sampling(temperature=0.3, max_output_tokens=200, stop=["###"], top_p=0.9, seed=11)


# ---------------------------------------------------------------- recorded, then sent from the record


def test_session_started_records_the_settings_and_every_call_is_sent_them(log) -> None:
    provider = ScriptedProvider(adder_script(2))
    rt = build_runtime(log, provider)
    sid = rt.start_session("count to two", config(sampling=CHOSEN))
    state = rt.run_session(sid)
    assert state.status == "done"
    started = log.read(sid)[0]
    assert started.schema_version == codec.REGISTRY.latest("SessionStarted") == 4
    p = started.payload
    assert (p.temperature, p.max_output_tokens, p.stop, p.top_p, p.seed) == (0.3, 200, ["###"], 0.9, 11)
    assert provider.calls == 3 and provider.samplings == [CHOSEN] * 3
    assert state.sampling == CHOSEN


def test_a_config_without_settings_records_and_sends_the_safe_defaults(log) -> None:
    provider = ScriptedProvider(adder_script(1))
    rt = build_runtime(log, provider)
    sid = rt.start_session("count to one", config())
    rt.run_session(sid)
    p = log.read(sid)[0].payload
    assert (p.temperature, p.max_output_tokens, p.stop, p.top_p, p.seed) == (0.0, 1024, [], None, None)
    assert provider.samplings == [Sampling()] * 2


def test_a_resumed_session_samples_with_its_record_not_the_new_processs_defaults(log) -> None:
    first = build_runtime(log, ScriptedProvider([ModelReply(text="", tool_calls=[
        ToolCall(call_id="c", name="add", arguments={"a": 1, "b": 1})])]))
    sid = first.start_session("add", config(sampling=CHOSEN))
    with pytest.raises(RuntimeStuck):
        first.run_session(sid, max_events=4)  # stops half way (as if the process died)
    assert fold(log.read(sid)).status == "planning"
    provider = ScriptedProvider([ModelReply(text="2")])
    later = build_runtime(log, provider)  # a new process, a provider with default settings
    assert later.run_session(sid).status == "done"
    assert provider.samplings and set(provider.samplings) == {CHOSEN}


def test_a_fork_keeps_the_settings_or_changes_only_those_it_names(log) -> None:
    rt = build_runtime(log, ScriptedProvider(adder_script(3)))
    parent = rt.start_session("count to three", config(sampling=CHOSEN))
    rt.run_session(parent)
    same = fork(log, parent, 5, reason="again")
    assert same.state.sampling == CHOSEN
    changed = fork(log, parent, 5, reason="hotter", sampling={"temperature": 0.9, "stop": []})
    assert json.loads(log.read(changed.child_session_id)[6].payload.overrides_json)["sampling"] == {
        "temperature": 0.9, "stop": []}
    provider = ScriptedProvider(adder_script(3))
    state = build_runtime(log, provider).run_session(changed.child_session_id)
    assert state.status == "done"
    assert set(provider.samplings) == {CHOSEN.model_copy(update={"temperature": 0.9, "stop": ()})}
    with pytest.raises(ForkError, match="temperature"):
        fork(log, parent, 5, sampling={"temperature": -1})
    with pytest.raises(ForkError, match="top_k"):
        fork(log, parent, 5, sampling={"top_k": 4})


# ---------------------------------------------------------------- old sessions


def v1_session_started(provider: str) -> bytes:
    """A SessionStarted as code before v2 wrote it: the v1 schema's bytes, schema_version 1."""
    payload = io.BytesIO()
    fields = dict(agent="a", provider=provider, model="m", system_prompt="", tools=["add"], max_steps=5,
                  workdir=".", config_json="{}")
    schemaless_writer(payload, codec.REGISTRY.versions["SessionStarted"][1], fields)
    current = encode(make_event(ev.SessionStarted(**fields), seq=0))
    event = decode(current)
    envelope = {**event.model_dump(exclude={"payload", "chain_hash"}), "schema_version": 1,
                "payload": payload.getvalue()}
    out = io.BytesIO()
    schemaless_writer(out, codec.REGISTRY.envelope_body, envelope)
    return out.getvalue() + b"\x00"


@pytest.mark.parametrize(("provider", "temperature", "cap"), [
    ("local", 0.0, 1024),  # what local_provider always sent
    ("anthropic", None, 4096),  # the adapter's cap; the API's default temperature
    ("openai", None, None),  # nothing: the server's defaults
    ("scripted", None, None),
])
def test_a_v1_session_started_reads_as_v2_with_what_its_day_sent(provider: str, temperature, cap) -> None:
    event = decode(v1_session_started(provider))
    assert event.schema_version == 4  # read as the newest version (v3 adds the agent definition, v4 the parent)
    p = event.payload
    assert (p.provider, p.temperature, p.max_output_tokens, p.stop, p.top_p, p.seed) == (
        provider, temperature, cap, [], None, None)
    # What the fold (and so a resume) sends: the record, the safe default where it has none.
    assert fold([event]).sampling == Sampling(temperature=temperature or 0.0, max_output_tokens=cap or 1024)


# ---------------------------------------------------------------- an empty answer is not success


def test_an_empty_answer_is_refused_and_the_model_answers_again(log) -> None:
    provider = ScriptedProvider([ModelReply(text="  \n"), ModelReply(text="4")])
    rt = build_runtime(log, provider)
    sid = rt.start_session("What is 2 + 2?", config())
    state = rt.run_session(sid)
    assert (state.status, state.answer) == ("done", "4")
    trip = next(e.payload for e in log.read(sid) if e.type == "GuardrailTripped")
    assert (trip.stage, trip.rule, trip.action) == ("output", "empty_answer", "tell_model")
    assert state.messages[-2].role == "user" and "empty" in state.messages[-2].content
    assert state.guardrail_trips == 0 and state.unfinished_answers == 1  # not a policy guardrail


def test_empty_answers_every_time_fail_the_session_with_a_clear_reason(log) -> None:
    provider = ScriptedProvider([ModelReply(text="")])
    rt = build_runtime(log, provider)
    sid = rt.start_session("What is 2 + 2?", config(policy={"guardrails": {"max_output_retries": 2}}))
    state = rt.run_session(sid)
    assert state.status == "failed" and state.answer is None
    assert provider.calls == 3
    events = log.read(sid)
    assert [e.payload.action for e in events if e.type == "GuardrailTripped"] == ["tell_model", "tell_model", "stop"]
    failed = events[-1].payload
    assert failed.error_kind == "empty_answer" and "empty 3 time(s)" in failed.reason


def test_an_answer_cut_at_the_output_cap_is_not_final(log) -> None:
    cut = ModelReply(text="The answer is 4, because first we take two and then", finish_reason="length")
    provider = ScriptedProvider([cut, ModelReply(text="4", finish_reason="stop")])
    sid = build_runtime(log, provider).start_session("What is 2 + 2?", config(sampling=Sampling(max_output_tokens=12)))
    state = build_runtime(log, provider).run_session(sid)
    assert (state.status, state.answer) == ("done", "4")
    trip = next(e.payload for e in log.read(sid) if e.type == "GuardrailTripped")
    assert trip.rule == "truncated_answer" and "12 output tokens" in trip.message


def test_replies_that_call_tools_are_never_refused_for_empty_text(log) -> None:
    state = build_runtime(log, ScriptedProvider(adder_script(2))).run_session(
        build_runtime(log, ScriptedProvider([])).start_session("count", config()))
    assert state.status == "done" and state.unfinished_answers == 0


# ---------------------------------------------------------------- definitions and their mistakes


def test_agents_file_sampling_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"warm": {"sampling": {"temperature": 0.7, "stop": ["END"]}}}))
    agents = default_agents("local", "m", path)
    assert agents["default"].sampling == Sampling()
    assert agents["warm"].sampling == Sampling(temperature=0.7, stop=["END"])
    for bad, fragment in [({"temperature": "hot"}, "temperature"), ({"max_output_tokens": 0}, "max_output_tokens"),
                          ({"temprature": 1}, "temprature"), ([1], "an object")]:
        path.write_text(json.dumps({"warm": {"sampling": bad}}))
        with pytest.raises(AgentsFileError, match=fragment):
            default_agents("local", "m", path)


@pytest.mark.parametrize(("values", "fragment"), [
    ({"temperature": float("nan")}, "temperature: Input should be a finite number"),
    ({"temperature": 2.5}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"stop": [""]}, "non-empty"),
    ({"stop": 3}, "a list of texts"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
])
def test_bad_settings_are_one_line_errors(values: dict, fragment: str) -> None:
    with pytest.raises(SamplingError, match=fragment) as info:
        sampling_from(values, where="here")
    assert "\n" not in str(info.value) and str(info.value).startswith("here: ")


def test_the_v2_fixture_keeps_its_settings_and_its_refused_empty_answer() -> None:
    raw = read_archive(Path(__file__).parent / "fixtures" / "sessions" / "sampling_v2_empty_answer.avro")
    events = [decode(b) for b in raw]
    state = fold(events)
    assert state.sampling == Sampling(temperature=0.2, max_output_tokens=256, stop=["###"], seed=7)
    assert [e.payload.rule for e in events if e.type == "GuardrailTripped"] == ["empty_answer"]
    assert (state.status, state.answer) == ("done", "4")


# ---------------------------------------------------------------- the CLI


def test_run_records_the_options_and_show_prints_them(tmp_path: Path) -> None:
    r = cli("run", "count to one", "--provider", "scripted", "--model", "adder:1", "--temperature", "0.4",
            "--max-output-tokens", "50", "--stop", "END", "--stop", "###", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with SQLiteLog(tmp_path / ".loopstream" / "loopstream.db") as log:
        (sid,) = [s.session_id for s in log.sessions()]
        p = log.read(sid)[0].payload
    assert (p.temperature, p.max_output_tokens, p.stop) == (0.4, 50, ["END", "###"])
    shown = cli("show", sid, cwd=tmp_path)
    assert "temp=0.4 max_out=50 stop='END'" in shown.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--temperature", "3"], "error: --temperature: Input should be less than or equal to 2"),
    (["--max-output-tokens", "0"], "error: --max-output-tokens:"),
    (["--stop", ""], "error: --stop: a stop sequence is a non-empty text"),
])
def test_run_rejects_bad_settings_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    r = cli("run", "x", "--provider", "scripted", *args, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith(message) and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / ".loopstream").exists()  # nothing was started


def test_run_help_shows_the_defaults(tmp_path: Path) -> None:
    r = cli("run", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    text = " ".join(r.stdout.replace("│", " ").split())  # whatever the layout wraps
    temperature, cap, stop = (text.index(f"{o} <") for o in ("--temperature", "--max-output-tokens", "--stop"))
    assert "[default: 0.0]" in text[temperature:cap] and "[default: 1024]" in text[cap:stop]
