"""One way to read and write data wherever it lives: local paths (plain or ``file://``) and ``s3://`` URIs.

Pipelines run in containers whose artifacts live in S3-compatible object storage, while tests and laptops use
local paths; every module goes through these functions so that both work the same. S3 access is boto3 only:
the endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto) and credentials from
boto3's standard chain (environment, Kubernetes secrets mounted as env, instance roles) -- never from code.

Object stores time out, throttle and drop connections, and processes die half-way through a transfer. So:

* requests go through botocore's adaptive retries; a body that breaks off mid-stream is fetched again (a
  bounded number of times);
* every file lands in a temporary sibling (``.<name>.<random>.preftune-partial``) and is renamed into place
  only after its size and checksum were verified, so a partial file never sits under its real name;
* a directory upload (:func:`upload_dir`) writes a manifest, ``_COMPLETE.json``, **last**: the size, SHA-256 and
  MD5 of every file. A directory with a manifest is complete; one without is either still being written, or was
  not written by preftune (KFP's launcher uploads artifacts without one). Readers verify against the manifest
  when there is one and against the listing (sizes, MD5 ETags) otherwise; ``require_manifest=True`` refuses a
  directory without one (checkpoints, registry versions: anything that must never be read half-written);
* transfers are resumable file by file: a re-run skips files already present and verified and re-fetches
  partial or mismatched ones;
* nothing is written outside the destination: keys with ``..``, absolute keys, backslashes, a key that is both a
  file and a directory, links in the destination leading out, and links in a source directory leading out of
  it (or to directories) are refused before the first byte is written.

The manifest format is shared with :mod:`preftune.io.registry`, whose versions are directories of the same kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)

SUPPORTED_SCHEMES = ("local path", "file://", "s3://")
MANIFEST = "_COMPLETE.json"
#: Whole-file attempts when a transfer breaks off or the bytes do not match (botocore retries each request too).
FETCH_ATTEMPTS = 3
PARTIAL_SUFFIX = ".preftune-partial"
_CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


class UnsafePathError(ValueError):
    """A path that would land outside its directory, or a link that preftune does not follow."""


class IntegrityError(OSError):
    """A file whose size or checksum does not match what its source says it must be."""


class IncompleteError(FileNotFoundError):
    """A directory that is not known to be complete: no manifest where one is required, or files missing."""


@dataclass(frozen=True)
class FileInfo:
    """Size and content hashes of one file; ``""`` for a hash that is not known (MD5 only checks ETags)."""

    size: int
    sha256: str = ""
    md5: str = ""


def publish_file(tmp: str | Path, target: str | Path) -> None:
    """Move a finished temporary file into place atomically, with the usual umask permissions
    (``mkstemp`` creates files readable by their owner only, which other pipeline containers may not be)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------------------------- URIs


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


def check_uri(uri: str) -> str:
    """``uri`` unchanged when its scheme is supported; ValueError naming the supported ones otherwise."""
    _scheme(uri)
    return uri


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


def _dir_prefix(key: str) -> str:
    return key if (not key or key.endswith("/")) else key + "/"


# ---------------------------------------------------------------------------------------------- local files


def _walk_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under ``root`` as sorted ``(posix relative path, path)`` pairs.

    A link to a file inside ``root`` is read as that file. A link leading out of ``root``, to a directory, or
    nowhere raises UnsafePathError: following it would copy (or upload) something the directory does not hold.
    Sockets, pipes and devices raise too.
    """
    real_root = root.resolve()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                target = path.resolve()
                if target != real_root and real_root not in target.parents:
                    raise UnsafePathError(f"refusing {path}: it is a link to {target}, outside {root}")
                if not target.is_file():
                    raise UnsafePathError(f"refusing {path}: a link to a directory or to nothing ({target})")
                found.append((rel, path))
            elif name in filenames:
                if not path.is_file():
                    raise UnsafePathError(f"refusing {path}: not a regular file")
                found.append((rel, path))
    return sorted(found)


def _hash_file(path: Path) -> FileInfo:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return FileInfo(size, sha.hexdigest(), md5.hexdigest())


def inventory(root: str | Path) -> dict[str, FileInfo]:
    """Size, SHA-256 and MD5 of every file under a local directory, by relative path; the top-level manifest is
    not content and is left out. Links follow the rules of the transfers (see the module docstring)."""
    return {rel: _hash_file(path) for rel, path in _walk_files(Path(root)) if rel != MANIFEST}


def _mismatch(path: Path, want: FileInfo) -> str | None:
    """Why ``path`` is not the file described by ``want`` (None when it is, as far as ``want`` can tell)."""
    size = path.stat().st_size
    if size != want.size:
        return f"{size} bytes, expected {want.size}"
    if not (want.sha256 or want.md5):
        return None
    got = _hash_file(path)
    if want.sha256 and got.sha256 != want.sha256:
        return "SHA-256 differs"
    if want.md5 and got.md5 != want.md5:
        return "MD5 differs"
    return None


def _verified(path: Path, want: FileInfo) -> bool:
    """True for a file that exists and matches a checksum (size alone proves too little to skip a fetch)."""
    return path.is_file() and bool(want.sha256 or want.md5) and _mismatch(path, want) is None


def _transient_errors() -> tuple[type[BaseException], ...]:
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


def _fetch(target: Path, want: FileInfo, fetch: Callable[[str], None], source: str) -> bool:
    """Put ``source`` at ``target`` through a verified temporary file; False when ``target`` already matched.

    Bounded: :data:`FETCH_ATTEMPTS` whole-file attempts, then IntegrityError (``target`` untouched).
    """
    if _verified(target, want):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    transient = _transient_errors()
    problem = ""
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent)
        os.close(fd)
        try:
            fetch(tmp)
            mismatch = _mismatch(Path(tmp), want)
            if mismatch is None:
                publish_file(tmp, target)
                return True
            problem = mismatch
        except transient as exc:
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.warning("%s: attempt %d of %d failed (%s)", source, attempt, FETCH_ATTEMPTS, problem)
    raise IntegrityError(
        f"{source}: could not be transferred intact in {FETCH_ATTEMPTS} attempts ({problem}); "
        f"{target} was not written"
    )


def _remove_partials(dest: Path) -> None:
    """Delete temporary files a killed transfer left in ``dest`` (only ours: they carry PARTIAL_SUFFIX)."""
    if dest.is_dir():
        for path in dest.rglob(f"*{PARTIAL_SUFFIX}"):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary sibling then rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        publish_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------------- S3


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


class _Object(NamedTuple):
    key: str
    rel: str  # path relative to the URI (a single object: its name)
    etag: str
    size: int


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


def _s3_listing(uri: str, client: Any) -> tuple[dict[str, Any] | None, list[_Object]]:
    """Resolve an s3 URI to ``(head of the single object or None, objects sorted by key)``.

    A URI naming an object is that object; otherwise it is a directory-like prefix (``data`` lists ``data/...``,
    never ``data2/...``). Directory marker keys (ending in ``/``) are skipped.
    """
    bucket, key = split_s3(uri)
    head = _s3_exact_object(bucket, key, client)
    if head is not None:
        return head, [
            _Object(key, PurePosixPath(key).name, str(head.get("ETag", "")), int(head["ContentLength"]))
        ]
    prefix = _dir_prefix(key)
    objects = [
        _Object(obj["Key"], obj["Key"][len(prefix) :], str(obj.get("ETag", "")), int(obj.get("Size", 0)))
        for obj in _s3_objects(bucket, prefix, client)
        if not obj["Key"].endswith("/")
    ]
    if not objects:
        raise FileNotFoundError(f"no such S3 object or prefix: {uri}")
    return None, sorted(objects)


def _s3_entries(uri: str, client: Any) -> tuple[bool, list[tuple[str, str, str]]]:
    """``(is_single_object, [(key, relative_path, etag), ...])`` sorted by key (see _s3_listing)."""
    head, objects = _s3_listing(uri, client)
    return head is not None, [(o.key, o.rel, o.etag) for o in objects]


def _plain_md5(etag: str) -> str:
    """The MD5 an ETag stands for when it is a plain one (not multipart, ``<md5>-<parts>``); else ''."""
    value = etag.strip('"').lower()
    return value if len(value) == 32 and all(c in "0123456789abcdef" for c in value) else ""


def _etag_is_md5(head: dict[str, Any]) -> bool:
    """Whether this object's ETag is the MD5 of its content: not with SSE-KMS or SSE-C (AWS documents that
    those ETags are not), nor for multipart uploads."""
    if head.get("SSECustomerAlgorithm") or str(head.get("ServerSideEncryption", "")).startswith("aws:kms"):
        return False
    return bool(_plain_md5(str(head.get("ETag", ""))))


def _want_from_head(head: dict[str, Any]) -> FileInfo:
    """What a downloaded object must be: its size, our SHA-256 metadata if it has one, its MD5 ETag if it is one."""
    metadata = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}
    return FileInfo(
        int(head["ContentLength"]),
        str(metadata.get("sha256", "")).lower(),
        _plain_md5(str(head.get("ETag", ""))) if _etag_is_md5(head) else "",
    )


def _get_bytes(client: Any, bucket: str, key: str) -> bytes:
    """One whole object's bytes; a body that breaks off is fetched again (bounded)."""
    problem = ""
    for _ in range(FETCH_ATTEMPTS):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
        except _transient_errors() as exc:
            problem = f"{type(exc).__name__}: {exc}"
            continue
        if len(data) == int(response.get("ContentLength", len(data))):
            return data
        problem = f"{len(data)} bytes, expected {response['ContentLength']}"
    raise IntegrityError(
        f"s3://{bucket}/{key}: could not be read whole in {FETCH_ATTEMPTS} attempts ({problem})"
    )


def _put_bytes(client: Any, bucket: str, key: str, data: bytes) -> None:
    """One object, checked against the MD5 the store answers with (where its ETag is one)."""
    response = client.put_object(Bucket=bucket, Key=key, Body=data)
    if (
        _etag_is_md5(response)
        and _plain_md5(str(response["ETag"])) != hashlib.md5(data, usedforsecurity=False).hexdigest()
    ):
        raise IntegrityError(f"s3://{bucket}/{key}: the store's MD5 differs from what was sent")


# ----------------------------------------------------------------------------------------------- manifests


def manifest_bytes(files: dict[str, FileInfo], **extra: Any) -> bytes:
    """The manifest of a directory: ``{"files": {relative path: {"size", "sha256", "md5"}}, **extra}``."""
    body = dict(extra, files={rel: asdict(info) for rel, info in sorted(files.items())})
    return (json.dumps(body, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def parse_manifest(data: bytes, where: str) -> dict[str, FileInfo]:
    """The files a manifest lists; IntegrityError naming ``where`` when it is not one."""
    try:
        body = json.loads(data)
        files = body["files"]
        parsed = {
            str(rel): FileInfo(
                int(v["size"]), str(v.get("sha256", "")).lower(), str(v.get("md5", "")).lower()
            )
            for rel, v in files.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise IntegrityError(f"{where}: not a valid {MANIFEST} manifest ({exc})") from None
    if any(info.size < 0 for info in parsed.values()):
        raise IntegrityError(f"{where}: not a valid {MANIFEST} manifest (negative size)")
    return parsed


def read_manifest(uri: str) -> dict[str, FileInfo] | None:
    """The files listed by the manifest of a directory (local or s3), or None when it has none: a directory
    with a manifest was written completely."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        manifest_key = _dir_prefix(key) + MANIFEST
        try:
            data = _get_bytes(client, bucket, manifest_key)
        except client.exceptions.NoSuchKey:
            return None
        return parse_manifest(data, f"s3://{bucket}/{manifest_key}")
    path = _local(uri) / MANIFEST
    return parse_manifest(path.read_bytes(), str(path)) if path.is_file() else None


def listing_problems(
    files: dict[str, FileInfo], sizes: dict[str, int], etags: dict[str, str], *, allow_extra: bool = False
) -> list[str]:
    """What is wrong with a listing that should hold ``files``: missing files, wrong sizes, MD5 ETags that
    differ (only where the ETag is a plain MD5), and -- unless ``allow_extra`` -- files that should not be there
    (the manifest itself aside)."""
    problems = []
    for name, info in sorted(files.items()):
        etag = _plain_md5(etags.get(name, ""))
        if name not in sizes:
            problems.append(f"{name}: missing")
        elif sizes[name] != info.size:
            problems.append(f"{name}: {sizes[name]} bytes, expected {info.size}")
        elif etag and info.md5 and etag != info.md5:
            problems.append(f"{name}: checksum differs")
    if not allow_extra:
        problems += [f"{name}: unexpected file" for name in sorted(set(sizes) - set(files) - {MANIFEST})]
    return problems


# ------------------------------------------------------------------------------------------------- reading


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
        return [str(p) for _, p in _walk_files(path)]
    raise FileNotFoundError(f"no such file or directory: {uri}")


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-directories of a local directory or s3 prefix, sorted; [] when it is absent."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        paginator = s3_client().get_paginator("list_objects_v2")
        names: set[str] = set()
        for page in paginator.paginate(Bucket=bucket, Prefix=_dir_prefix(key), Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                names.add(common["Prefix"][len(_dir_prefix(key)) :].rstrip("/"))
        return sorted(n for n in names if n)
    root = _local(uri)
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()) if root.is_dir() else []
    )


def remove_tree(uri: str) -> None:
    """Delete a local directory or every object under an s3 prefix, its manifest first: a directory half
    deleted is never taken for a complete one."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        prefix = _dir_prefix(key)
        client.delete_object(Bucket=bucket, Key=prefix + MANIFEST)
        keys = [obj["Key"] for obj in _s3_objects(bucket, prefix, client)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        return
    root = _local(uri)
    (root / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)


def read_bytes(uri: str) -> bytes:
    """The whole content of one file (local or s3 object)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        try:
            return _get_bytes(client, bucket, key)
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no such S3 object: {uri}") from exc
    return _local(uri).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Write one file (local: atomically, creating parent directories; s3: one put_object, MD5-checked)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"cannot write a file to an S3 prefix: {uri!r}")
        _put_bytes(s3_client(), bucket, key, data)
        return
    _atomic_write(_local(uri), data)


def _safe_target(dest: Path, relative: str, source: str) -> Path:
    """``dest / relative``, refusing anything that would land outside ``dest`` (``..``, absolute keys, links)."""
    parts = PurePosixPath(relative).parts
    if (
        not relative
        or relative.startswith(("/", "\\"))
        or any(p in ("..", ".") for p in parts)
        or "\\" in relative
        or "\0" in relative
    ):
        raise UnsafePathError(f"refusing to download {source}: its path {relative!r} would escape {dest}")
    target = (dest / Path(*parts)).resolve()
    root = dest.resolve()
    if target != root and root not in target.parents:
        raise UnsafePathError(f"refusing to download {source}: its path {relative!r} would escape {dest}")
    return target


def _plan(dest: Path, items: list[tuple[str, str]]) -> list[Path]:
    """Checked targets for ``(relative path, source)`` items: every one inside ``dest``, none both a file and
    a directory. Raises before anything is written."""
    targets = [_safe_target(dest, rel, source) for rel, source in items]
    names = {PurePosixPath(rel) for rel, _ in items}
    for rel, source in items:
        for parent in PurePosixPath(rel).parents:
            if parent in names:
                raise UnsafePathError(
                    f"refusing to download {source}: {parent} is both a file and a directory"
                )
    return targets


def _select(
    uri: str,
    listing: dict[str, tuple[str, int]],
    manifest: dict[str, FileInfo] | None,
    dest: Path,
    require_manifest: bool,
) -> tuple[list[str], list[Path]]:
    """The files to fetch (the manifest's, else the whole listing) and their checked targets.

    ``listing`` maps relative paths to ``(source, size)``. Raises before anything is written: UnsafePathError
    for a path out of ``dest``; IncompleteError for a missing manifest when one is required, or for a listing
    that does not hold what the manifest lists.
    """
    if manifest is None and require_manifest:
        raise IncompleteError(
            f"{uri} has no {MANIFEST}: it was not written completely (an upload still running or one that "
            "died), or not by preftune; refusing to read it"
        )
    names = sorted(manifest) if manifest is not None else sorted(listing)
    sep = "" if uri.endswith("/") else "/"
    targets = _plan(dest, [(rel, listing[rel][0] if rel in listing else f"{uri}{sep}{rel}") for rel in names])
    if manifest is not None:
        problems = [f"{rel}: missing" for rel in names if rel not in listing] + [
            f"{rel}: {listing[rel][1]} bytes, expected {manifest[rel].size}"
            for rel in names
            if rel in listing and listing[rel][1] != manifest[rel].size
        ]
        if problems:
            raise IncompleteError(f"{uri} does not match its {MANIFEST}: " + "; ".join(problems[:10]))
        ignored = sorted(set(listing) - set(manifest) - {MANIFEST})
        if ignored:
            log.warning(
                "%s: ignoring %d file(s) its %s does not list: %s", uri, len(ignored), MANIFEST, ignored[:10]
            )
    return names, targets


def download(uri: str, dest: str | Path, *, require_manifest: bool = False) -> Path:
    """Copy a file, directory or s3 prefix into ``dest``, keeping the relative layout.

    A single file lands at ``dest/<name>`` and that path is returned; a directory or prefix fills ``dest`` and
    ``dest`` is returned. Every target is checked before anything is written: a key containing ``..``, an
    absolute path or a link out raises UnsafePathError and nothing is written outside (or inside) ``dest``.

    Each file is verified (size, and SHA-256 / MD5 from the source's manifest, object metadata or ETag) before it
    is renamed into place; a re-run skips files that are already there and verified. A source manifest is copied
    last, so ``dest`` is complete exactly when it has one. ``require_manifest`` refuses a directory without one.
    """
    dest = Path(dest)
    if is_s3(uri):
        return _download_s3(uri, dest, require_manifest)
    src = _local(uri)
    if src.is_file():
        target = _plan(dest, [(src.name, str(src))])[0]
        _fetch(target, _hash_file(src), lambda tmp: shutil.copyfile(src, tmp), str(src))
        return target
    if not src.is_dir():
        raise FileNotFoundError(f"no such file or directory: {uri}")
    found = dict(_walk_files(src))
    manifest_path = found.get(MANIFEST)
    manifest = parse_manifest(manifest_path.read_bytes(), str(manifest_path)) if manifest_path else None
    listing = {rel: (str(path), path.stat().st_size) for rel, path in found.items()}
    names, targets = _select(str(src), listing, manifest, dest, require_manifest)
    _begin(dest)
    for rel, target in zip(names, targets, strict=True):
        path = found[rel]
        want = manifest[rel] if manifest is not None else _hash_file(path)
        _fetch(target, want, lambda tmp, p=path: shutil.copyfile(p, tmp), str(path))
    if manifest_path is not None:
        _atomic_write(dest / MANIFEST, manifest_path.read_bytes())
    return dest.resolve()


def _begin(dest: Path) -> None:
    """Before filling ``dest``: drop an old manifest (``dest`` is not complete while it changes) and the
    temporary files of a transfer that was killed."""
    _remove_partials(dest)
    (dest / MANIFEST).unlink(missing_ok=True)


def _download_s3(uri: str, dest: Path, require_manifest: bool) -> Path:
    client = s3_client()
    bucket, _ = split_s3(uri)
    head, objects = _s3_listing(uri, client)
    if head is not None:
        key = objects[0].key
        target = _plan(dest, [(objects[0].rel, uri)])[0]
        _fetch(target, _want_from_head(head), lambda tmp: client.download_file(bucket, key, tmp), uri)
        return target
    by_rel = {o.rel: o for o in objects}
    manifest_obj = by_rel.get(MANIFEST)
    manifest_data = _get_bytes(client, bucket, manifest_obj.key) if manifest_obj else None
    manifest = None
    if manifest_obj is not None and manifest_data is not None:
        manifest = parse_manifest(manifest_data, f"s3://{bucket}/{manifest_obj.key}")
    listing = {o.rel: (f"s3://{bucket}/{o.key}", o.size) for o in objects}
    names, targets = _select(uri, listing, manifest, dest, require_manifest)
    _begin(dest)
    for rel, target in zip(names, targets, strict=True):
        key = by_rel[rel].key
        if manifest is not None:
            want = manifest[rel]
        else:  # no manifest: the object's own metadata and ETag say what it must be
            want = _want_from_head(client.head_object(Bucket=bucket, Key=key))
        _fetch(target, want, lambda tmp, k=key: client.download_file(bucket, k, tmp), listing[rel][0])
    if manifest_data is not None:
        _atomic_write(dest / MANIFEST, manifest_data)
    return dest.resolve()


# ------------------------------------------------------------------------------------------------- writing


@dataclass
class Transfer:
    """What a directory upload did: files sent, and files skipped because they were already there, verified."""

    sent: list[str]
    skipped: list[str]


def upload_dir(local_dir: str | Path, uri: str, *, manifest: bool = True) -> Transfer:
    """Copy every file under ``local_dir`` to ``uri`` (an s3 prefix or a local directory), keeping the layout.

    Resumable: files already at ``uri`` with the same size and checksum are skipped. Every file is verified
    after the copy, and the directory's manifest (:data:`MANIFEST`) is written last -- after an existing one was
    removed first, so a reader never takes a directory that is being rewritten for a complete one. Links out of
    ``local_dir`` raise UnsafePathError before anything is sent. ``manifest=False`` writes no manifest.
    """
    root = _local(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {local_dir}")
    found = dict(_walk_files(root))
    found.pop(MANIFEST, None)
    files = {rel: _hash_file(path) for rel, path in found.items()}
    if is_s3(uri):
        return _upload_s3(root, found, files, uri, manifest)
    dest = _local(uri)
    targets = _plan(dest, [(rel, str(path)) for rel, path in sorted(found.items())])
    _begin(dest)
    sent, skipped = [], []
    for (rel, path), target in zip(sorted(found.items()), targets, strict=True):
        copied = _fetch(target, files[rel], lambda tmp, p=path: shutil.copyfile(p, tmp), str(path))
        (sent if copied else skipped).append(rel)
    if manifest:
        _atomic_write(dest / MANIFEST, manifest_bytes(files))
    return Transfer(sent, skipped)


def _upload_s3(
    root: Path, found: dict[str, Path], files: dict[str, FileInfo], uri: str, manifest: bool
) -> Transfer:
    bucket, key = split_s3(uri)
    prefix = _dir_prefix(key)
    client = s3_client()
    existing = {o["Key"][len(prefix) :]: o for o in _s3_objects(bucket, prefix, client)}
    if MANIFEST in existing:
        old = parse_manifest(_get_bytes(client, bucket, prefix + MANIFEST), uri)
        sizes = {rel: int(o["Size"]) for rel, o in existing.items()}
        etags = {rel: str(o.get("ETag", "")) for rel, o in existing.items()}
        if manifest and old == files and not listing_problems(files, sizes, etags, allow_extra=True):
            return Transfer([], sorted(files))  # already there, complete
        client.delete_object(Bucket=bucket, Key=prefix + MANIFEST)
    sent, skipped = [], []
    for rel, path in sorted(found.items()):
        info, obj = files[rel], existing.get(rel)
        if obj is not None and _already_there(client, bucket, prefix + rel, obj, info):
            skipped.append(rel)
            continue
        _send(client, path, bucket, prefix + rel, info)
        sent.append(rel)
    problems = _s3_problems(client, bucket, prefix, files)
    if problems:
        raise IntegrityError(
            f"{uri} does not match what was uploaded from {root}: "
            + "; ".join(problems[:10])
            + f"; no {MANIFEST} was written, run the upload again to resume"
        )
    if manifest:
        _put_bytes(client, bucket, prefix + MANIFEST, manifest_bytes(files))
    return Transfer(sent, skipped)


def _send(client: Any, path: Path, bucket: str, key: str, info: FileInfo) -> None:
    """Upload one file with its SHA-256 as metadata. A failure whose request did reach the store (a lost
    response) is checked with a HEAD; otherwise the file is sent again, :data:`FETCH_ATTEMPTS` times at most."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": info.sha256}})
            return
        except (S3UploadFailedError, ClientError, *_transient_errors()) as exc:
            if attempt == FETCH_ATTEMPTS:
                raise
            log.warning("s3://%s/%s: upload attempt %d failed (%s)", bucket, key, attempt, exc)
            try:
                head = client.head_object(Bucket=bucket, Key=key)
            except ClientError:
                continue
            obj = {"Size": head.get("ContentLength"), "ETag": head.get("ETag", "")}
            if _already_there(client, bucket, key, obj, info):
                return


def _already_there(client: Any, bucket: str, key: str, obj: dict[str, Any], info: FileInfo) -> bool:
    """An object that already holds ``info``'s content: same size and MD5 ETag, or our SHA-256 metadata."""
    if int(obj.get("Size", -1)) != info.size:
        return False
    if _plain_md5(str(obj.get("ETag", ""))) == info.md5:
        return True
    head = client.head_object(Bucket=bucket, Key=key)
    return _want_from_head(head).sha256 == info.sha256


def _s3_problems(client: Any, bucket: str, prefix: str, files: dict[str, FileInfo]) -> list[str]:
    """What is wrong with the uploaded objects: missing, wrong size, or content that is not ``files``'. An ETag
    that is not the file's MD5 (multipart uploads, SSE-KMS, SSE-C) sends us to our SHA-256 metadata instead."""
    objects = {o["Key"][len(prefix) :]: o for o in _s3_objects(bucket, prefix, client)}
    problems = []
    for rel, info in sorted(files.items()):
        obj = objects.get(rel)
        if obj is None:
            problems.append(f"{rel}: missing")
        elif int(obj.get("Size", -1)) != info.size:
            problems.append(f"{rel}: {obj.get('Size')} bytes, expected {info.size}")
        elif not _already_there(client, bucket, prefix + rel, obj, info):
            problems.append(f"{rel}: checksum differs")
    return problems


# --------------------------------------------------------------------------------------------------- caching


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
        return _local(uri)
    client = s3_client()
    single, entries = _s3_entries(uri, client)
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
    with _DirectoryLock(entry):
        if fresh():  # another process filled it while we waited
            return result
        marker.unlink(missing_ok=True)
        download(uri, entry, require_manifest=require_manifest)
        keep = {entries[0][1]} if single else {rel for _, rel, _ in entries}
        for rel, path in _walk_files(entry):
            if rel not in keep:  # left from an older version of the prefix
                path.unlink()
        _atomic_write(marker, listing.encode("utf-8"))
    return result


class _DirectoryLock:
    """An exclusive advisory lock on a directory for the life of a ``with`` block (no lock where unsupported)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _DirectoryLock:
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


# --------------------------------------------------------------------------------------------------- hashing


def _hash_stream(uri: str) -> str:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3_client()
        problem = ""
        for _ in range(FETCH_ATTEMPTS):
            digest = hashlib.sha256()
            try:
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
                for chunk in body.iter_chunks(_CHUNK):
                    digest.update(chunk)
                return digest.hexdigest()
            except _transient_errors() as exc:
                problem = f"{type(exc).__name__}: {exc}"
        raise IntegrityError(f"{uri}: could not be read whole in {FETCH_ATTEMPTS} attempts ({problem})")
    return _hash_file(_local(uri)).sha256


def sha256_of(uri: str) -> str:
    """A content hash for lineage: a file's own SHA-256, or for a directory / prefix a SHA-256 over the sorted
    ``relative/path\\0<sha256 of content>\\n`` lines, so the same tree hashes the same locally and on S3. The
    top-level manifest describes the content and is not part of it."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        single, entries = _s3_entries(uri, s3_client())
        if single:
            return _hash_stream(uri)
        pairs = [(rel, f"s3://{bucket}/{key}") for key, rel, _ in entries if rel != MANIFEST]
    else:
        path = _local(uri)
        if path.is_file():
            return _hash_stream(str(path))
        if not path.is_dir():
            raise FileNotFoundError(f"no such file or directory: {uri}")
        pairs = [(rel, str(p)) for rel, p in _walk_files(path) if rel != MANIFEST]
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
        files = [(root.name, root)] if root.is_file() else _walk_files(root)
        for rel, path in files:
            stat = path.stat()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]
