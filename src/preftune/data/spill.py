"""What an import keeps while it streams: a few numbers per row in memory, everything else on disk.

* :class:`Columns` holds per-row numbers (64-bit hashes, lengths, flags) in compact arrays -- bytes per row,
  never the rows themselves -- and hands them to numpy for the decisions that need every row (duplicates,
  contradictions, the split).
* :class:`LineSpill` is a temporary file of text lines, written once and read back in order.
* :class:`SortedSpill` collects ``(key, text)`` entries in any order and gives them back sorted by key, holding at
  most :data:`RUN_ENTRIES` in memory (sorted runs on disk, merged lazily).
* :class:`Output` writes one JSONL artifact line by line through a temporary file, published when complete.

All temporary files live in one :func:`workspace` directory per import, removed when the import ends
(``PREFTUNE_SPILL_DIR`` chooses where; the system temp directory by default).
"""

from __future__ import annotations

import array
import contextlib
import heapq
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from preftune.io import storage

#: Entries a :class:`SortedSpill` keeps in memory before writing a sorted run.
RUN_ENTRIES = 200_000
_NUMPY = {"Q": "uint64", "q": "int64", "I": "uint32", "i": "int32", "b": "int8", "d": "float64"}


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    """A private temporary directory for one import's spill files, removed afterwards."""
    base = os.environ.get("PREFTUNE_SPILL_DIR") or None
    with tempfile.TemporaryDirectory(prefix="preftune-import-", dir=base) as path:
        yield Path(path)


class Columns:
    """Named per-row number columns (``array`` typecodes: Q u64, q i64, I u32, i i32, b i8, d f64), appended
    row by row and read as numpy arrays."""

    def __init__(self, **typecodes: str) -> None:
        self.arrays = {name: array.array(code) for name, code in typecodes.items()}

    def __getitem__(self, name: str) -> array.array:
        return self.arrays[name]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def numpy(self, name: str) -> Any:
        """A column as a numpy array (a view of the same memory)."""
        import numpy as np

        values = self.arrays[name]
        return (
            np.frombuffer(values, dtype=_NUMPY[values.typecode])
            if len(values)
            else np.zeros(0, _NUMPY[values.typecode])
        )


class LineSpill:
    """A temporary file of lines: :meth:`write` them all, then :meth:`read` them back in order (once or more)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: TextIO | None = open(path, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self.lines = 0

    def write(self, line: str) -> None:
        assert self.handle is not None, "the spill was already closed for reading"
        self.handle.write(line)
        self.handle.write("\n")
        self.lines += 1

    def write_many(self, lines: list[str]) -> None:
        """Lines that already end in a newline."""
        assert self.handle is not None, "the spill was already closed for reading"
        self.handle.write("".join(lines))
        self.lines += len(lines)

    def write_bytes(self, data: Any, lines: int) -> None:
        """``lines`` lines already encoded, each ending in a newline (a buffer: Arrow's, bytes)."""
        assert self.handle is not None, "the spill was already closed for reading"
        self.handle.flush()
        self.handle.buffer.write(data)
        self.lines += lines

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def read(self) -> Iterator[str]:
        """Every line written, in order, without its newline."""
        self.close()
        with open(self.path, encoding="utf-8", newline="\n") as handle:
            for line in handle:
                yield line[:-1]


class Segments:
    """A spill written in segments: lines written here, and whole spill files made elsewhere (another process)
    spliced in between, each with the number to add to the unit ids in its lines. :meth:`read` gives
    ``(offset, line)`` in order."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self.parts: list[tuple[LineSpill, int]] = []
        self.lines = 0
        self._open()

    def _open(self) -> None:
        self.current = LineSpill(self.directory / f"{self.name}-{len(self.parts)}.spill")
        self.parts.append((self.current, 0))

    def write(self, line: str) -> None:
        self.current.write(line)
        self.lines += 1

    def write_many(self, lines: list[str]) -> None:
        self.current.write_many(lines)
        self.lines += len(lines)

    def write_bytes(self, data: Any, lines: int) -> None:
        self.current.write_bytes(data, lines)
        self.lines += lines

    def adopt(self, path: Path, lines: int, offset: int) -> None:
        """Splice in a finished spill file whose unit ids start at 0 (they become ``offset`` on)."""
        self.current.close()
        adopted = LineSpill.__new__(LineSpill)
        adopted.path, adopted.handle, adopted.lines = path, None, lines
        self.parts.append((adopted, offset))
        self.lines += lines
        self._open()

    def read(self) -> Iterator[tuple[int, str]]:
        for part, offset in self.parts:
            for line in part.read():
                yield offset, line


class SortedSpill:
    """``(key, text)`` entries added in any order, read back sorted by key (stable for equal keys)."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self.buffer: list[tuple[int, int, str]] = []
        self.runs: list[Path] = []
        self.added = 0

    def add(self, key: int, text: str) -> None:
        self.buffer.append((key, self.added, text))
        self.added += 1
        if len(self.buffer) >= RUN_ENTRIES:
            self._flush()

    def __len__(self) -> int:
        return self.added

    def _flush(self) -> None:
        self.buffer.sort()
        path = self.directory / f"{self.name}-{len(self.runs)}.run"
        with open(path, "w", encoding="utf-8", newline="\n") as handle:
            for key, order, text in self.buffer:
                handle.write(f"{key}\t{order}\t{text}\n")
        self.runs.append(path)
        self.buffer = []

    def __iter__(self) -> Iterator[tuple[int, str]]:
        self.buffer.sort()
        streams = [self._run(path) for path in self.runs] + [iter(self.buffer)]
        for key, _, text in heapq.merge(*streams):
            yield key, text

    @staticmethod
    def _run(path: Path) -> Iterator[tuple[int, int, str]]:
        with open(path, encoding="utf-8", newline="\n") as handle:
            for line in handle:
                key, order, text = line[:-1].split("\t", 2)
                yield int(key), int(order), text


class Output:
    """One JSONL artifact written line by line into a temporary file and published (renamed locally, uploaded
    to S3) only when complete, so a reader never sees half an artifact."""

    def __init__(self, uri: str) -> None:
        self.uri = os.fspath(uri)
        if storage.is_s3(self.uri):
            fd, self.tmp = tempfile.mkstemp(prefix="preftune-output-", suffix=".jsonl")
        else:
            target = storage.local_path(self.uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        self.handle = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        self.lines = 0

    def write(self, line: str) -> None:
        self.handle.write(line)
        self.handle.write("\n")
        self.lines += 1

    def publish(self) -> None:
        self.handle.close()
        storage.put_file(self.tmp, self.uri)

    def discard(self) -> None:
        self.handle.close()
        Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is None:
            self.publish()
        else:
            self.discard()
