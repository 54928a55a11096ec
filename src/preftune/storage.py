"""One way to read and write data wherever it lives: local paths (plain or ``file://``) and ``s3://`` URIs.

Pipelines run in containers whose artifacts live in S3-compatible object storage, while tests and laptops use
local paths; every module goes through these functions so that both work the same. S3 access is boto3 only:
the endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto) and credentials from
boto3's standard chain (environment, Kubernetes secrets mounted as env, instance roles) -- never from code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

SUPPORTED_SCHEMES = ("local path", "file://", "s3://")
_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def publish_file(tmp: str | Path, target: str | Path) -> None:
    """Move a finished temporary file into place atomically, with the usual umask permissions
    (``mkstemp`` creates files readable by their owner only, which other pipeline containers may not be)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, target)


def _scheme(uri: str) -> str:
    """The URI's scheme ('' for a plain local path); raises ValueError for anything we cannot handle."""
    uri = os.fspath(uri)
    if "://" not in uri:
        return ""
    scheme = uri.split("://", 1)[0].lower()
    if scheme in ("s3", "file"):
        return scheme
    raise ValueError(
        f"unsupported URI {uri!r}: scheme {scheme + '://'!r} is not supported; "
        f"use one of: {', '.join(SUPPORTED_SCHEMES)}"
    )


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs; raises ValueError for other unsupported schemes so typos fail early."""
    return _scheme(uri) == "s3"


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")`` (the key may be empty for a bucket root)."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _local(uri: str | Path) -> Path:
    """The local path of a plain path or ``file://`` URI."""
    uri = os.fspath(uri)
    if _scheme(uri) == "file":
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file:// URI with a remote host is not supported: {uri!r}")
        return Path(unquote(parsed.path))
    return Path(uri)


def s3_client() -> Any:
    """A boto3 S3 client with adaptive retries (object stores throttle under parallel pipeline steps).

    The endpoint honours ``AWS_ENDPOINT_URL_S3`` then ``AWS_ENDPOINT_URL`` so S3-compatible stores work without
    code changes; credentials and region come from boto3's standard chain.
    """
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(retries={"mode": "adaptive", "max_attempts": 10}, connect_timeout=10, read_timeout=120)
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def _s3_objects(bucket: str, prefix: str, client: Any) -> Iterator[dict[str, Any]]:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def _s3_exact_object(bucket: str, key: str, client: Any) -> dict[str, Any] | None:
    """The object's head if ``key`` names an object (not a prefix), else None."""
    if not key or key.endswith("/"):
        return None
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _s3_entries(uri: str, client: Any) -> tuple[bool, list[tuple[str, str, str]]]:
    """Resolve an s3 URI to ``(is_single_object, [(key, relative_path, etag), ...])`` sorted by key.

    A URI naming an object is that object; otherwise it is a directory-like prefix (``data`` lists ``data/...``,
    never ``data2/...``). Directory marker keys (ending in ``/``) are skipped.
    """
    bucket, key = split_s3(uri)
    head = _s3_exact_object(bucket, key, client)
    if head is not None:
        return True, [(key, PurePosixPath(key).name, str(head.get("ETag", "")))]
    prefix = key if (not key or key.endswith("/")) else key + "/"
    entries = [
        (obj["Key"], obj["Key"][len(prefix) :], str(obj.get("ETag", "")))
        for obj in _s3_objects(bucket, prefix, client)
        if not obj["Key"].endswith("/")
    ]
    if not entries:
        raise FileNotFoundError(f"no such S3 object or prefix: {uri}")
    return False, sorted(entries)


def list_files(uri: str) -> list[str]:
    """Every file under a local file / directory / s3 object / s3 prefix, as URIs, sorted.

    Local results are plain paths (``file://`` is stripped); s3 results are ``s3://bucket/key``.
    """
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        _, entries = _s3_entries(uri, s3_client())
        return [f"s3://{bucket}/{key}" for key, _, _ in entries]
    path = _local(uri)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file())
    raise FileNotFoundError(f"no such file or directory: {uri}")


def read_bytes(uri: str) -> bytes:
    """The whole content of one file (local or s3 object)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no such S3 object: {uri}") from exc
    return _local(uri).read_bytes()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary sibling then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file (local: atomically, creating parent directories; s3: one put_object)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"cannot write a file to an S3 prefix: {uri!r}")
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    _atomic_write(_local(uri), data)


def _safe_target(dest: Path, relative: str, source: str) -> Path:
    """``dest / relative``, refusing anything that would land outside ``dest`` (``..``, absolute keys)."""
    parts = PurePosixPath(relative).parts
    if (
        not relative
        or relative.startswith(("/", "\\"))
        or any(p in ("..", ".") for p in parts)
        or "\\" in relative
    ):
        raise ValueError(f"refusing to download {source}: its path {relative!r} would escape {dest}")
    target = (dest / Path(*parts)).resolve()
    root = dest.resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"refusing to download {source}: its path {relative!r} would escape {dest}")
    return target


def download(uri: str, dest: str | Path) -> Path:
    """Copy a file, directory or s3 prefix into ``dest``, keeping the relative layout.

    A single file lands at ``dest/<name>`` and that path is returned; a directory or prefix fills ``dest`` and
    ``dest`` is returned. Every target is checked before anything is written: a key containing ``..`` or an
    absolute path raises ValueError and nothing is written outside (or inside) ``dest``.
    """
    dest = Path(dest)
    if is_s3(uri):
        client = s3_client()
        bucket, _ = split_s3(uri)
        single, entries = _s3_entries(uri, client)
        targets = [(key, _safe_target(dest, rel, f"s3://{bucket}/{key}")) for key, rel, _ in entries]
        for key, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            os.close(fd)
            try:
                client.download_file(bucket, key, tmp)
                publish_file(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return targets[0][1] if single else dest.resolve()
    src = _local(uri)
    if src.is_file():
        target = _safe_target(dest, src.name, str(src))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        return target
    if src.is_dir():
        pairs = [
            (p, _safe_target(dest, p.relative_to(src).as_posix(), str(p))) for p in sorted(src.rglob("*"))
        ]
        for path, target in pairs:
            if path.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
        return dest.resolve()
    raise FileNotFoundError(f"no such file or directory: {uri}")


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy every file under ``local_dir`` to ``uri`` (an s3 prefix or a local directory), keeping the layout."""
    root = _local(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {local_dir}")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if is_s3(uri):
        bucket, key = split_s3(uri)
        prefix = key if (not key or key.endswith("/")) else key + "/"
        client = s3_client()
        for path in files:
            client.upload_file(str(path), bucket, prefix + path.relative_to(root).as_posix())
        return
    dest = _local(uri)
    for path in files:
        target = dest / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


def default_cache_dir() -> Path:
    """Where s3 downloads are cached: ``$PREFTUNE_CACHE_DIR`` or a folder in the system temp dir."""
    env = os.environ.get("PREFTUNE_CACHE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "preftune-cache"


def local_path(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local path holding ``uri``'s content, for libraries that need real files (transformers, pyarrow).

    Local paths (and ``file://``) are returned as they are. An s3 object or prefix is downloaded into
    ``cache_dir/<sha256(uri)[:16]>``; a later call reuses that copy only while the listing (keys and ETags)
    is unchanged, so a model or dataset overwritten under the same URI is fetched again.
    """
    if not is_s3(uri):
        return _local(uri)
    client = s3_client()
    single, entries = _s3_entries(uri, client)
    manifest = json.dumps([[rel, etag] for _, rel, etag in entries], sort_keys=True)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = root / hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    result = entry / entries[0][1] if single else entry
    marker = entry.parent / f"{entry.name}.manifest.json"
    if marker.is_file() and marker.read_text(encoding="utf-8") == manifest and result.exists():
        return result
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=root))
    try:
        download(uri, staging)
        marker.unlink(missing_ok=True)
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(staging, entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write(marker, manifest.encode("utf-8"))
    return result


def _hash_stream(uri: str) -> str:
    digest = hashlib.sha256()
    if is_s3(uri):
        bucket, key = split_s3(uri)
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            digest.update(chunk)
    else:
        with _local(uri).open("rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_of(uri: str) -> str:
    """A content hash for lineage: a file's own SHA-256, or for a directory / prefix a SHA-256 over the sorted
    ``relative/path\\0<sha256 of content>\\n`` lines, so the same tree hashes the same locally and on S3."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        single, entries = _s3_entries(uri, s3_client())
        if single:
            return _hash_stream(uri)
        pairs = [(rel, f"s3://{bucket}/{key}") for key, rel, _ in entries]
    else:
        path = _local(uri)
        if path.is_file():
            return _hash_stream(str(path))
        if not path.is_dir():
            raise FileNotFoundError(f"no such file or directory: {uri}")
        pairs = sorted((p.relative_to(path).as_posix(), str(p)) for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for rel, file_uri in pairs:
        digest.update(f"{rel}\0{_hash_stream(file_uri)}\n".encode())
    return digest.hexdigest()


def fingerprint(uri: str) -> str:
    """A cheap identity of the data behind a URI: changes whenever a file is added, removed or rewritten.

    Listing metadata only (S3 ETags; local sizes and modification times), so a nightly run can tell whether its
    input changed without reading it. Pipelines feed it into the ingest steps' cache keys.
    """
    digest = hashlib.sha256()
    if is_s3(uri):
        _, entries = _s3_entries(uri, s3_client())
        for key, _, etag in entries:
            digest.update(f"{key}\0{etag}\n".encode())
    else:
        root = _local(uri)
        if not root.exists():
            raise FileNotFoundError(f"no such file or directory: {uri}")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            stat = path.stat()
            rel = path.name if root.is_file() else path.relative_to(root).as_posix()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]
