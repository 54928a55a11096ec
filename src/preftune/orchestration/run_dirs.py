"""Where local runs live: the pipeline root, one directory per run, its record and its lock.

Each ``preftune run`` creates its own directory, ``<pipeline root>/<pipeline>-<UTC time>-<random>/``, with an
exclusive ``mkdir``, so two runs started at once into one root never share one, and the runner knows its
directory because it made it (nothing is guessed from modification times). ``run.json`` records what is needed
to list and resume the run: the pipeline, its arguments, the cache it uses and each attempt; ``.lock`` is held
(``flock``) while a ``preftune run`` works in the directory, so a run is *running* exactly when its lock is
taken, and the kernel lets go of it whatever way the process ends.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RECORD = "run.json"
SUMMARY = "summary.json"
LOCK = ".lock"
LOGS = "logs"


class RunDirError(ValueError):
    """A pipeline root or run directory that cannot be used, said so that a user can act on it."""


def now() -> str:
    """The current UTC time as ISO 8601 (what records and summaries carry)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _reason(error: OSError) -> str:
    return os.strerror(error.errno) if error.errno else str(error)


def check_root(value: str | os.PathLike[str]) -> Path:
    """The pipeline root as an absolute directory, created if missing; RunDirError when it cannot hold runs
    (a file or device, a path through a file, a directory this user cannot write, a read-only file system)."""
    text = os.fspath(value)
    if not text.strip() or "\0" in text:
        raise RunDirError(f"--pipeline-root {text!r} is not a usable directory name")
    root = Path(text).expanduser().absolute()
    try:
        mode = root.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as error:
        raise RunDirError(f"--pipeline-root {root}: {_reason(error)}") from None
    if mode is not None and not stat.S_ISDIR(mode):
        kind = "a file" if stat.S_ISREG(mode) else "a special file (device, pipe or socket)"
        raise RunDirError(f"--pipeline-root {root} is {kind}, not a directory: choose a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"--pipeline-root {root} cannot be created: {_reason(error)}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunDirError(f"--pipeline-root {root} is not writable by this user: choose another directory")
    return root.resolve()


def new_run_dir(root: Path, pipeline_name: str) -> Path:
    """Create this run's own directory under ``root`` (exclusively: a name taken by another run is skipped)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for _ in range(100):
        path = root / f"{pipeline_name}-{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise RunDirError(
                f"--pipeline-root {root}: cannot create a run directory: {_reason(error)}"
            ) from None
        (path / LOGS).mkdir()
        return path
    raise RunDirError(f"--pipeline-root {root}: no free run directory name")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: Path, value: Any) -> None:
    """Replace ``path`` in one step, so a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    os.replace(partial, path)


class RunLock:
    """The exclusive lock of a run directory; held for as long as one ``preftune run`` works in it."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or RunDirError when another process holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunDirError(
                    f"run {self.path.parent.name} is still running (its lock is held)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def is_running(run_dir: Path) -> bool:
    """Whether a ``preftune run`` holds this directory's lock right now."""
    path = run_dir / LOCK
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass(frozen=True)
class RunInfo:
    """One run directory as ``preftune runs`` and ``--resume`` see it."""

    path: Path
    record: dict[str, Any]
    summary: dict[str, Any]

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def pipeline(self) -> str:
        return str(self.record.get("pipeline") or self.summary.get("pipeline") or "?")

    @property
    def created(self) -> str:
        return str(self.record.get("created") or self.summary.get("finished") or "")

    @property
    def status(self) -> str:
        """SUCCEEDED / FAILED from the summary; RUNNING while locked; INTERRUPTED when it stopped unfinished."""
        if is_running(self.path):
            return "RUNNING"
        finished = self.summary.get("status")
        if finished and self.summary.get("attempt", 1) >= len(self.record.get("attempts", [])):
            return str(finished)
        return "INTERRUPTED"


def read_run(path: Path) -> RunInfo | None:
    """The run in ``path``, or None when it is not a run directory."""
    record, summary = read_json(path / RECORD), read_json(path / SUMMARY)
    if not record and not summary:
        return None
    return RunInfo(path, record, summary)


def runs_under(root: Path) -> Iterator[RunInfo]:
    """Every run directory directly under ``root``, oldest first by their recorded creation time (to the
    nanosecond where recorded: two runs can start in the same second)."""
    if not root.is_dir():
        return iter(())
    found = [run for child in root.iterdir() if child.is_dir() and (run := read_run(child))]
    return iter(sorted(found, key=lambda run: (run.created, run.record.get("created_ns", 0), run.run_id)))


def find_run(root: Path, ref: str) -> RunInfo:
    """A run given as its directory or as its id (its directory's name under ``root``)."""
    for candidate in (Path(ref).expanduser(), root / ref):
        if candidate.is_dir() and (run := read_run(candidate.resolve())):
            return run
    raise RunDirError(f"no run {ref!r}: give a run directory or the id of a run under {root}")


def start_attempt(run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Add this process's attempt to the run record and write it."""
    record = dict(record)
    record["attempts"] = [*record.get("attempts", []), {"pid": os.getpid(), "started": now()}]
    write_json(run_dir / RECORD, record)
    return record


def elapsed_since(start: float) -> float:
    """Seconds since a ``time.monotonic()`` reading, rounded for records."""
    return round(time.monotonic() - start, 1)
