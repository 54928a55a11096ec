"""CSV and TSV read as a stream, where a broken quote costs one line, never the rows after it.

A stray ``"`` at the start of a field opens a quoted field that swallows every following line until the next
quote, so one typo can turn hundreds of rows into one. Python's csv module in strict mode stops at most such
records (a quote not followed by a delimiter, end of data inside quotes); a record that spans several lines and
has the wrong number of fields is treated the same. Either way the *line where the quote opens* is rejected
(``malformed_row``, naming that line), and reading resumes on the next physical line. A record may span at most
:data:`MAX_RECORD_LINES` lines and :data:`MAX_RECORD_BYTES` bytes, so recovery is bounded too.
"""

from __future__ import annotations

import csv
import io
import json
from collections import deque
from collections.abc import Iterator
from typing import Any

from preftune.data.textio import MAX_LINE_BYTES, TextFormatError

#: Longest record (a row whose quoted cells hold line breaks): physical lines, and bytes.
MAX_RECORD_LINES = 10_000
MAX_RECORD_BYTES = 16 << 20


class _RecordTooLong(Exception):
    """The record being read outgrew the bounds: a quote that never closes."""


class _Lines:
    """Decoded physical lines for csv.reader, remembering the lines of the record being read so that the lines
    after a broken quote can be read again."""

    def __init__(self, stream: io.BufferedIOBase) -> None:
        self.stream = stream
        self.read = 0
        self.pending: deque[tuple[int, str]] = deque()
        self.record: list[tuple[int, str]] = []
        self.record_bytes = 0

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pending:
            number, line = self.pending.popleft()
        else:
            raw = self.stream.readline(MAX_LINE_BYTES + 1)
            if not raw:
                raise StopIteration
            self.read += 1
            number = self.read
            if len(raw) > MAX_LINE_BYTES:
                raise TextFormatError(f"line longer than {MAX_LINE_BYTES >> 20} MiB", number)
            line = raw.decode("utf-8", "surrogateescape")
        self.record.append((number, line))
        self.record_bytes += len(line)
        if len(self.record) > MAX_RECORD_LINES or self.record_bytes > MAX_RECORD_BYTES:
            raise _RecordTooLong(f"a quoted field runs over more than {len(self.record) - 1} lines")
        return line

    def start_record(self) -> None:
        self.record = []
        self.record_bytes = 0

    def replay_after_first(self) -> int:
        """Read the broken record's lines again from its second line; returns its first line's number."""
        first = self.record[0][0] if self.record else self.read
        self.pending.extendleft(reversed(self.record[1:]))
        self.start_record()
        return first


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def maybe_messages(cell: str) -> Any:
    """A cell holding a JSON list of chat messages becomes that list; any other text stays text."""
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]") and '"role"' in text):
        return cell
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return cell
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    return cell


def _header(reader: Any) -> list[str]:
    try:
        header = next(reader, None)
    except (csv.Error, _RecordTooLong) as exc:
        raise TextFormatError(f"unreadable CSV header ({exc})") from exc
    if not header or not any(h.strip() for h in header):
        raise TextFormatError("empty file or missing header row")
    header = [h.strip() for h in header]
    if any(_has_surrogates(h) for h in header):
        raise TextFormatError("header row is not valid UTF-8")
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates or "" in header:
        raise TextFormatError(f"header has duplicate or empty column names: {duplicates or ['']}")
    return header


Record = tuple[dict[str, Any] | None, str, str, str]


def records(stream: io.BufferedIOBase, delimiter: str) -> Iterator[Record]:
    """``(record, reason, detail, raw)`` per data row in order: a record of text cells (JSON chat-message lists
    parsed) with empty reason, or None with a rejection reason, what was wrong and the row's text."""
    csv.field_size_limit(MAX_RECORD_BYTES)
    lines = _Lines(stream)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    header = _header(reader)
    while True:
        lines.start_record()
        try:
            cells = next(reader)
        except StopIteration:
            return
        except (csv.Error, _RecordTooLong) as exc:
            yield _broken_quote(lines, str(exc))
            reader = csv.reader(lines, delimiter=delimiter, strict=True)
            continue
        if not cells:
            continue
        if len(lines.record) > 1 and len(cells) != len(header):
            yield _broken_quote(
                lines, f"the record spans {len(lines.record)} lines and has {len(cells)} fields"
            )
            reader = csv.reader(lines, delimiter=delimiter, strict=True)
            continue
        raw = delimiter.join(cells)
        if any(_has_surrogates(c) for c in cells):
            text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            yield None, "invalid_utf8", "not valid UTF-8", text
        elif len(cells) != len(header):
            yield None, "malformed_row", f"expected {len(header)} fields, got {len(cells)}", raw
        else:
            yield {h: maybe_messages(c) for h, c in zip(header, cells, strict=True)}, "", "", ""


def _broken_quote(lines: _Lines, problem: str) -> Record:
    text = lines.record[0][1] if lines.record else ""
    first = lines.replay_after_first()
    detail = (
        f"line {first}: a quoted field opens on this line and does not close properly ({problem}); "
        f"line {first} is rejected and reading resumes on line {first + 1}"
    )
    raw = text.rstrip("\r\n").encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None, "malformed_row", detail, raw
