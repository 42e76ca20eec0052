"""The log conformance suite against the embedded SQLite log (one file per test)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest

from loopstream.core.sqlite_log import SQLiteLog
from tests.log_conformance import LogConformance, Opener


class TestSQLiteLog(LogConformance):
    race_rounds = 200
    delivery_timeout = 5.0

    @pytest.fixture
    def opener(self, tmp_path: Path) -> Opener:
        return partial(SQLiteLog, tmp_path / "log.db")
