"""The download cache: s3 data as local files for libraries that need real paths (transformers, pyarrow).

An entry is reused only while the source's listing (keys and ETags) is unchanged, so a model or dataset
overwritten under the same URI is fetched again -- only the files that changed. Processes sharing a cache take
turns on an entry through an advisory lock.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from preftune.io.storage import s3
from preftune.io.storage.local import atomic_write, walk_files
from preftune.io.storage.transfers import download
from preftune.io.storage.uris import is_s3, to_path


def default_cache_dir() -> Path:
    """Where s3 downloads are cached: ``$PREFTUNE_CACHE_DIR`` or a folder in the system temp dir."""
    env = os.environ.get("PREFTUNE_CACHE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "preftune-cache"


def local_path(uri: str, cache_dir: str | Path | None = None, *, require_manifest: bool = False) -> Path:
    """A local path holding ``uri``'s content, for libraries that need real files (transformers, pyarrow).

    Local paths (and ``file://``) are returned as they are. An s3 object or prefix is downloaded into
    ``cache_dir/<sha256(uri)[:16]>``; a later call reuses that copy only while the listing (keys and ETags)
    is unchanged, so a model or dataset overwritten under the same URI is fetched again -- only the files that
    changed (a download killed half-way resumes the same way). Processes sharing a cache take turns on an entry.
    """
    if not is_s3(uri):
        return to_path(uri)
    single, entries = s3.entries(uri, s3.s3_client())
    listing = json.dumps([[rel, etag] for _, rel, etag in entries], sort_keys=True)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    result = entry / entries[0][1] if single else entry
    marker = entry.parent / f"{entry.name}.manifest.json"

    def fresh() -> bool:
        return marker.is_file() and marker.read_text(encoding="utf-8") == listing and result.exists()

    if fresh():
        return result
    entry.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(entry):
        if fresh():  # another process filled it while we waited
            return result
        marker.unlink(missing_ok=True)
        download(uri, entry, require_manifest=require_manifest)
        keep = {entries[0][1]} if single else {rel for _, rel, _ in entries}
        for rel, path in walk_files(entry):
            if rel not in keep:  # left from an older version of the prefix
                path.unlink()
        atomic_write(marker, listing.encode("utf-8"))
    return result


class DirectoryLock:
    """An exclusive advisory lock on a directory for the life of a ``with`` block (no lock where unsupported)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.fd = os.open(self.path, os.O_RDONLY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
