"""`loopstream feedback SESSION --score … --comment …`: a person's judgement of an ended
session, recorded as a FeedbackGiven event through the session writer (legal only once the
session ended: core/fsm.py `ANNOTATIONS`)."""
from __future__ import annotations

import math
import re

from loopstream.core import events as ev
from loopstream.core.log import Log
from loopstream.runtime.writer import SessionWriter, Written


class FeedbackError(ValueError):
    """Feedback that cannot be recorded (one line: which session, why)."""


def give_feedback(log: Log, session_id: str, by: str, score: float | None = None, comment: str = "") -> Written:
    """Record `by`'s score and/or comment on the ended session `session_id`."""
    if score is None and not comment.strip():
        raise FeedbackError("feedback needs a --score or a --comment")
    if score is not None and not math.isfinite(score):
        raise FeedbackError(f"--score must be a finite number, not {score}")
    comment = re.sub("[\ud800-\udfff]", "\ufffd", comment)  # a lone surrogate (argv's undecodable bytes)
    writer = SessionWriter(log)
    state = writer.load(session_id)
    if not state.terminal:
        raise FeedbackError(f"session {session_id} is {str(state.status).replace('_', ' ')}: "
                            "feedback is for a session that has ended")
    return writer.record(session_id, [ev.FeedbackGiven(by=by, score=score, comment=comment)], f"person:{by}")
