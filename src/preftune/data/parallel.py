"""Reading the files of a large pairwise source in parallel, one worker process per file at a time.

A pairwise row costs a parse, three JSON string encodings and two SHA-1s: Python work that one core does at tens
of thousands of rows per second. When a source holds several large files (a nightly export's part files), each
pairwise file is read by a worker process into its own spill and columns on disk (:func:`read_file`); the main
process splices them in, in file order, so the result is exactly that of a serial read (unit numbers offset by
the rows before each file; the job is :func:`preftune.data.feedback.read_worker`). A file that turns out not to
be pairwise is left to the main process.

Workers are used only when they pay: at least two files and :data:`MIN_BYTES` of data, and more than one CPU
(``PREFTUNE_IMPORT_WORKERS`` sets the count; 0 or 1 turns them off). Each worker holds one file's batch at a
time, like the serial read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data.sources import SourceFile
from preftune.io import storage

#: Source size (bytes) below which files are read in the main process.
MIN_BYTES = 64 << 20


def cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup CPU quota (a container's limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def workers_for(source: str, files: Sequence[SourceFile], fmt: str) -> int:
    """How many worker processes to read ``files`` with (0: read them in the main process)."""
    setting = os.environ.get("PREFTUNE_IMPORT_WORKERS", "")
    wanted = int(setting) if setting.strip().isdigit() else cpus()
    plain = [f for f in files if f.kind == "file"]
    if wanted < 2 or fmt not in ("auto", "pairwise") or len(plain) < 2 or len(plain) != len(files):
        return 0
    try:
        total = sum(storage.sizes(source).values())
    except (OSError, ValueError):
        return 0
    return min(wanted, len(files)) if total >= MIN_BYTES else 0


@dataclass(frozen=True)
class FileResult:
    """What a worker made of one file: nothing (``fmt`` is not pairwise) or its spill, columns and rejections."""

    fmt: str
    rows: int = 0
    lines: int = 0
    directory: str = ""
    parts: tuple[Any, ...] = ()  # the worker's spill parts, in order (files under ``directory``)


def results(
    job: Callable[..., FileResult],
    files: Sequence[SourceFile],
    fmt: str,
    settings: Any,
    directory: Path,
    workers: int,
) -> Iterator[tuple[int, FileResult]]:
    """Each file's result, in file order, made by ``job(file, index, fmt, settings, directory)`` in ``workers``
    processes (started fresh: ``spawn``)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [
            pool.submit(job, f, i, fmt, settings, str(directory / f"file-{i}")) for i, f in enumerate(files)
        ]
        try:
            for index, future in enumerate(futures):
                yield index, future.result()
        finally:
            for future in futures:
                future.cancel()


def rejected(result: FileResult) -> Iterator[tuple[int, list[str], str, Any]]:
    """The rows a worker rejected, with local unit numbers."""
    with open(Path(result.directory) / "rejected.jsonl", encoding="utf-8") as handle:
        for line in handle:
            unit, reasons, detail, record = json.loads(line)
            yield unit, reasons, detail, record
