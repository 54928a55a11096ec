"""One file, or one listing, wherever it lives: read, write, list, test for and delete by URI.

Local paths (plain or ``file://``) and ``s3://`` URIs behave the same; S3 goes through :mod:`.s3`, so its retries
and checks apply here too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from preftune.io.storage import s3
from preftune.io.storage.local import atomic_write, hash_file, publish_file, walk_files
from preftune.io.storage.manifests import MANIFEST
from preftune.io.storage.uris import dir_prefix, is_s3, split_s3, to_path


def list_files(uri: str) -> list[str]:
    """Every file under a local file / directory / s3 object / s3 prefix, as URIs, sorted.

    Local results are plain paths (``file://`` is stripped); s3 results are ``s3://bucket/key``.
    """
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        _, entries = s3.entries(uri, s3.s3_client())
        return [f"s3://{bucket}/{key}" for key, _, _ in entries]
    path = to_path(uri)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return [str(p) for _, p in walk_files(path)]
    raise FileNotFoundError(f"no such file or directory: {uri}")


def sizes(uri: str) -> dict[str, int]:
    """The size in bytes of every file :func:`list_files` lists (one listing on S3, one stat per local file)."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        _, objects = s3.listing(uri, s3.s3_client())
        return {f"s3://{bucket}/{o.key}": o.size for o in objects}
    return {f: Path(f).stat().st_size for f in list_files(uri)}


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate sub-directories of a local directory or s3 prefix, sorted; [] when it is absent."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3.list_prefixes(bucket, dir_prefix(key), s3.s3_client())
    root = to_path(uri)
    return (
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()) if root.is_dir() else []
    )


def exists(uri: str) -> bool:
    """Whether anything is stored at ``uri``: a file, a directory holding anything, an s3 object, or a prefix
    with objects under it. An empty local directory holds nothing (S3 has no empty prefixes to compare with)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3.s3_client()
        return s3.exact_object(bucket, key, client) is not None or s3.has_objects(
            bucket, dir_prefix(key), client
        )
    path = to_path(uri)
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def remove_tree(uri: str) -> None:
    """Delete a local directory or every object under an s3 prefix, its manifest first: a directory half
    deleted is never taken for a complete one."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3.s3_client()
        prefix = dir_prefix(key)
        client.delete_object(Bucket=bucket, Key=prefix + MANIFEST)
        s3.delete_keys(client, bucket, [obj["Key"] for obj in s3.iter_objects(bucket, prefix, client)])
        return
    root = to_path(uri)
    (root / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)


def read_bytes(uri: str) -> bytes:
    """The whole content of one file (local or s3 object)."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        client = s3.s3_client()
        try:
            return s3.get_bytes(client, bucket, key)
        except client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"no such S3 object: {uri}") from exc
    return to_path(uri).read_bytes()


def write_bytes(uri: str, data: bytes, *, create_only: bool = False) -> None:
    """Write one file (local: atomically, creating parent directories; s3: one put_object, MD5-checked).

    ``create_only`` never replaces an existing file: AlreadyExistsError when one is there (on S3 through a
    conditional put, where the store supports one). It is how a writer claims a name against racing writers.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"cannot write a file to an S3 prefix: {uri!r}")
        s3.put_bytes(s3.s3_client(), bucket, key, data, create_only=create_only)
        return
    atomic_write(to_path(uri), data, create_only=create_only)


def put_file(local: str | Path, uri: str) -> None:
    """Move a finished local file to ``uri``: renamed into place locally, uploaded (checked) to S3 and then
    deleted. Large outputs are written to a local temporary file first and never held in memory."""
    if is_s3(uri):
        bucket, key = split_s3(uri)
        if not key or key.endswith("/"):
            raise ValueError(f"cannot write a file to an S3 prefix: {uri!r}")
        s3.send(s3.s3_client(), Path(local), bucket, key, hash_file(Path(local)))
        Path(local).unlink(missing_ok=True)
        return
    target = to_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    publish_file(local, target)
