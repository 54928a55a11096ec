"""Which URIs storage understands (plain local paths, ``file://``, ``s3://``, ``minio://``) and how they split.

``minio://bucket/key`` is what KFP writes for artifacts under a MinIO pipeline root (multi-user Kubeflow's
default, ``minio://mlpipeline/v2/artifacts``): the same S3 API, at the endpoint the step is configured with
(``AWS_ENDPOINT_URL``), so it is read and written as ``s3://bucket/key``.

The one rule for turning a URI into a local path lives here, so the registry and the transfers cannot disagree
about what ``file://`` means.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

SUPPORTED_SCHEMES = ("local path", "file://", "s3://", "minio://")
#: Schemes served by the S3 API (minio:// at the configured endpoint).
S3_SCHEMES = ("s3", "minio")


def scheme(uri: str | Path) -> str:
    """The URI's scheme ('' for a plain local path); raises ValueError for anything we cannot handle."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return ""
    name = uri.split("://", 1)[0].lower()
    if name in S3_SCHEMES:
        return "s3"
    if name == "file":
        return name
    raise ValueError(
        f"unsupported URI {uri!r}: scheme {name + '://'!r} is not supported; "
        f"use one of: {', '.join(SUPPORTED_SCHEMES)}"
    )


def check_uri(uri: str) -> str:
    """``uri`` unchanged when its scheme is supported; ValueError naming the supported ones otherwise."""
    scheme(uri)
    return uri


def is_s3(uri: str) -> bool:
    """True for ``s3://`` and ``minio://`` URIs; ValueError for other unsupported schemes, so typos fail early."""
    return scheme(uri) == "s3"


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (the key may be empty for a bucket root)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def to_path(uri: str | Path) -> Path:
    """The local path of a plain path or ``file://`` URI."""
    uri = os.fspath(uri)
    if scheme(uri) == "file":
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI with a remote host is not supported: {uri!r}")
        return Path(unquote(parsed.path))
    return Path(uri)


def dir_prefix(key: str) -> str:
    """An S3 key as a directory prefix: ``data`` -> ``data/`` (so it never matches ``data2/...``)."""
    return key if (not key or key.endswith("/")) else key + "/"
