"""The per-session hash chain, verified over the bytes the log stores.

Each event carries `chain_hash` as the last field of its envelope (schemas/envelope.avsc):

    h_0 = sha256(b"loopstream-chain-v1" + body_0)
    h_n = sha256(h_(n-1) + body_n)

where body_n is the event's stored bytes before that field: a chained event's bytes are
`body + b"\\x02" + h_n` (Avro union branch 1, then the 32-byte fixed), so verifying needs
no decoding at all: recompute each link from the bytes and compare with the stored one.
`codec.seal` sets the hashes as the runtime builds events, so the chain travels with the
events themselves and reads the same from SQLite and from Kafka.

What it proves: every stored byte of every event (including the last) is what the writer
wrote, in that order, with nothing inserted or removed in between. Changing one event's
bytes breaks its own link, so the first bad seq is exactly the event that was changed.
What it cannot prove on its own: that nobody rewrote the whole suffix and recomputed the
hashes (sha256 has no secret), or cut events off the end. `verify` checks the end against
the log's own next seq; pin `ChainReport.head` somewhere else to detect a rewrite.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from loopstream.core.codec import CHAIN_GENESIS, CodecError, chain_link, decode
from loopstream.core.log import Log, SessionNotFound

_TRAILER = 33  # b"\x02" + 32-byte sha256
_sha256 = hashlib.sha256


@dataclass(frozen=True)
class ChainReport:
    """The outcome of verifying one session's chain (or a prefix of it, up to `to_seq`)."""

    session_id: str
    status: str  # "ok" | "broken" | "unchained" (written before chaining: nothing to verify) | "empty"
    checked: int  # events examined
    first_bad_seq: int | None = None
    reason: str = ""
    head: str = ""  # hex chain hash of the last good event

    @property
    def ok(self) -> bool:
        """True unless something is wrong; an unchained (pre-chain) session is not an error."""
        return self.status != "broken"

    def describe(self) -> str:
        if self.status == "ok":
            return f"chain ok: {self.checked} events, head {self.head[:16]}"
        if self.status == "unchained":
            return (f"chain absent: {self.checked} events written before hash chaining "
                    "(decoded, nothing to verify)")
        if self.status == "empty":
            return "chain: no events"
        return f"chain BROKEN at seq {self.first_bad_seq}: {self.reason}"


def chain_hashes(raw: Sequence[bytes]) -> list[bytes]:
    """The chain hash of every event recomputed from its bytes, chained or not (for
    provenance: a fork records its parent event's hash even for a pre-chain session,
    where the hash covers the whole stored bytes)."""
    if not raw:
        return []
    chained = decode(raw[0]).chain_hash is not None
    out: list[bytes] = []
    prev: bytes | None = None
    for data in raw:
        prev = chain_link(prev, data[:-_TRAILER] if chained else data)
        out.append(prev)
    return out


def verify_raw(raw: Sequence[bytes], session_id: str = "", start_seq: int = 0) -> ChainReport:
    """Verify the chain over stored event bytes `raw` (seqs start_seq, start_seq+1, …).

    `start_seq` must be 0: a link can only be checked from the genesis (or from a trusted
    hash, see `verify_from`)."""
    if not raw:
        return ChainReport(session_id, "empty", 0)
    try:
        first = decode(raw[0])
    except CodecError as exc:
        return ChainReport(session_id, "broken", 1, start_seq, f"not a readable event: {exc}")
    if first.chain_hash is None:
        return _verify_unchained(raw, session_id, start_seq)
    return verify_from(raw, None, session_id, start_seq)


def verify_from(raw: Sequence[bytes], prev: bytes | None, session_id: str = "", start_seq: int = 0) -> ChainReport:
    """Verify a chained run of events whose predecessor's hash is `prev` (None: genesis)."""
    h = CHAIN_GENESIS if prev is None else prev
    sha = _sha256
    for i, data in enumerate(raw):
        if not data:
            return ChainReport(session_id, "broken", i + 1, start_seq + i, "the stored event is empty (no bytes)",
                               h.hex() if i else "")
        if len(data) <= _TRAILER or data[-_TRAILER] != 2:
            return ChainReport(session_id, "broken", i + 1, start_seq + i,
                               "the event carries no chain hash (stripped, or written outside the runtime)",
                               h.hex() if i else "")
        link = sha(h + data[:-_TRAILER]).digest()
        if link != data[-32:]:
            return ChainReport(session_id, "broken", i + 1, start_seq + i,
                               "the stored bytes do not hash to the chain (the event was changed, "
                               "reordered or inserted)", h.hex() if i else "")
        h = link
    return ChainReport(session_id, "ok", len(raw), head=h.hex())


def _verify_unchained(raw: Sequence[bytes], session_id: str, start_seq: int) -> ChainReport:
    # A session written before chaining: every event must decode and none may carry a
    # hash (a hash after an unchained start means events were spliced in).
    for i, data in enumerate(raw):
        try:
            event = decode(data)
        except CodecError as exc:
            return ChainReport(session_id, "broken", i + 1, start_seq + i, f"not a readable event: {exc}")
        if event.chain_hash is not None:
            return ChainReport(session_id, "broken", i + 1, start_seq + i,
                               "a chained event inside a session that starts unchained")
        if event.seq != start_seq + i:
            return ChainReport(session_id, "broken", i + 1, start_seq + i,
                               f"stored seq {event.seq} where seq {start_seq + i} belongs")
    return ChainReport(session_id, "unchained", len(raw), head=chain_hashes(raw)[-1].hex())


def verify(log: Log, session_id: str, to_seq: int | None = None) -> ChainReport:
    """Verify a session's chain as stored in `log` (up to `to_seq`, inclusive)."""
    raw = log.read_raw(session_id, 0, to_seq)
    if not raw:
        raise SessionNotFound(session_id)
    report = verify_raw(raw, session_id)
    return check_complete(log, session_id, report, len(raw), to_seq)


def check_complete(log: Log, session_id: str, report: ChainReport, n: int, to_seq: int | None) -> ChainReport:
    """Events missing at the end cannot show in the chain; the log's own next seq can."""
    if not report.ok:
        return report
    expected = log.next_seq(session_id) if to_seq is None else min(to_seq + 1, log.next_seq(session_id))
    if n < expected:
        return ChainReport(session_id, "broken", n, n,
                           f"the log says the session has {expected} events but only {n} are stored",
                           report.head)
    return report
