"""Read tabular training data (JSONL / JSON / CSV / TSV / parquet, local or s3) into raw rows, as a stream.

Files are never read whole: text is decompressed and split as it arrives (:mod:`textio`, with bounds against
compression bombs and endless lines), parquet is read in record batches (:mod:`arrowrows`). Memory follows one
row or one batch, whatever the file's size.

Error policy -- every input row is accounted for, and bad input never ends in a bare traceback:

* A problem confined to one row is *isolable*. With ``on_error="reject"`` (the importers' default) it comes back
  as a :class:`RawRow` with ``error`` set so the importer can reject that row with a reason and go on:
  ``invalid_json`` (also nesting deeper than 64 levels), ``invalid_utf8``, ``not_an_object``, ``duplicate_key``,
  ``malformed_row`` (a CSV row with the wrong number of fields, or the line where a broken quote opens), and
  ``invalid:<field>`` for a value no output can hold (an integer over Python's 4,300 digits, a lone surrogate, a
  parquet timestamp outside Python's range). With ``on_error="raise"`` it raises :class:`DataFormatError`
  naming the file and line.
* A problem with the whole file always raises :class:`DataFormatError` naming the file (and the line when there
  is one): unreadable parquet, a file that is not the format its extension claims, UTF-16 text, a broken CSV
  header, a ``.json`` array that does not parse, a compression bomb, a line over 64 MiB, or a JSONL file whose
  first :data:`PROBE_LINES` non-blank lines are all unreadable (nothing isolable: the file as a whole is wrong).

Row numbers are 1-based: the physical line in JSONL, the data row (header excluded) in CSV/parquet, the element
in a ``.json`` array. Blank JSONL lines are not rows and are skipped (line numbers stay physical).
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from preftune.data import arrowrows, csvrows, jsonrows, textio
from preftune.data.jsonrows import Problem
from preftune.io import storage

log = logging.getLogger(__name__)

OnError = Literal["reject", "raise"]

#: File suffixes we read (a trailing ``.gz`` is also accepted for the text formats).
SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
#: Unreadable lines a JSONL file may start with before it is refused as not JSONL at all.
PROBE_LINES = 1000

_kind = jsonrows.kind


class DataFormatError(ValueError):
    """Bad input data, located as precisely as we can: ``file``, 1-based ``row`` (or None) and ``field`` (or None).

    ``str()`` reads like ``"prefs.jsonl, line 12, field 'chosen': expected text or chat messages, got int"``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str,
        row: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.file = file
        self.row = row
        self.field = field
        self.message = message
        #: The rejection reason this problem maps to when the row is rejected rather than raised.
        self.reason = reason
        location = [file]
        if row is not None:
            location.append(f"{row_label(file)} {row}")
        if field is not None:
            location.append(f"field {field!r}")
        super().__init__(f"{', '.join(location)}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        """Rebuilt from its parts when it crosses a process boundary (a parallel import's worker)."""
        return (_rebuild, (type(self), self.message, self.file, self.row, self.field, self.reason))


def _rebuild(
    cls: type[DataFormatError],
    message: str,
    file: str,
    row: int | None,
    field: str | None,
    reason: str | None,
) -> DataFormatError:
    return DataFormatError(message, file=file, row=row, field=field, reason=reason)


def row_label(file: str) -> str:
    """How rows of ``file`` are counted in messages: JSONL lines, JSON array items, CSV/parquet rows."""
    name = file.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")) or "." not in PurePosixPath(name).name:
        return "line"
    if name.endswith(".json"):
        return "item"
    return "row"


@dataclass(slots=True)
class RawRow:
    """One input row as read: where it came from, and either its ``record`` or why it could not be read.

    ``error`` is None for a readable row; otherwise a rejection reason (see the module docstring), ``detail``
    says what was wrong. ``raw`` holds the row's text: always for an unreadable row, and for a JSON Lines row
    (its record's JSON as written), so a row rejected later needs no second read of its file.
    """

    file: str
    row: int
    record: dict[str, Any] | None
    error: str | None = None
    detail: str | None = None
    raw: str | None = field(default=None, repr=False, compare=False)


def suffix_of(name: str) -> str:
    """The format suffix of a file name, ignoring a trailing ``.gz`` ('' if unsupported)."""
    lowered = name.lower()
    gz = lowered.endswith(".gz")
    if gz:
        lowered = lowered[: -len(".gz")]
    for suffix in SUPPORTED_SUFFIXES:
        if lowered.endswith(suffix) and not (gz and suffix == ".parquet"):
            return suffix
    return ""


def hidden(relative: str) -> bool:
    """Hidden or bookkeeping files (``.crc``, ``_SUCCESS``, ``.ipynb_checkpoints``) written next to data."""
    return any(part.startswith((".", "_")) for part in PurePosixPath(relative).parts)


def unsupported(name: str) -> DataFormatError:
    return DataFormatError(
        f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)", file=name
    )


def data_files(uri: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The data files under ``uri`` as sorted ``(file_uri, display_name)`` pairs, plus skipped file names.

    The display name is the path relative to ``uri`` (a single file's own name): stable wherever the data is
    stored, and unambiguous within one source. Hidden or bookkeeping files (a path part starting with ``.`` or
    ``_``: ``_SUCCESS``, ``.ipynb_checkpoints/``) and files of unsupported types are not read; they are returned
    as skipped (and logged) so the caller can report them. A single file of an unsupported type is an error, as
    is a directory with no data files.
    """
    files = storage.list_files(uri)
    s3_uri = "s3://{}/{}".format(*storage.split_s3(uri)).rstrip("/") if storage.is_s3(uri) else ""
    single = files == [s3_uri] if s3_uri else storage.local_path(uri).is_file()
    if single:
        name = PurePosixPath(files[0].split("://", 1)[-1]).name
        if not suffix_of(name) and "." in name:
            raise unsupported(name)
        return [(files[0], name)], []
    base = s3_uri or str(storage.local_path(uri)).rstrip("/")
    chosen: list[tuple[str, str]] = []
    skipped: list[str] = []
    for file_uri in files:
        relative = (
            file_uri[len(base) + 1 :] if file_uri.startswith(base + "/") else PurePosixPath(file_uri).name
        )
        if suffix_of(relative) and not hidden(relative):
            chosen.append((file_uri, relative))
        else:
            skipped.append(relative)
    if skipped:
        log.warning(
            "not reading %d hidden or unsupported file(s) under %s: %s", len(skipped), uri, ", ".join(skipped)
        )
    if not chosen:
        raise DataFormatError(
            f"no data files found (expected {', '.join(SUPPORTED_SUFFIXES)}); skipped: {skipped or 'none'}",
            file=uri,
        )
    return chosen, skipped


# ---------------------------------------------------------------------------------------------- formats


def problem_row(name: str, number: int, problem: Problem, raw: str | None) -> RawRow:
    """An unreadable row as the importers take it (``on_error="reject"``): its reason, detail and text."""
    return RawRow(name, number, None, problem.reason, problem.detail, raw)


def _problem_row(name: str, number: int, problem: Problem, raw: str | None, on_error: OnError) -> RawRow:
    if on_error == "raise":
        raise DataFormatError(
            problem.detail, file=name, row=number, field=problem.field, reason=problem.reason
        )
    return problem_row(name, number, problem, raw)


def jsonl_rows(
    numbered: Iterable[tuple[int, bytes]],
    name: str,
    on_error: OnError = "raise",
    wanted: Collection[int] = (),
) -> Iterator[RawRow]:
    """Rows of numbered JSONL lines. Unreadable lines before the first good one are held back (at most
    :data:`PROBE_LINES`) until a good line proves the file is JSONL at all. ``wanted``: parse only these rows
    (a second read for rows already known to be readable)."""
    pending: list[RawRow] = []
    seen_good = bool(wanted)
    for number, line in numbered:
        if wanted and number not in wanted:
            continue
        if not line.strip():
            continue
        record, problem, text = jsonrows.parse_object(line)
        if problem is not None:
            bad = _problem_row(name, number, problem, text[:100_000], on_error)
            if seen_good:
                yield bad
                continue
            pending.append(bad)
            if len(pending) >= PROBE_LINES:
                break
            continue
        if not seen_good:
            seen_good = True
            yield from pending
            pending.clear()
        yield RawRow(name, number, record, raw=text)
    if pending:
        first = pending[0]
        raise DataFormatError(
            f"no line of this file is a JSON object, so it is not JSONL; first problem: {first.detail}",
            file=name,
            row=first.row,
        )


def parse_jsonl(data: bytes, name: str, on_error: OnError = "raise") -> Iterator[RawRow]:
    """Rows of JSONL bytes already in memory (see :func:`jsonl_rows`)."""
    return jsonl_rows(enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1), name, on_error)


def _json_rows(stream: Any, name: str, on_error: OnError, wanted: Collection[int]) -> Iterator[RawRow]:
    """A ``.json`` file: a JSON array of objects, or (as many tools write) JSON Lines under a .json name."""
    head = stream.peek(64)[:64].lstrip()
    if not head.startswith(b"["):
        yield from jsonl_rows(textio.lines(stream), name, on_error, wanted)
        return
    data = textio.read_document(stream)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x}) on line {line}", file=name
        ) from exc
    try:
        items = jsonrows.parse_array(text)
    except ValueError as exc:
        raise DataFormatError(str(exc), file=name) from exc
    del data, text
    for number, (value, problem) in enumerate(items, start=1):
        if wanted and number not in wanted:
            continue
        if problem is None and not isinstance(value, dict):
            problem = Problem("not_an_object", f"expected a JSON object, got {_kind(value)}")
        if problem is None:
            yield RawRow(name, number, value)
            continue
        raw = value if problem.reason == "not_an_object" else None
        yield _problem_row(name, number, problem, _preview(raw), on_error)


def _preview(value: Any) -> str | None:
    import json

    if value is None:
        return None
    try:
        return json.dumps(value, ensure_ascii=False)[:10000]
    except (TypeError, ValueError):
        return str(value)[:10000]


def _csv_rows(stream: Any, name: str, on_error: OnError, delimiter: str) -> Iterator[RawRow]:
    """CSV/TSV with a header row; every cell is text (empty cells stay empty strings, never NaN); cells holding a
    JSON list of chat messages become that list (:mod:`csvrows`)."""
    for number, (record, reason, detail, raw) in enumerate(csvrows.records(stream, delimiter), start=1):
        if record is not None:
            yield RawRow(name, number, record)
        else:
            yield _problem_row(name, number, Problem(reason, detail), raw, on_error)


def _wanted_between(wanted: Collection[int], first: int, last: int) -> Iterable[int]:
    """The wanted row numbers from ``first`` to ``last``: looked up in a sorted set (``between``) when it has
    one, instead of asking about every row of the batch."""
    between = getattr(wanted, "between", None)
    if between is not None:
        return between(first, last)  # type: ignore[no-any-return]
    return (n for n in range(first, last + 1) if n in wanted)


def arrow_rows(
    batches: Iterable[Any], name: str, on_error: OnError, wanted: Collection[int] = ()
) -> Iterator[RawRow]:
    """Rows of Arrow record batches (nested lists/structs become lists/dicts), numbered from 1."""
    number = 0
    for batch in batches:
        first, number = number, number + batch.num_rows
        picked = list(range(batch.num_rows))
        if wanted:  # a second read: only the wanted rows of the batch are converted
            picked = [n - first - 1 for n in _wanted_between(wanted, first + 1, number)]
            if not picked:
                continue
            batch = batch.take(picked)
        for at, (record, problem) in zip(picked, arrowrows.batch_records(batch), strict=True):
            if problem is None:
                yield RawRow(name, first + at + 1, record)
            else:
                yield _problem_row(name, first + at + 1, problem, None, on_error)


def _stream_rows(
    file_uri: str, name: str, suffix: str, on_error: OnError, wanted: Collection[int]
) -> Iterator[RawRow]:
    with textio.open_text(file_uri, name, suffix) as stream:
        if suffix in (".jsonl", ".ndjson"):
            yield from jsonl_rows(textio.lines(stream), name, on_error, wanted)
        elif suffix == ".json":
            yield from _json_rows(stream, name, on_error, wanted)
        else:
            rows = _csv_rows(stream, name, on_error, "\t" if suffix == ".tsv" else ",")
            yield from (r for r in rows if not wanted or r.row in wanted)


def _sniff(file_uri: str) -> str:
    """An extension-less file (a KFP artifact path): parquet if it starts with the magic bytes, else JSONL."""
    with storage.open_input(file_uri) as stream:
        return ".parquet" if stream.peek(4)[:4] == textio.PARQUET_MAGIC else ".jsonl"


def read_file(
    file_uri: str, name: str | None = None, on_error: OnError = "reject", wanted: Collection[int] = ()
) -> Iterator[RawRow]:
    """The rows of one data file, streamed; ``name`` is how the file is named in rows and errors (default: its
    name). ``wanted`` limits the rows parsed and returned to those row numbers (a second, cheaper read).

    A file whose name has no extension at all (a KFP artifact path such as ``.../train_data``) is read as
    parquet if it starts with the parquet magic bytes, else as JSONL (our own artifact format).
    """
    if on_error not in ("reject", "raise"):
        raise ValueError(f"on_error must be 'reject' or 'raise', got {on_error!r}")
    name = name or PurePosixPath(file_uri.split("://", 1)[-1]).name
    suffix = suffix_of(name)
    if not suffix and "." in PurePosixPath(name).name:
        raise unsupported(name)
    try:
        suffix = suffix or _sniff(file_uri)
        if suffix == ".parquet":
            yield from arrow_rows(arrowrows.parquet_batches(file_uri), name, on_error, wanted)
        else:
            yield from _stream_rows(file_uri, name, suffix, on_error, wanted)
    except FileNotFoundError as exc:
        raise DataFormatError("file not found", file=name) from exc
    except textio.TextFormatError as exc:
        raise DataFormatError(str(exc), file=name, row=exc.line) from exc


def read_rows(uri: str, on_error: OnError = "reject") -> Iterator[RawRow]:
    """Every row of a data file, directory or s3 prefix (all supported files inside, sorted by path).

    See the module docstring for what is rejected (``on_error="reject"``) and what always raises.
    """
    files, _ = data_files(uri)
    for file_uri, name in files:
        yield from read_file(file_uri, name, on_error)


def parse_since(since: str) -> _dt.date | None:
    """``since`` as a date (None when empty); ValueError with the expected shape otherwise."""
    text = (since or "").strip()
    if not text:
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return _dt.date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError(f"since must be a date as YYYY-MM-DD (or empty for all data), got {text!r}")
