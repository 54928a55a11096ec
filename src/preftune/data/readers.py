"""Read tabular training data (JSONL / JSON / CSV / TSV / parquet, local or s3) into raw rows.

Error policy -- every input row is accounted for, and bad input never ends in a bare traceback:

* A problem confined to one row (a line that is not valid JSON, not UTF-8, not a JSON object; a CSV row with the
  wrong number of fields) is *isolable*. With ``on_error="reject"`` (the importers' default) it comes back as a
  :class:`RawRow` with ``error`` set (``invalid_json``, ``invalid_utf8``, ``not_an_object``, ``malformed_row``)
  so the importer can reject that row with a reason and go on. With ``on_error="raise"`` it raises
  :class:`DataFormatError` naming the file and line.
* A problem with the whole file always raises :class:`DataFormatError`: unreadable parquet, a file that is not the
  format its extension claims (parquet or gzip bytes in a ``.jsonl``, no ``PAR1`` magic in a ``.parquet``),
  UTF-16 text, a broken CSV header, a ``.json`` array that does not parse, or a JSONL file in which *no* line
  parses (nothing isolable: the file as a whole is wrong).

Row numbers are 1-based: the physical line in JSONL, the data row (header excluded) in CSV/parquet, the element
in a ``.json`` array. Blank JSONL lines are not rows and are skipped (line numbers stay physical).
"""

from __future__ import annotations

import csv
import datetime as _dt
import gzip
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Literal

from preftune.io import storage

log = logging.getLogger(__name__)

OnError = Literal["reject", "raise"]

#: File suffixes we read (a trailing ``.gz`` is also accepted for the text formats).
SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")

_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"


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


def row_label(file: str) -> str:
    """How rows of ``file`` are counted in messages: JSONL lines, JSON array items, CSV/parquet rows."""
    name = file.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".ndjson")) or "." not in PurePosixPath(name).name:
        return "line"
    if name.endswith(".json"):
        return "item"
    return "row"


@dataclass(frozen=True)
class RawRow:
    """One input row as read: where it came from, and either its ``record`` or why it could not be read.

    ``error`` is None for a readable row; otherwise a rejection reason (``invalid_json``, ``invalid_utf8``,
    ``not_an_object``, ``malformed_row``), ``detail`` says what was wrong and ``raw`` holds the row's text.
    """

    file: str
    row: int
    record: dict[str, Any] | None
    error: str | None = None
    detail: str | None = None
    raw: str | None = field(default=None, repr=False)


def _suffix(name: str) -> str:
    """The format suffix of a file name, ignoring a trailing ``.gz`` ('' if unsupported)."""
    lowered = name.lower()
    gz = lowered.endswith(".gz")
    if gz:
        lowered = lowered[: -len(".gz")]
    for suffix in SUPPORTED_SUFFIXES:
        if lowered.endswith(suffix) and not (gz and suffix == ".parquet"):
            return suffix
    return ""


def _hidden(relative: str) -> bool:
    """Hidden or bookkeeping files (``.crc``, ``_SUCCESS``, ``.ipynb_checkpoints``) written next to data."""
    return any(part.startswith((".", "_")) for part in PurePosixPath(relative).parts)


def data_files(uri: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The data files under ``uri`` as sorted ``(file_uri, display_name)`` pairs, plus skipped file names.

    The display name is the path relative to ``uri`` (a single file's own name): stable wherever the data is
    stored, and unambiguous within one source. Hidden or bookkeeping files (a path part starting with ``.`` or
    ``_``: ``_SUCCESS``, ``.ipynb_checkpoints/``) and files of unsupported types are not read; they are returned
    as skipped (and logged) so the caller can report them. A single file of an unsupported type is an error, as
    is a directory with no data files.
    """
    files = storage.list_files(uri)
    single = files == [uri] if storage.is_s3(uri) else storage.local_path(uri).is_file()
    if single:
        name = PurePosixPath(files[0].split("://", 1)[-1]).name
        if not _suffix(name) and "." in name:
            raise DataFormatError(
                f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)",
                file=name,
            )
        return [(files[0], name)], []
    base = uri.rstrip("/")
    if not storage.is_s3(uri):
        base = str(storage.local_path(uri)).rstrip("/")
    chosen: list[tuple[str, str]] = []
    skipped: list[str] = []
    for file_uri in files:
        relative = (
            file_uri[len(base) + 1 :] if file_uri.startswith(base + "/") else PurePosixPath(file_uri).name
        )
        if _suffix(relative) and not _hidden(relative):
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


def _sniff(data: bytes, name: str, suffix: str) -> bytes:
    """Decompress ``.gz`` and refuse bytes that are plainly another format than the extension claims."""
    if name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataFormatError(f"not a readable gzip file ({exc})", file=name) from exc
    elif data[:2] == _GZIP_MAGIC:
        raise DataFormatError("file is gzip-compressed; name it with a .gz suffix", file=name)
    if suffix == ".parquet":
        if data[:4] != _PARQUET_MAGIC:
            raise DataFormatError("not a parquet file (missing PAR1 magic bytes)", file=name)
        return data
    if data[:4] == _PARQUET_MAGIC:
        raise DataFormatError(
            f"file holds parquet data but is named {suffix}; rename it to .parquet", file=name
        )
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataFormatError("file is UTF-16 encoded; re-encode it as UTF-8", file=name)
    return data.removeprefix(b"\xef\xbb\xbf")


def _utf8_error(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})"


def parse_jsonl(data: bytes, name: str, on_error: OnError = "raise") -> Iterator[RawRow]:
    """Rows of JSONL bytes; isolable bad lines are held back until a good line proves the file is JSONL at all."""
    pending: list[RawRow] = []
    seen_good = False
    for number, line in enumerate(data.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        bad: RawRow | None = None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = RawRow(
                name, number, None, "invalid_utf8", _utf8_error(exc), line.decode("utf-8", "replace")
            )
        else:
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                bad = RawRow(
                    name,
                    number,
                    None,
                    "invalid_json",
                    f"invalid JSON ({exc.msg} at column {exc.colno})",
                    text,
                )
            else:
                if not isinstance(value, dict):
                    bad = RawRow(
                        name,
                        number,
                        None,
                        "not_an_object",
                        f"expected a JSON object, got {_kind(value)}",
                        text,
                    )
        if bad is not None:
            if on_error == "raise":
                raise DataFormatError(bad.detail or "unreadable", file=name, row=number)
            if seen_good:
                yield bad
            else:
                pending.append(bad)
            continue
        if not seen_good:
            seen_good = True
            yield from pending
            pending.clear()
        yield RawRow(name, number, value)
    if pending:
        first = pending[0]
        raise DataFormatError(
            f"no line of this file is a JSON object, so it is not JSONL; first problem: {first.detail}",
            file=name,
            row=first.row,
        )


def _read_json(data: bytes, name: str, on_error: OnError) -> Iterator[RawRow]:
    """A ``.json`` file: a JSON array of objects, or (as many tools write) JSON Lines under a .json name."""
    stripped = data.lstrip()
    if not stripped.startswith(b"["):
        yield from parse_jsonl(data, name, on_error)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataFormatError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x}) on line {line}", file=name
        ) from exc
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            f"invalid JSON array ({exc.msg} at line {exc.lineno}, column {exc.colno})", file=name
        ) from exc
    for number, value in enumerate(items, start=1):
        if isinstance(value, dict):
            yield RawRow(name, number, value)
            continue
        detail = f"expected a JSON object, got {_kind(value)}"
        if on_error == "raise":
            raise DataFormatError(detail, file=name, row=number)
        yield RawRow(
            name, number, None, "not_an_object", detail, json.dumps(value, ensure_ascii=False)[:10000]
        )


def _maybe_messages(cell: str) -> Any:
    """A CSV cell holding a JSON list of chat messages becomes that list; any other text stays text."""
    text = cell.strip()
    if not (text.startswith("[") and text.endswith("]") and '"role"' in text):
        return cell
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return cell
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    return cell


def _read_csv(data: bytes, name: str, on_error: OnError, delimiter: str) -> Iterator[RawRow]:
    """CSV/TSV with a header row; every cell is text (empty cells stay empty strings, never NaN).

    Bytes are decoded with ``surrogateescape`` so one row with bad bytes is rejected on its own.
    Cells holding a JSON list of chat messages (``[{"role": ...}]``) are parsed into that list.
    """
    text = data.decode("utf-8", "surrogateescape")
    csv.field_size_limit(1 << 28)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataFormatError(f"unreadable CSV header ({exc})", file=name, row=None) from exc
    if not header or not any(h.strip() for h in header):
        raise DataFormatError("empty file or missing header row", file=name)
    header = [h.strip() for h in header]
    if any(_has_surrogates(h) for h in header):
        raise DataFormatError("header row is not valid UTF-8", file=name)
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates or "" in header:
        raise DataFormatError(f"header has duplicate or empty column names: {duplicates or ['']}", file=name)
    number = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataFormatError(
                f"unreadable CSV near line {reader.line_num} ({exc})", file=name, row=number + 1
            ) from exc
        if not cells:
            continue
        number += 1
        raw = delimiter.join(cells)
        if any(_has_surrogates(c) for c in cells):
            detail = "not valid UTF-8"
            if on_error == "raise":
                raise DataFormatError(detail, file=name, row=number)
            yield RawRow(
                name,
                number,
                None,
                "invalid_utf8",
                detail,
                raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace"),
            )
            continue
        if len(cells) != len(header):
            detail = f"expected {len(header)} fields, got {len(cells)}"
            if on_error == "raise":
                raise DataFormatError(detail, file=name, row=number)
            yield RawRow(name, number, None, "malformed_row", detail, raw)
            continue
        yield RawRow(name, number, {h: _maybe_messages(c) for h, c in zip(header, cells, strict=True)})


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _read_parquet(data: bytes, name: str) -> Iterator[RawRow]:
    """Parquet rows as Python values (nested lists/structs become lists/dicts), streamed by record batch."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(pa.BufferReader(data))
        batches = handle.iter_batches(batch_size=4096)
        number = 0
        for batch in batches:
            for record in batch.to_pylist():
                number += 1
                yield RawRow(name, number, record)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"not a readable parquet file ({exc})", file=name) from exc


def read_file(file_uri: str, name: str | None = None, on_error: OnError = "reject") -> Iterator[RawRow]:
    """The rows of one data file; ``name`` is how the file is named in rows and errors (default: its name).

    A file whose name has no extension at all (a KFP artifact path such as ``.../train_data``) is read as
    parquet if it starts with the parquet magic bytes, else as JSONL (our own artifact format).
    """
    if on_error not in ("reject", "raise"):
        raise ValueError(f"on_error must be 'reject' or 'raise', got {on_error!r}")
    name = name or PurePosixPath(file_uri.split("://", 1)[-1]).name
    suffix = _suffix(name)
    if not suffix and "." in PurePosixPath(name).name:
        raise DataFormatError(
            f"unsupported file type; expected one of {', '.join(SUPPORTED_SUFFIXES)} (optionally .gz)",
            file=name,
        )
    try:
        data = storage.read_bytes(file_uri)
    except FileNotFoundError as exc:
        raise DataFormatError("file not found", file=name) from exc
    if not suffix:
        suffix = ".parquet" if data[:4] == _PARQUET_MAGIC else ".jsonl"
    data = _sniff(data, name, suffix)
    if suffix in (".jsonl", ".ndjson"):
        yield from parse_jsonl(data, name, on_error)
    elif suffix == ".json":
        yield from _read_json(data, name, on_error)
    elif suffix in (".csv", ".tsv"):
        yield from _read_csv(data, name, on_error, "\t" if suffix == ".tsv" else ",")
    else:
        yield from _read_parquet(data, name)


def read_rows(uri: str, on_error: OnError = "reject") -> Iterator[RawRow]:
    """Every row of a data file, directory or s3 prefix (all supported files inside, sorted by path).

    See the module docstring for what is rejected (``on_error="reject"``) and what always raises.
    """
    files, _ = data_files(uri)
    for file_uri, name in files:
        yield from read_file(file_uri, name, on_error)


def _kind(value: Any) -> str:
    """A short type name for messages: 'int', 'list', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return type(value).__name__


_PARTITION = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})(?:/|$)")


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


def partition_date(file_uri: str) -> _dt.date | None:
    """The date of the last ``date=YYYY-MM-DD`` folder in a file's path (None when it is in no date partition)."""
    path = file_uri.split("://", 1)[-1].replace("\\", "/")
    found = _PARTITION.findall(path)
    if not found:
        return None
    try:
        return _dt.date.fromisoformat(found[-1])
    except ValueError:  # date=2024-13-45: not a real date, so not a partition we can order
        return None


def select_since(
    files: list[tuple[str, str]], since: str
) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Keep the files whose ``date=YYYY-MM-DD`` partition is on or after ``since``.

    Returns ``(kept, skipped, unpartitioned)`` (the last two as display names). Files outside any date partition
    are kept -- a curated seed file next to the nightly partitions stays in every run -- and listed as
    unpartitioned so the report can say so. An empty ``since`` keeps everything.
    """
    cutoff = parse_since(since)
    kept: list[tuple[str, str]] = []
    skipped: list[str] = []
    unpartitioned: list[str] = []
    for file_uri, name in files:
        date = partition_date(file_uri)
        if date is None:
            unpartitioned.append(name)
            kept.append((file_uri, name))
        elif cutoff is None or date >= cutoff:
            kept.append((file_uri, name))
        else:
            skipped.append(name)
    return kept, skipped, unpartitioned
