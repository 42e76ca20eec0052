"""One conformance suite for every `Log` backend (the contract in core/log.py).

A backend's test module subclasses `LogConformance` and provides the `opener` fixture: a
picklable callable with no arguments that opens a *new* handle on the *same* storage (so the
suite can close and reopen it, and hand it to other OS processes). Nothing here knows which
backend it runs against.
"""
from __future__ import annotations

import multiprocessing
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from loopstream.core.codec import REGISTRY, encode
from loopstream.core.events import (
    Event,
    GoalReceived,
    Payload,
    SessionCancelled,
    now_ms,
    random_id,
)
from loopstream.core.log import (
    ConcurrencyError,
    Delivery,
    DuplicateEvent,
    Log,
    Subscription,
)

Opener = Callable[[], Log]


# -- helpers ----------------------------------------------------------------------------
def event(session_id: str, seq: int, text: str | None = None, *, payload: Payload | None = None,
          event_id: str | None = None) -> Event:
    payload = payload or GoalReceived(text=text if text is not None else f"goal {seq}")
    return Event(
        event_id=event_id or random_id(), session_id=session_id, seq=seq, type=payload.TYPE,
        time=now_ms(), causation_id=None, correlation_id=session_id, actor="conformance",
        schema_version=REGISTRY.latest(payload.TYPE), payload=payload,
    )


def events(session_id: str, start: int, n: int) -> list[Event]:
    return [event(session_id, start + i) for i in range(n)]


def sid() -> str:
    return "s-" + uuid.uuid4().hex[:12]


def drain(sub: Subscription, count: int, timeout: float = 30.0) -> list[Delivery]:
    """Poll until `count` deliveries arrived (or the deadline), then assert nothing more comes."""
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += sub.poll(max_events=100, timeout=0.5)
    got += sub.poll(max_events=100, timeout=0.3)
    return got


def by_session(deliveries: Sequence[Delivery]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for d in deliveries:
        out[d.event.session_id].append(d.event.seq)
    return dict(out)


def _race_worker(opener: Opener, session_id: str, name: str, rounds: int, barrier: Any, results: Any) -> None:
    """Append `rounds` events to one session, retrying on conflict (runs in its own process)."""
    log = opener()
    won: list[str] = []
    conflicts = duplicates = 0
    try:
        barrier.wait(timeout=120)
        while len(won) < rounds:
            seq = log.next_seq(session_id)
            e = event(session_id, seq, f"{name} #{len(won)}")
            try:
                log.append(session_id, [e], seq)
            except DuplicateEvent:
                duplicates += 1
            except ConcurrencyError:
                conflicts += 1
            else:
                won.append(e.event_id)
        results.put((name, won, conflicts, duplicates, None))
    except BaseException as exc:  # report, don't hang the parent
        results.put((name, won, conflicts, duplicates, repr(exc)))
    finally:
        log.close()


# -- the suite ----------------------------------------------------------------------------
class LogConformance:
    #: appends per process in the two-process race (0 skips the test)
    race_rounds = 200
    #: how long a subscription may take to deliver what is already in the log
    delivery_timeout = 30.0

    def after_race(self, log: Log, session_id: str, conflicts: int) -> None:
        """Backend-specific checks after the two-process race (the log is open)."""

    @pytest.fixture
    def opener(self) -> Opener:
        raise NotImplementedError("a backend's test class provides `opener`")

    @pytest.fixture
    def log(self, opener: Opener) -> Iterator[Log]:
        log = opener()
        yield log
        log.close()

    # -- append / read -------------------------------------------------------------------
    def test_append_read_round_trip_bytes_identical_to_codec(self, log: Log) -> None:
        s = sid()
        batch = [event(s, 0, "first"), event(s, 1, payload=SessionCancelled(reason="user")),
                 event(s, 2, "ünïcødé ✓")]
        log.append(s, batch, 0)
        assert log.read_raw(s) == [encode(e) for e in batch]
        got = log.read(s)
        assert [encode(e) for e in got] == [encode(e) for e in batch]
        assert [e.model_dump() for e in got] == [e.model_dump() for e in batch]
        assert log.next_seq(s) == 3

    def test_read_from_any_seq_and_to_seq_inclusive(self, log: Log) -> None:
        s = sid()
        log.append(s, events(s, 0, 6), 0)
        for lo in range(8):
            assert [e.seq for e in log.read(s, lo)] == list(range(lo, 6))
        assert [e.seq for e in log.read(s, 2, 4)] == [2, 3, 4]
        assert [e.seq for e in log.read(s, 4, 4)] == [4]
        assert [e.seq for e in log.read(s, 0, 0)] == [0]
        assert log.read(s, 5, 2) == []
        assert [e.seq for e in log.read(s, 3, 100)] == [3, 4, 5]
        assert log.read_raw(s, 1, 2) == log.read_raw(s)[1:3]

    def test_seqs_are_gapless_across_appends_and_sessions(self, log: Log) -> None:
        a, b = sid(), sid()
        for start, n in [(0, 1), (1, 3), (4, 2)]:
            log.append(a, events(a, start, n), start)
            log.append(b, events(b, start, n), start)
        for s in (a, b):
            assert [e.seq for e in log.read(s)] == list(range(6))
            assert all(e.session_id == s for e in log.read(s))
            assert log.next_seq(s) == 6

    def test_malformed_batches_are_refused_before_writing(self, log: Log) -> None:
        s = sid()
        with pytest.raises(ValueError):
            log.append(s, [], 0)
        with pytest.raises(ValueError):
            log.append(s, [event(s, 0), event(s, 2)], 0)  # gap inside the batch
        with pytest.raises(ValueError):
            log.append(s, [event(s, 1)], 0)  # seq does not match expected_seq
        with pytest.raises(ValueError):
            log.append(s, [event(sid(), 0)], 0)  # another session's event
        with pytest.raises(ValueError):
            log.append(s, [event(s, 0, event_id="twice"), event(s, 1, event_id="twice")], 0)
        assert log.read(s) == [] and log.next_seq(s) == 0

    def test_batch_append_is_atomic(self, log: Log) -> None:
        s, other = sid(), sid()
        log.append(other, [event(other, 0, event_id="taken")], 0)
        log.append(s, events(s, 0, 2), 0)
        before = log.read_raw(s)
        # The third event reuses an id already in the log: none of the batch may land.
        batch = [event(s, 2), event(s, 3), event(s, 4, event_id="taken")]
        with pytest.raises(DuplicateEvent):
            log.append(s, batch, 2)
        assert log.read_raw(s) == before and log.next_seq(s) == 2
        # The same events with a fresh id land whole.
        batch[2] = event(s, 4)
        log.append(s, batch, 2)
        assert log.read_raw(s) == before + [encode(e) for e in batch]

    def test_expected_seq_conflict_raises_and_writes_nothing(self, log: Log) -> None:
        s = sid()
        log.append(s, events(s, 0, 2), 0)
        before, infos = log.read_raw(s), log.sessions()
        for expected in (0, 1, 3):  # behind, just behind, ahead
            with pytest.raises(ConcurrencyError) as info:
                log.append(s, events(s, expected, 2), expected)
            assert not isinstance(info.value, DuplicateEvent)
            assert (info.value.session_id, info.value.expected, info.value.actual) == (s, expected, 2)
        assert log.read_raw(s) == before
        assert log.next_seq(s) == 2
        assert log.sessions() == infos

    def test_duplicate_event_id_raises_and_writes_nothing(self, log: Log) -> None:
        s = sid()
        first = event(s, 0)
        log.append(s, [first], 0)
        before = log.read_raw(s)
        with pytest.raises(DuplicateEvent) as info:  # a retried handler writes the same fact
            log.append(s, [first], 0)
        assert info.value.event_id == first.event_id
        assert isinstance(info.value, ConcurrencyError)
        with pytest.raises(DuplicateEvent):  # same id at the right seq
            log.append(s, [event(s, 1, event_id=first.event_id)], 1)
        other = sid()
        with pytest.raises(DuplicateEvent):  # ids are unique across sessions
            log.append(other, [event(other, 0, event_id=first.event_id)], 0)
        assert log.read_raw(s) == before and log.next_seq(s) == 1
        assert log.read(other) == [] and log.next_seq(other) == 0

    def test_unknown_session_reads_empty(self, log: Log) -> None:
        s = sid()
        assert log.read(s) == [] and log.read_raw(s) == [] and log.read(s, 3, 9) == []
        assert log.next_seq(s) == 0
        assert s not in {i.session_id for i in log.sessions()}

    def test_sessions_listing(self, log: Log) -> None:
        a, b = sid(), sid()
        t0 = now_ms()
        log.append(a, events(a, 0, 3), 0)
        log.append(b, [event(b, 0)], 0)
        log.append(b, [event(b, 1, payload=SessionCancelled(reason="stop"))], 1)
        infos = {i.session_id: i for i in log.sessions()}
        assert infos[a].next_seq == 3 and infos[a].last_type == "GoalReceived"
        assert infos[b].next_seq == 2 and infos[b].last_type == "SessionCancelled"
        for i in (infos[a], infos[b]):
            assert t0 - 5_000 <= i.created_ms <= i.updated_ms <= now_ms() + 5_000
        created = [i.created_ms for i in log.sessions()]
        assert created == sorted(created)  # oldest first

    def test_reopen_keeps_everything(self, opener: Opener) -> None:
        s = sid()
        log = opener()
        log.append(s, events(s, 0, 3), 0)
        raw, infos = log.read_raw(s), log.sessions()
        log.close()
        log = opener()
        try:
            assert log.read_raw(s) == raw
            assert log.next_seq(s) == 3
            assert [i for i in log.sessions() if i.session_id == s] == [i for i in infos if i.session_id == s]
            log.append(s, events(s, 3, 1), 3)
            assert [e.seq for e in log.read(s)] == [0, 1, 2, 3]
        finally:
            log.close()

    # -- subscriptions ---------------------------------------------------------------------
    def test_subscription_gets_all_sessions_in_per_session_order(self, log: Log) -> None:
        ss = [sid() for _ in range(3)]
        for k in range(4):  # interleave sessions, with batches of 1 and 2
            for i, s in enumerate(ss):
                n = 1 + (k + i) % 2
                start = log.next_seq(s)
                log.append(s, events(s, start, n), start)
        total = {s: log.next_seq(s) for s in ss}
        sub = log.subscribe("g-" + uuid.uuid4().hex[:8])
        try:
            got = drain(sub, sum(total.values()), self.delivery_timeout)
            assert by_session(got) == {s: list(range(n)) for s, n in total.items()}
            for s in ss:  # the delivered events are the stored ones, byte for byte
                assert [encode(d.event) for d in got if d.event.session_id == s] == log.read_raw(s)
            # Events appended while subscribed arrive too, in order.
            for s in ss:
                start = log.next_seq(s)
                log.append(s, events(s, start, 2), start)
            more = drain(sub, 2 * len(ss), self.delivery_timeout)
            assert by_session(more) == {s: [total[s], total[s] + 1] for s in ss}
            t = time.monotonic()
            assert sub.poll(timeout=0.2) == []
            assert time.monotonic() - t < 5
        finally:
            sub.close()

    def test_group_resumes_after_commit_across_reopen(self, opener: Opener) -> None:
        group = "g-" + uuid.uuid4().hex[:8]
        a, b = sid(), sid()
        log = opener()
        try:
            log.append(a, events(a, 0, 3), 0)
            log.append(b, events(b, 0, 2), 0)
            # Nothing committed: a new member of the group gets everything again.
            sub = log.subscribe(group)
            first = drain(sub, 5, self.delivery_timeout)
            assert by_session(first) == {a: [0, 1, 2], b: [0, 1]}
            sub.close()
            sub = log.subscribe(group)
            again = drain(sub, 5, self.delivery_timeout)
            assert by_session(again) == {a: [0, 1, 2], b: [0, 1]}
            for d in again:  # handle, then commit (at-least-once)
                sub.commit(d)
            sub.close()
        finally:
            log.close()
        log = opener()  # a restart: new process state, same storage
        try:
            c = sid()
            log.append(a, events(a, 3, 1), 3)
            log.append(c, events(c, 0, 1), 0)
            sub = log.subscribe(group)
            rest = drain(sub, 2, self.delivery_timeout)
            assert by_session(rest) == {a: [3], c: [0]}
            sub.close()
        finally:
            log.close()

    def test_two_groups_each_get_everything(self, log: Log) -> None:
        a, b = sid(), sid()
        log.append(a, events(a, 0, 2), 0)
        log.append(b, events(b, 0, 3), 0)
        subs = [log.subscribe("g1-" + uuid.uuid4().hex[:8]), log.subscribe("g2-" + uuid.uuid4().hex[:8])]
        try:
            got: list[list[Delivery]] = [[], []]
            deadline = time.monotonic() + self.delivery_timeout
            while min(len(g) for g in got) < 5 and time.monotonic() < deadline:
                for i, sub in enumerate(subs):  # both groups join concurrently
                    got[i] += sub.poll(timeout=0.2)
            for i, sub in enumerate(subs):
                got[i] += sub.poll(timeout=0.2)
                assert by_session(got[i]) == {a: [0, 1], b: [0, 1, 2]}
                for d in got[i]:
                    sub.commit(d)
        finally:
            for sub in subs:
                sub.close()

    # -- several OS processes ------------------------------------------------------------------
    def test_two_processes_race_on_one_session(self, opener: Opener) -> None:
        if not self.race_rounds:
            pytest.skip("race disabled for this backend")
        s, rounds = sid(), self.race_rounds
        log = opener()  # create the storage before the race starts
        log.close()
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race_worker, args=(opener, s, name, rounds, barrier, results))
                 for name in ("p1", "p2")]
        for p in procs:
            p.start()
        try:
            reports = [results.get(timeout=300) for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        errors = [r[4] for r in reports if r[4]]
        assert not errors, errors
        assert all(r[3] == 0 for r in reports), "random ids can never be duplicates"
        won = {eid for r in reports for eid in r[1]}
        assert len(won) == 2 * rounds
        log = opener()
        try:
            stored = log.read(s)
            assert [e.seq for e in stored] == list(range(2 * rounds))  # exact and gapless
            assert {e.event_id for e in stored} == won  # every win is there, no loser is
            assert log.next_seq(s) == 2 * rounds
            print(f"race: {[(r[0], r[2]) for r in reports]} conflicts (process, count)")
            self.after_race(log, s, sum(r[2] for r in reports))
        finally:
            log.close()
