"""Compare-and-swap of one small file (the champion pointer), on S3 and on a local disk.

:func:`read` returns the content with a tag that changes whenever the content is replaced (the S3 ETag;
locally the SHA-256); :func:`swap` writes only if the tag is still the one read, and says whether it did. On
S3 that is a conditional put, ``If-Match: <etag>`` (``If-None-Match: *`` for the first write), which AWS S3,
MinIO and moto's server evaluate atomically: of two promotions that read the same pointer, exactly one write
lands. Locally the check and the atomic rename happen under an exclusive ``flock`` on the pointer's directory.

The S3 calls use storage's client (:func:`preftune.io.storage.s3_client`: its endpoint, credentials and
retries). They belong in :mod:`preftune.io.storage` (a read that returns the ETag and a write with
``if_match``); they are here until storage has them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from preftune.io import storage

log = logging.getLogger(__name__)

#: Error codes of a conditional write that lost (412), of one racing another (409), and of an object deleted
#: since it was read (an If-Match on a missing key).
_LOST = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404")
_UNSUPPORTED = ("NotImplemented", "501")


@dataclass(frozen=True)
class Snapshot:
    """A file's content as read, and the tag a conditional write compares with (both None: no file)."""

    data: bytes | None
    tag: str | None


def read(uri: str) -> Snapshot:
    """The file at ``uri`` and its tag; ``Snapshot(None, None)`` when there is none."""
    if storage.is_s3(uri):
        return _read_s3(uri)
    path = storage.local_path(uri)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Snapshot(None, None)
    return Snapshot(data, hashlib.sha256(data).hexdigest())


def swap(uri: str, data: bytes, expected: Snapshot) -> bool:
    """Write ``data`` if the file is still what ``expected`` was (or still absent); True when written."""
    if storage.is_s3(uri):
        return _swap_s3(uri, data, expected)
    path = storage.local_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        if read(uri).tag != expected.tag:
            return False
        storage.write_bytes(str(path), data)  # atomic rename: readers see the old or the new pointer
        return True


def remove(uri: str) -> None:
    """Delete one file or object (absent is fine)."""
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        storage.s3_client().delete_object(Bucket=bucket, Key=key)
    else:
        storage.local_path(uri).unlink(missing_ok=True)


def _read_s3(uri: str) -> Snapshot:
    bucket, key = storage.split_s3(uri)
    client = storage.s3_client()
    problem = ""
    for _ in range(storage.FETCH_ATTEMPTS):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
        except client.exceptions.NoSuchKey:
            return Snapshot(None, None)
        except storage.s3.transient_errors() as exc:
            problem = f"{type(exc).__name__}: {exc}"
            continue
        if len(data) == int(response.get("ContentLength", len(data))):
            return Snapshot(data, str(response["ETag"]))
        problem = f"{len(data)} bytes, expected {response['ContentLength']}"
    raise storage.IntegrityError(
        f"{uri}: could not be read whole in {storage.FETCH_ATTEMPTS} attempts ({problem})"
    )


def _swap_s3(uri: str, data: bytes, expected: Snapshot) -> bool:
    from botocore.exceptions import ClientError

    bucket, key = storage.split_s3(uri)
    client = storage.s3_client()
    condition = {"IfMatch": expected.tag} if expected.tag else {"IfNoneMatch": "*"}
    try:
        response = client.put_object(Bucket=bucket, Key=key, Body=data, **condition)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _LOST:
            return False
        if code not in _UNSUPPORTED:
            raise
        log.warning(
            "%s: the store does not support conditional writes (%s); writing the champion pointer "
            "unconditionally -- promotions of one model must then not run at the same time",
            uri,
            code,
        )
        response = client.put_object(Bucket=bucket, Key=key, Body=data)
    sent = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if storage.s3.etag_is_md5(response) and storage.s3.plain_md5(str(response["ETag"])) != sent:
        raise storage.IntegrityError(f"{uri}: the store's MD5 differs from what was sent")
    return True


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on a directory for the ``with`` block (processes on one host or NFSv4)."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
