"""The S3 backend: one boto3 client with adaptive retries, listings, and object transfers that check what arrived.

The endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto) and credentials from
boto3's standard chain (environment, Kubernetes secrets mounted as env, instance roles) -- never from code.
botocore retries each request; on top of that a body that breaks off mid-stream, or an upload whose response
was lost, is tried again a bounded number of times (:data:`FETCH_ATTEMPTS`). Everything in preftune that
touches S3 goes through this module, the registry included.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from preftune.io.storage.integrity import AlreadyExistsError, FileInfo, IntegrityError
from preftune.io.storage.uris import dir_prefix, split_s3

log = logging.getLogger(__name__)

#: Whole-file attempts when a transfer breaks off or the bytes do not match (botocore retries each request too).
FETCH_ATTEMPTS = 3
_CHUNK = 1 << 20
#: Error codes of a conditional put that lost the race, and of a store that does not support conditional puts.
_PRECONDITION_FAILED = ("PreconditionFailed", "ConditionalRequestConflict", "412")
_CONDITION_UNSUPPORTED = ("NotImplemented", "InvalidArgument", "501", "400")


def s3_client() -> Any:
    """A boto3 S3 client with adaptive retries (object stores throttle under parallel pipeline steps).

    The endpoint honours ``AWS_ENDPOINT_URL_S3`` then ``AWS_ENDPOINT_URL`` so S3-compatible stores work without
    code changes; credentials and region come from boto3's standard chain. ``AWS_MAX_ATTEMPTS`` overrides the
    10 attempts per request.
    """
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 10)
    config = Config(
        retries={"mode": "adaptive", "max_attempts": attempts},
        connect_timeout=10,
        read_timeout=120,
        tcp_keepalive=True,
    )
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def transient_errors() -> tuple[type[BaseException], ...]:
    """Errors after which a whole-file transfer is worth trying again: the stream broke off or lied."""
    from botocore.exceptions import (
        ConnectionClosedError,
        FlexibleChecksumError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from s3transfer.exceptions import RetriesExceededError

    return (
        ConnectionClosedError,
        FlexibleChecksumError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
        RetriesExceededError,
        ConnectionError,
        TimeoutError,
    )


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


# ---------------------------------------------------------------------------------------------------- listing


class S3Object(NamedTuple):
    key: str
    rel: str  # path relative to the URI (a single object: its name)
    etag: str
    size: int


def iter_objects(bucket: str, prefix: str, client: Any) -> Iterator[dict[str, Any]]:
    """Every object under ``prefix``, as ``list_objects_v2`` describes it."""
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def list_prefixes(bucket: str, prefix: str, client: Any) -> list[str]:
    """Names of the "sub-directories" right under ``prefix`` (a delimited listing), sorted."""
    paginator = client.get_paginator("list_objects_v2")
    names: set[str] = set()
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            names.add(common["Prefix"][len(prefix) :].rstrip("/"))
    return sorted(n for n in names if n)


def has_objects(bucket: str, prefix: str, client: Any) -> bool:
    """Whether anything is stored under ``prefix`` (one listed key is enough)."""
    page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return bool(page.get("Contents"))


def exact_object(bucket: str, key: str, client: Any) -> dict[str, Any] | None:
    """The object's head if ``key`` names an object (not a prefix), else None."""
    if not key or key.endswith("/"):
        return None
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def listing(uri: str, client: Any) -> tuple[dict[str, Any] | None, list[S3Object]]:
    """Resolve an s3 URI to ``(head of the single object or None, objects sorted by key)``.

    A URI naming an object is that object; otherwise it is a directory-like prefix (``data`` lists ``data/...``,
    never ``data2/...``). Directory marker keys (ending in ``/``) are skipped.
    """
    bucket, key = split_s3(uri)
    head = exact_object(bucket, key, client)
    if head is not None:
        return head, [
            S3Object(key, PurePosixPath(key).name, str(head.get("ETag", "")), int(head["ContentLength"]))
        ]
    prefix = dir_prefix(key)
    objects = [
        S3Object(obj["Key"], obj["Key"][len(prefix) :], str(obj.get("ETag", "")), int(obj.get("Size", 0)))
        for obj in iter_objects(bucket, prefix, client)
        if not obj["Key"].endswith("/")
    ]
    if not objects:
        raise FileNotFoundError(f"no such S3 object or prefix: {uri}")
    return None, sorted(objects)


def entries(uri: str, client: Any) -> tuple[bool, list[tuple[str, str, str]]]:
    """``(is_single_object, [(key, relative_path, etag), ...])`` sorted by key (see :func:`listing`)."""
    head, objects = listing(uri, client)
    return head is not None, [(o.key, o.rel, o.etag) for o in objects]


# ------------------------------------------------------------------------------------------------- checksums


def plain_md5(etag: str) -> str:
    """The MD5 an ETag stands for when it is a plain one (not multipart, ``<md5>-<parts>``); else ''."""
    value = etag.strip('"').lower()
    return value if len(value) == 32 and all(c in "0123456789abcdef" for c in value) else ""


def etag_is_md5(head: dict[str, Any]) -> bool:
    """Whether this object's ETag is the MD5 of its content: not with SSE-KMS or SSE-C (AWS documents that
    those ETags are not), nor for multipart uploads."""
    if head.get("SSECustomerAlgorithm") or str(head.get("ServerSideEncryption", "")).startswith("aws:kms"):
        return False
    return bool(plain_md5(str(head.get("ETag", ""))))


def want_from_head(head: dict[str, Any]) -> FileInfo:
    """What a downloaded object must be: its size, our SHA-256 metadata if it has one, its MD5 ETag if it is one."""
    metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    return FileInfo(
        int(head["ContentLength"]),
        str(metadata.get("sha256", "")).lower(),
        plain_md5(str(head.get("ETag", ""))) if etag_is_md5(head) else "",
    )


def already_there(client: Any, bucket: str, key: str, obj: dict[str, Any], info: FileInfo) -> bool:
    """An object that already holds ``info``'s content: same size and MD5 ETag, or our SHA-256 metadata."""
    if int(obj.get("Size", -1)) != info.size:
        return False
    if plain_md5(str(obj.get("ETag", ""))) == info.md5:
        return True
    head = client.head_object(Bucket=bucket, Key=key)
    return want_from_head(head).sha256 == info.sha256


def problems(
    client: Any, bucket: str, prefix: str, files: dict[str, FileInfo], *, allow_extra: bool = True
) -> list[str]:
    """What is wrong with the objects under ``prefix``: missing, wrong size, content that is not ``files``', and
    (unless ``allow_extra``) objects ``files`` does not list. An ETag that is not the file's MD5 (multipart
    uploads, SSE-KMS, SSE-C) sends us to our SHA-256 metadata."""
    objects = {o["Key"][len(prefix) :]: o for o in iter_objects(bucket, prefix, client)}
    found = [] if allow_extra else [f"{rel}: unexpected file" for rel in sorted(set(objects) - set(files))]
    for rel, info in sorted(files.items()):
        obj = objects.get(rel)
        if obj is None:
            found.append(f"{rel}: missing")
        elif int(obj.get("Size", -1)) != info.size:
            found.append(f"{rel}: {obj.get('Size')} bytes, expected {info.size}")
        elif not already_there(client, bucket, prefix + rel, obj, info):
            found.append(f"{rel}: checksum differs")
    return found


# ------------------------------------------------------------------------------------------- whole objects


def get_bytes(client: Any, bucket: str, key: str) -> bytes:
    """One whole object's bytes; a body that breaks off is fetched again (bounded)."""
    problem = ""
    for _ in range(FETCH_ATTEMPTS):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
        except transient_errors() as exc:
            problem = f"{type(exc).__name__}: {exc}"
            continue
        if len(data) == int(response.get("ContentLength", len(data))):
            return data
        problem = f"{len(data)} bytes, expected {response['ContentLength']}"
    raise IntegrityError(
        f"s3://{bucket}/{key}: could not be read whole in {FETCH_ATTEMPTS} attempts ({problem})"
    )


def sha256_stream(bucket: str, key: str, client: Any) -> str:
    """SHA-256 of one object, streamed; a body that breaks off is read again from the start (bounded)."""
    problem = ""
    for _ in range(FETCH_ATTEMPTS):
        digest = hashlib.sha256()
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(_CHUNK):
                digest.update(chunk)
            return digest.hexdigest()
        except transient_errors() as exc:
            problem = f"{type(exc).__name__}: {exc}"
    raise IntegrityError(
        f"s3://{bucket}/{key}: could not be read whole in {FETCH_ATTEMPTS} attempts ({problem})"
    )


def put_bytes(client: Any, bucket: str, key: str, data: bytes, *, create_only: bool = False) -> None:
    """One object, checked against the MD5 the store answers with (where its ETag is one).

    ``create_only`` makes the put conditional (``If-None-Match: *``) where the store supports it, raising
    AlreadyExistsError when the key exists; stores without conditional puts get a plain put.
    """
    from botocore.exceptions import ClientError

    try:
        response = client.put_object(
            Bucket=bucket, Key=key, Body=data, **({"IfNoneMatch": "*"} if create_only else {})
        )
    except ClientError as exc:
        code = _error_code(exc)
        if create_only and code in _PRECONDITION_FAILED:
            raise AlreadyExistsError(f"s3://{bucket}/{key} already exists") from exc
        if not (create_only and code in _CONDITION_UNSUPPORTED):
            raise
        log.info(
            "s3://%s/%s: the store refused a conditional put (%s); writing it plainly", bucket, key, code
        )
        response = client.put_object(Bucket=bucket, Key=key, Body=data)
    if (
        etag_is_md5(response)
        and plain_md5(str(response["ETag"])) != hashlib.md5(data, usedforsecurity=False).hexdigest()
    ):
        raise IntegrityError(f"s3://{bucket}/{key}: the store's MD5 differs from what was sent")


def send(client: Any, path: Path, bucket: str, key: str, info: FileInfo) -> None:
    """Upload one file with its SHA-256 as metadata. A failure whose request did reach the store (a lost
    response) is checked with a HEAD; otherwise the file is sent again, :data:`FETCH_ATTEMPTS` times at most."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": info.sha256}})
            return
        except (S3UploadFailedError, ClientError, *transient_errors()) as exc:
            if attempt == FETCH_ATTEMPTS:
                raise
            log.warning("s3://%s/%s: upload attempt %d failed (%s)", bucket, key, attempt, exc)
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except ClientError:
                continue
            obj = {"Size": head.get("ContentLength"), "ETag": head.get("ETag", "")}
            if already_there(client, bucket, key, obj, info):
                return


def copy_object(client: Any, bucket: str, src_key: str, dest_key: str, src_bucket: str | None = None) -> None:
    """One server-side copy, metadata included (managed: multipart for large objects, no bytes through here)."""
    client.copy({"Bucket": src_bucket or bucket, "Key": src_key}, bucket, dest_key)


def delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    """Delete objects in batches of 1000 (the most one request takes)."""
    for start in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
