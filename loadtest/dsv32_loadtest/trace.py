"""Trace files in the shape of the public Mooncake traces (JSONL, one request a line).

Each line is a JSON object::

    {"timestamp": 27482, "input_length": 6955, "output_length": 52,
     "hash_ids": [46, 47, 48, 2366], "session_id": "c-17"}

``timestamp`` is in milliseconds; ``hash_ids`` name the prompt's consecutive
prefix blocks (Mooncake: 512 tokens each), equal ids meaning equal content;
``session_id`` is optional (a string or an integer). Blank lines are skipped;
anything else that is wrong stops the parse with the file name and line number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


class TraceError(ValueError):
    """A malformed trace; the message names the file and line."""


@dataclass(frozen=True)
class TraceEntry:
    line: int
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = field(default=())
    session_id: str = ""


def _positive_int(obj: dict, key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise TraceError(f"{where}: {key!r} must be a positive integer, got {v!r}")
    return v


def parse_line(text: str, line: int, name: str = "<trace>") -> TraceEntry:
    """One trace line; errors say ``name:line: what is wrong``."""
    where = f"{name}:{line}"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    ts = obj.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise TraceError(f"{where}: 'timestamp' must be a non-negative number of milliseconds, got {ts!r}")
    hash_ids = obj.get("hash_ids", [])
    if not isinstance(hash_ids, list) or any(
            isinstance(h, bool) or not isinstance(h, int) or h < 0 for h in hash_ids):
        raise TraceError(f"{where}: 'hash_ids' must be a list of non-negative integers")
    session = obj.get("session_id", "")
    if session is None or isinstance(session, bool) or not isinstance(session, (str, int)):
        raise TraceError(f"{where}: 'session_id' must be a string or an integer, got {session!r}")
    return TraceEntry(line, float(ts), _positive_int(obj, "input_length", where),
                      _positive_int(obj, "output_length", where), tuple(hash_ids), str(session))


def read_trace(path: str | Path, limit: int | None = None) -> list[TraceEntry]:
    """The first ``limit`` entries of the trace, in file order."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    entries: list[TraceEntry] = []
    with f:
        for no, text in enumerate(f, start=1):
            if limit is not None and len(entries) >= limit:
                break
            if text.strip():
                entries.append(parse_line(text, no, str(path)))
    if not entries:
        raise TraceError(f"{path}: the trace holds no request")
    return entries
