"""Everything the command line prints goes through here, and nothing here reads markup.

Text from users, models and tools is hostile: `[/]` would be rich markup, `:smile:` an
emoji code, ESC a terminal control sequence, a lone surrogate an encoding error. So the
consoles are built with markup, emoji and highlighting off, every piece of text becomes a
`rich.text.Text` after `safe()`, and styles are attached to whole pieces (`Styled`), never
written inside a string. No other module of the CLI imports rich (tests/test_cli_hardening.py).
"""
from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from rich.console import Console
from rich.table import Table
from rich.text import Text

# C0 controls but tab and newline, DEL, C1 controls: shown as escapes, never sent raw.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class Styled(NamedTuple):
    """A piece of text printed in a style (a rich style name such as "dim" or "bold red")."""

    text: str
    style: str


Piece = str | Styled


def safe(text: object) -> str:
    """`text` as plain printable characters: controls become `\\x1b`-style escapes and lone
    surrogates (undecodable bytes) `\\udcff`-style ones."""
    s = text if isinstance(text, str) else str(text)
    if _CONTROL.search(s):
        s = _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), s)
    if _SURROGATE.search(s):
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _console(stream) -> Console:
    # Wide when piped (rich would wrap at 80 columns and break lines mid-payload).
    return Console(file=stream, width=None if stream.isatty() else 200, markup=False, emoji=False, highlight=False)


class _Out:
    """The two consoles, made on first use (after a test or a caller swapped the streams)."""

    def __init__(self) -> None:
        self._consoles: dict[int, tuple[object, Console]] = {}

    def console(self, err: bool) -> Console:
        stream = sys.stderr if err else sys.stdout
        known = self._consoles.get(err)
        if known is None or known[0] is not stream:
            known = self._consoles[err] = (stream, _console(stream))
        return known[1]


_OUT = _Out()


def text(*pieces: Piece) -> Text:
    """One line of `pieces` (plain strings and `Styled` ones), every character literal."""
    return Text.assemble(*[(safe(p.text), p.style) if isinstance(p, Styled) else safe(p) for p in pieces])


def line(*pieces: Piece, err: bool = False) -> None:
    """Print one line (never wrapped: a long line stays one line when piped)."""
    _OUT.console(err).print(text(*pieces), soft_wrap=True)


def note(*pieces: Piece) -> None:
    """A line for the person at the terminal (stderr): progress, hints, where things are."""
    line(*pieces, err=True)


def dim(message: str) -> None:
    note(Styled(message, "dim"))


def error(message: str, *, label: str = "error") -> None:
    note(Styled(f"{label}:", "bold red"), " ", message)


def warning(message: str) -> None:
    note(Styled("warning:", "bold yellow"), " ", message)


def answer(message: str) -> None:
    """The result of a command on stdout, as plain text (newlines and tabs kept)."""
    line(message)


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A table on stdout; every cell is literal text."""
    t = Table(*columns, box=None, header_style="bold")
    for row in rows:
        t.add_row(*[Text(safe(cell)) for cell in row])
    _OUT.console(False).print(t)
