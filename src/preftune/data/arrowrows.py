"""Arrow data (parquet files, ``datasets`` Arrow tables) as Python rows, one record batch at a time.

A parquet file is read in record batches through pyarrow with random access (a local file, or S3 through pyarrow's
filesystem), so memory follows the batch, not the file. Two hostile cases are bounded: a row group that would
decompress to more than :data:`MAX_ROW_GROUP_BYTES` is refused before it is read, and a value Python cannot hold
(a timestamp, date or duration outside ``datetime``'s range) rejects its row, naming the column, instead of
failing the batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from preftune.data.jsonrows import Problem
from preftune.data.textio import PARQUET_MAGIC, TextFormatError
from preftune.io import storage

#: Largest row group read, uncompressed (a parquet "bomb" is refused before it is decompressed).
MAX_ROW_GROUP_BYTES = 2 << 30
#: Rows per record batch.
BATCH_ROWS = 4096
#: Bytes of a parquet file read at once (a request, through S3).
READ_BUFFER_BYTES = 8 << 20
#: Largest row group (compressed) fetched whole before it is decoded.
PRE_BUFFER_BYTES = 256 << 20


def parquet_batches(file_uri: str, batch_rows: int = BATCH_ROWS) -> Iterator[Any]:
    """Record batches of one parquet file (``batch_rows`` rows each); TextFormatError for a file that is not
    readable parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, path = storage.arrow_filesystem(file_uri)
    with filesystem.open_input_file(path) as handle:
        if handle.read(4) != PARQUET_MAGIC:
            raise TextFormatError("not a parquet file (missing PAR1 magic bytes)")
        handle.seek(0)
        try:
            metadata = pq.read_metadata(handle)
            _check_row_groups(metadata)
            handle.seek(0)
            parquet = pq.ParquetFile(
                handle, metadata=metadata, pre_buffer=_pre_buffer(metadata), buffer_size=READ_BUFFER_BYTES
            )
            yield from parquet.iter_batches(batch_size=batch_rows)
        except (pa.ArrowException, OSError) as exc:
            raise TextFormatError(f"not a readable parquet file ({exc})") from exc


def _pre_buffer(metadata: Any) -> bool:
    """Whether to fetch each row group's column chunks in a few coalesced reads: yes, unless a row group is so large
    (compressed) that holding it would cost more memory than :data:`PRE_BUFFER_BYTES`. Through S3 (moto, 1M pairs
    in 4 files) the import went from 36,900 to 57,000 rows/s with it and 8 MiB reads, against 1 MiB reads without."""
    groups = range(metadata.num_row_groups)
    largest = max(
        (
            sum(g.column(c).total_compressed_size for c in range(g.num_columns))
            for g in map(metadata.row_group, groups)
        ),
        default=0,
    )
    return largest <= PRE_BUFFER_BYTES


def _check_row_groups(metadata: Any) -> None:
    for index in range(metadata.num_row_groups):
        size = metadata.row_group(index).total_byte_size
        if size > MAX_ROW_GROUP_BYTES:
            raise TextFormatError(
                f"row group {index} decompresses to {size:,} bytes, more than {MAX_ROW_GROUP_BYTES >> 30} GiB; "
                "write the file with smaller row groups"
            )


def batch_records(batch: Any) -> list[tuple[dict[str, Any] | None, Problem | None]]:
    """``(record, None)`` per row of a record batch, or ``(None, problem)`` for a row holding a value Python
    cannot represent."""
    try:
        return [(record, None) for record in batch.to_pylist()]
    except (ValueError, OverflowError, ArithmeticError):
        pass
    columns: dict[str, list[Any]] = {}
    problems: dict[int, Problem] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            columns[name] = column.to_pylist()
            continue
        except (ValueError, OverflowError, ArithmeticError):
            pass
        values: list[Any] = []
        for index in range(len(column)):
            try:
                values.append(column[index].as_py())
            except (ValueError, OverflowError, ArithmeticError) as exc:
                values.append(None)
                problems.setdefault(
                    index,
                    Problem(
                        f"invalid:{name}",
                        f"a {column.type} value Python cannot represent ({exc})",
                        name,
                    ),
                )
        columns[name] = values
    out: list[tuple[dict[str, Any] | None, Problem | None]] = []
    for index in range(batch.num_rows):
        if index in problems:
            out.append((None, problems[index]))
        else:
            out.append(({name: values[index] for name, values in columns.items()}, None))
    return out
