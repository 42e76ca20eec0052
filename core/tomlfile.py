"""Reading a TOML file a person wrote (a policy, a project file, an eval suite, Kafka settings):
bounded, UTF-8, and every problem one line that names the file."""
from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_toml(path: Path, label: str, max_bytes: int, error: Callable[[str], Exception]) -> dict[str, Any]:
    """The file's TOML as a dict; else `error(message)` raised, the message naming `label` (e.g.
    "policy file p.toml"): missing or not a regular file, unreadable, over `max_bytes`, not
    UTF-8 (with the line and byte), or not valid TOML."""
    try:
        if not path.is_file():
            raise error(f"{label}: {'not a regular file' if path.exists() else 'no such file'}")
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {label}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise error(f"{label}: larger than {max_bytes} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{label}: not UTF-8 text (line {line}, byte {exc.start}: "
                    f"{data[exc.start:exc.start + 1]!r})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{label}: not valid TOML: {exc}") from None
