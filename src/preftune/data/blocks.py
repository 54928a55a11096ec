"""Pairwise files read a block of rows at a time for :mod:`pairbatch`: JSON Lines through pyarrow's JSON reader,
parquet as record batches.

A JSON Lines block is a few megabytes of whole lines from the bounded stream of :mod:`textio` (the compression-bomb
and line-length bounds hold), parsed by ``pyarrow.json.read_json`` -- twice as fast as ``json`` per row, and
columns at once. pyarrow is stricter than the row parser, never looser: it refuses a repeated key, a lone
surrogate, a raw control character, a line that is not one object, or a column whose type changes. When it refuses
a block, the block has no table and each row goes through the reference row parser (:mod:`jsonrows`), which says
what is wrong with which row. A block whose rows do not line up one to one with its lines has no table either.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from preftune.data import arrowrows, jsonrows, readers, textio
from preftune.data.readers import DataFormatError, RawRow

#: Bytes of JSON Lines parsed as one block.
CHUNK_BYTES = 4 << 20
#: Rows of a parquet record batch taken as one block.
PARQUET_ROWS = 16384


@dataclass
class Block:
    """Rows read together: their numbers, an Arrow table of them (None: each row needs the row parser) and, for
    JSON Lines, their text (every line ending in a newline; ``starts``: where each begins, plus the end)."""

    name: str
    rows: Any
    table: Any
    text: bytes = b""
    starts: Any = None
    batch: Any = None

    @property
    def meta_exact(self) -> bool:
        """Whether a null in a column is a null in the row (not so in JSON, where it may be an absent key)."""
        return self.batch is not None

    def lines(self) -> Any:
        """JSON Lines: each row's line (with its newline) as a string array over the block's text, not copied."""
        import pyarrow as pa

        if self.batch is not None:
            return None
        offsets = pa.py_buffer(self.starts.astype("int32"))
        return pa.StringArray.from_buffers(len(self.rows), offsets, pa.py_buffer(self.text))

    def raw_rows(self, start: int, stop: int) -> list[RawRow]:
        """Rows ``start:stop`` of the block as the row reader gives them (rejected rows with their reasons)."""
        if self.batch is not None:
            found = arrowrows.batch_records(self.batch.slice(start, stop - start))
            numbers = self.rows[start:stop].tolist()
            return [
                RawRow(self.name, n, record)
                if problem is None
                else readers.problem_row(self.name, n, problem, None)
                for n, (record, problem) in zip(numbers, found, strict=True)
            ]
        out = []
        bounds = self.starts[start : stop + 1].tolist()
        for n, a, b in zip(self.rows[start:stop].tolist(), bounds, bounds[1:], strict=False):
            record, problem, text = jsonrows.parse_object(self.text[a : b - 1])
            if problem is None:
                out.append(RawRow(self.name, n, record, raw=text))
            else:
                out.append(readers.problem_row(self.name, n, problem, text[:100_000]))
        return out


def _json_table(text: bytes, rows: int) -> Any:
    """The block parsed by pyarrow, or None when it refuses it or its rows are not the lines."""
    import pyarrow as pa
    import pyarrow.json as pj

    options = pj.ReadOptions(use_threads=False, block_size=len(text) + 1)
    try:
        table = pj.read_json(pa.BufferReader(text), read_options=options)
    except (pa.ArrowException, ValueError):
        return None
    return table if table.num_rows == rows else None


def _json_block(name: str, before: int, chunk: bytes) -> Block:
    """One chunk of whole lines as a block: blank lines skipped, line numbers physical, ``\\r\\n`` read as a
    line break (as :func:`readers.jsonl_rows` reads them)."""
    import numpy as np

    lines = chunk.count(b"\n")
    if chunk[:1] == b"{" and chunk.count(b"\n{") == lines - 1 and b"\r" not in chunk:
        text, rows = chunk, before + 1 + np.arange(lines, dtype=np.int64)
    else:
        kept = [(n, line.rstrip(b"\r")) for n, line in enumerate(chunk.split(b"\n")[:lines]) if line.strip()]
        text = b"".join(line + b"\n" for _, line in kept)
        rows = before + 1 + np.asarray([n for n, _ in kept], dtype=np.int64)
    ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == 10) + 1
    starts = np.concatenate(([0], ends)).astype(np.int64)
    return Block(name, rows, _json_table(text, len(rows)) if len(rows) else None, text, starts)


def _jsonl_blocks(file_uri: str, name: str, suffix: str) -> Iterator[Block]:
    with textio.open_text(file_uri, name, suffix) as stream:
        for before, chunk in textio.line_chunks(stream, CHUNK_BYTES):
            block = _json_block(name, before, chunk)
            if len(block.rows):
                yield block


def _parquet_blocks(file_uri: str, name: str) -> Iterator[Block]:
    import numpy as np

    first = 0
    for batch in arrowrows.parquet_batches(file_uri, PARQUET_ROWS):
        rows = first + 1 + np.arange(batch.num_rows, dtype=np.int64)
        first += batch.num_rows
        yield Block(name, rows, batch, batch=batch)


def file_blocks(file_uri: str, name: str) -> Iterator[Block] | None:
    """The blocks of a JSON Lines or parquet file (None for any other kind: it is read row by row); errors as
    :func:`readers.read_file` raises them."""
    suffix = readers.suffix_of(name)  # an extension-less artifact is sniffed by the row reader
    if suffix in (".jsonl", ".ndjson"):
        return _located(_jsonl_blocks(file_uri, name, suffix), name)
    if suffix == ".parquet":
        return _located(_parquet_blocks(file_uri, name), name)
    return None


def _located(blocks: Iterator[Block], name: str) -> Iterator[Block]:
    try:
        yield from blocks
    except FileNotFoundError as exc:
        raise DataFormatError("file not found", file=name) from exc
    except textio.TextFormatError as exc:
        raise DataFormatError(str(exc), file=name, row=exc.line) from exc
