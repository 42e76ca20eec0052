"""loopstream.replay: replay, verify, fork, diff and check sessions from their event log.

    from loopstream.replay import replay, verify, fork, diff, check_determinism

    report = replay(log, session_id, to_seq=None)   # decode + fold + chain check; no model/tool call
    print(render(report))
    verify(log, session_id)                         # ChainReport: ok / broken at seq N / unchained
    child = fork(log, session_id, at_seq, model="other", message="try again", reason="why")
    runtime.run_session(child.child_session_id)     # the child continues live
    print(render_diff(diff(log, session_id, child.child_session_id)))
    print(check_determinism(log, session_id).render())

See docs/replay.md for a walkthrough.
"""
from loopstream.replay.archive import export_session, read_archive, write_archive
from loopstream.replay.chain import ChainReport, chain_hashes, verify, verify_raw
from loopstream.replay.determinism import (
    DeterminismReport,
    Divergence,
    check_determinism,
    check_raw,
)
from loopstream.replay.diff import DiffReport, diff, diff_reports
from loopstream.replay.diff import render as render_diff
from loopstream.replay.fork import (
    ForkError,
    ForkNeedsAcknowledgement,
    ForkResult,
    SideEffect,
    fork,
    side_effects_after,
)
from loopstream.replay.replayer import ReplayReport, render, replay, replay_raw

__all__ = [
    "ChainReport", "DeterminismReport", "DiffReport", "Divergence", "ForkError", "ForkNeedsAcknowledgement",
    "ForkResult", "ReplayReport", "SideEffect", "chain_hashes", "check_determinism", "check_raw", "diff",
    "diff_reports", "export_session", "fork", "read_archive", "render", "render_diff", "replay", "replay_raw",
    "side_effects_after", "verify", "verify_raw", "write_archive",
]
