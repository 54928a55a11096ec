"""What a file must be (its size and content hashes), and the errors raised when a file or directory is not that.

Every other storage module raises these, so a caller catches one family whether the bytes came from disk or S3.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FileInfo:
    """Size and content hashes of one file; ``""`` for a hash that is not known (MD5 only checks ETags)."""

    size: int
    sha256: str = ""
    md5: str = ""


class UnsafePathError(ValueError):
    """A path that would land outside its directory, or a link that preftune does not follow."""


class IntegrityError(OSError):
    """A file whose size or checksum does not match what its source says it must be."""


class IncompleteError(FileNotFoundError):
    """A directory that is not known to be complete: no manifest where one is required, or files missing."""


class AlreadyExistsError(FileExistsError):
    """A create-only write found the file already there: another writer got there first."""
