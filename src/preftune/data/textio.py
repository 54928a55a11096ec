"""Text files as bounded streams: decompression with a cap, sniffing, and lines of bounded length.

A year of feedback does not fit in a step's memory, and a 1 MB gzip file can hold 1 GiB of newlines. So text is
read as a stream, one line at a time, and every bound a hostile file could break is explicit:

* decompressed bytes may exceed the compressed bytes read so far by at most :data:`MAX_EXPANSION` times, plus
  :data:`EXPANSION_ALLOWANCE` (real feedback compresses 3-20x; a gzip bomb of newlines 1000x), so a bomb is
  refused after a few megabytes, never after filling memory;
* one line (one JSONL row, one CSV record) holds at most :data:`MAX_LINE_BYTES`;
* a ``.json`` array, which is parsed whole, holds at most :data:`MAX_DOCUMENT_BYTES` (JSONL has no such limit).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import re
import zlib
from collections.abc import Iterator

from preftune.io import storage

#: Decompressed bytes allowed per compressed byte read (beyond the allowance below).
MAX_EXPANSION = 200
#: Decompressed bytes allowed before the ratio applies (a small file of repeated rows may compress very well).
EXPANSION_ALLOWANCE = 16 << 20
#: Longest line (row or record) read, in bytes.
MAX_LINE_BYTES = 64 << 20
#: Largest ``.json`` document (parsed whole), in bytes.
MAX_DOCUMENT_BYTES = 256 << 20

PARQUET_MAGIC = b"PAR1"
_NEWLINES = re.compile(rb"\n+")
GZIP_MAGIC = b"\x1f\x8b"


class TextFormatError(ValueError):
    """A whole-file problem found while streaming; the reader turns it into a located DataFormatError."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class _Counted(io.RawIOBase):
    """A raw stream that counts the bytes read from it (the compressed side of a decompression)."""

    def __init__(self, inner: io.BufferedIOBase) -> None:
        self.inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)


class _Bounded(io.RawIOBase):
    """Decompressed gzip bytes, refused once they outgrow the compressed bytes by more than the bound."""

    def __init__(self, source: _Counted) -> None:
        self.source = source
        self.gzip = gzip.GzipFile(fileobj=source, mode="rb")
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            data = self.gzip.read1(len(buffer))
        except (OSError, EOFError, zlib.error) as exc:
            raise TextFormatError(f"not a readable gzip file ({exc})") from exc
        self.count += len(data)
        if self.count > EXPANSION_ALLOWANCE + MAX_EXPANSION * self.source.count:
            raise TextFormatError(
                f"refused as a compression bomb: {self.source.count:,} compressed bytes already expand to "
                f"{self.count:,} (more than {MAX_EXPANSION}x plus {EXPANSION_ALLOWANCE >> 20} MiB)"
            )
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_text(file_uri: str, name: str, suffix: str) -> Iterator[io.BufferedIOBase]:
    """The bytes of a text-format file (``suffix`` is its format: .jsonl, .csv, ...), decompressed when its name
    ends in ``.gz``, with a leading UTF-8 byte-order mark removed. Raises TextFormatError for bytes that are
    plainly another format than the name claims (gzip without .gz, parquet, UTF-16)."""
    with storage.open_input(file_uri) as raw:
        stream: io.BufferedIOBase = raw
        if name.lower().endswith(".gz"):
            stream = io.BufferedReader(_Bounded(_Counted(raw)), buffer_size=1 << 20)
        head = stream.peek(4)[:4]
        if not name.lower().endswith(".gz") and head[:2] == GZIP_MAGIC:
            raise TextFormatError("file is gzip-compressed; name it with a .gz suffix")
        if head[:4] == PARQUET_MAGIC:
            raise TextFormatError(f"file holds parquet data but is named {suffix}; rename it to .parquet")
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
            raise TextFormatError("file is UTF-16 encoded; re-encode it as UTF-8")
        if head[:3] == b"\xef\xbb\xbf":
            stream.read(3)
        yield stream


def lines(stream: io.BufferedIOBase, chunk: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """Physical lines that hold something, numbered from 1 (blank ``\\n`` lines are counted, not returned),
    without their line break; TextFormatError for one longer than :data:`MAX_LINE_BYTES`.

    Read in chunks and split in C: a run of empty lines (a file of newlines) costs almost nothing."""
    number = 0
    pending = b""
    while True:
        data = stream.read(chunk)
        if not data:
            break
        data = pending + data if pending else data
        start = 0
        end = data.rfind(b"\n")
        while start <= end:
            if data[start] == 0x0A:  # a run of empty lines, skipped in C
                run = _NEWLINES.match(data, start, end + 1).end() - start  # type: ignore[union-attr]
                number += run
                start += run
                continue
            stop = data.index(b"\n", start)
            number += 1
            yield number, data[start:stop].rstrip(b"\r")
            start = stop + 1
        pending = data[start:]
        if len(pending) > MAX_LINE_BYTES:
            raise TextFormatError(f"line longer than {MAX_LINE_BYTES >> 20} MiB", number + 1)
    if pending:
        yield number + 1, pending.rstrip(b"\r")


def read_document(stream: io.BufferedIOBase) -> bytes:
    """A whole document (a ``.json`` array), at most :data:`MAX_DOCUMENT_BYTES`."""
    data = stream.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise TextFormatError(
            f"a JSON array larger than {MAX_DOCUMENT_BYTES >> 20} MiB is not read whole; write it as JSON Lines"
        )
    return data


def line_chunks(stream: io.BufferedIOBase, size: int = 4 << 20) -> Iterator[tuple[int, bytes]]:
    """Whole lines about ``size`` bytes at a time: ``(lines before the chunk, chunk)``, every chunk ending in a
    newline (one is added after a last line without). The same bound as :func:`lines`: TextFormatError for a line
    longer than :data:`MAX_LINE_BYTES`."""
    number = 0
    pending = b""
    while True:
        data = stream.read(size)
        if not data:
            break
        data = pending + data if pending else data
        end = data.rfind(b"\n") + 1
        if end:
            chunk = data[:end]
            yield number, chunk
            number += chunk.count(b"\n")
        pending = data[end:]
        if len(pending) > MAX_LINE_BYTES:
            raise TextFormatError(f"line longer than {MAX_LINE_BYTES >> 20} MiB", number + 1)
    if pending:
        yield number, pending + b"\n"
