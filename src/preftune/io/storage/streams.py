"""Reading one file as a stream, wherever it lives, so a reader never holds a whole file in memory.

Local files are opened as they are. An S3 object is read through one GET whose body is consumed chunk by chunk; a
body that breaks off is resumed with a ranged GET from the last byte received (bounded attempts), and an object
that changes while it is read (its ETag moves) is an error rather than a silent mix of two versions. Bytes that
arrive damaged cannot be taken back once a reader has them, so they are an error too, at the end of the object:
botocore's response checksum where the object has one, else the MD5 of everything read against the ETag when
the ETag is a plain MD5. Parquet
needs random access: :func:`arrow_filesystem` gives pyarrow's own filesystem for a URI, configured from the same
environment as the boto3 client (endpoint, region, credentials chain).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from typing import Any

from preftune.io.storage import s3
from preftune.io.storage.integrity import IntegrityError
from preftune.io.storage.uris import is_s3, split_s3, to_path

log = logging.getLogger(__name__)

#: Bytes asked of the S3 body per read.
_CHUNK = 1 << 20


class _S3Body(io.RawIOBase):
    """An S3 object as a raw binary stream that resumes where a broken body stopped."""

    def __init__(self, bucket: str, key: str) -> None:
        self.bucket, self.key = bucket, key
        self.client = s3.s3_client()
        self.position = 0
        self.etag = ""
        self.body: Any = None
        self.size = -1
        self.md5: Any = None
        self._open()
        if s3.plain_md5(self.etag) and not self.encrypted:
            self.md5 = hashlib.md5(usedforsecurity=False)

    def _open(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if self.position:
            kwargs["Range"] = f"bytes={self.position}-"
        if self.etag:
            kwargs["IfMatch"] = self.etag
        try:
            response = self.client.get_object(**kwargs)
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no such S3 object: s3://{self.bucket}/{self.key}") from exc
        if not self.etag:
            self.etag = str(response.get("ETag", ""))
            self.size = int(response.get("ContentLength", -1))
            self.encrypted = not s3.etag_is_md5(response)
        self.body = response["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        from botocore.exceptions import FlexibleChecksumError

        view = memoryview(buffer).cast("B")
        want = min(len(view), _CHUNK)
        problem = ""
        for _ in range(s3.FETCH_ATTEMPTS):
            try:
                data = self.body.read(want)
            except FlexibleChecksumError as exc:
                raise IntegrityError(
                    f"s3://{self.bucket}/{self.key}: the bytes received were damaged ({exc})"
                ) from exc
            except s3.transient_errors() as exc:
                problem = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "s3://%s/%s: read broke off at byte %d (%s); resuming",
                    self.bucket,
                    self.key,
                    self.position,
                    problem,
                )
                self._resume()
                continue
            if not data and 0 <= self.position < self.size:
                problem = f"the body ended at byte {self.position} of {self.size}"
                self._resume()
                continue
            view[: len(data)] = data
            self.position += len(data)
            if self.md5 is not None:
                self.md5.update(data)
                if not data and self.md5.hexdigest() != s3.plain_md5(self.etag):
                    raise IntegrityError(
                        f"s3://{self.bucket}/{self.key}: the bytes received do not match the object's MD5"
                    )
            return len(data)
        raise IntegrityError(
            f"s3://{self.bucket}/{self.key}: could not be read whole in {s3.FETCH_ATTEMPTS} attempts ({problem})"
        )

    def _resume(self) -> None:
        from botocore.exceptions import ClientError

        with contextlib.suppress(
            Exception
        ):  # a broken connection may fail to close; it is dropped either way
            self.body.close()
        try:
            self._open()
        except ClientError as exc:
            if s3._error_code(exc) in ("PreconditionFailed", "412"):
                raise IntegrityError(
                    f"s3://{self.bucket}/{self.key}: the object changed while it was being read"
                ) from exc
            raise

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


def open_input(uri: str) -> io.BufferedIOBase:
    """A buffered binary stream of one file (local path, ``file://`` or ``s3://`` object); close it after use.

    FileNotFoundError when the file is not there.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return io.BufferedReader(_S3Body(bucket, key), buffer_size=_CHUNK)
    return open(to_path(uri), "rb")  # noqa: SIM115 - the caller closes it


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """pyarrow's filesystem for a URI and the path within it: random access for parquet.

    S3 is pyarrow's S3FileSystem with the endpoint of ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and the
    region of ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (credentials from the AWS SDK's standard chain, as for boto3).
    """
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), str(to_path(uri))
    bucket, key = split_s3(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(
            max_attempts=int(os.environ.get("AWS_MAX_ATTEMPTS") or 10)
        )
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https")
    return pafs.S3FileSystem(**options), f"{bucket}/{key}"
