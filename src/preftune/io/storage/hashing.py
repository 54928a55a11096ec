"""Identities of the data behind a URI: a content hash for lineage, and a cheap fingerprint for cache keys.

Both are the same for the same tree locally and on S3, so a model copied between them keeps its lineage hash.
"""

from __future__ import annotations

import hashlib

from preftune.io.storage import s3
from preftune.io.storage.local import hash_file, walk_files
from preftune.io.storage.manifests import MANIFEST
from preftune.io.storage.uris import is_s3, split_s3, to_path


def sha256_of(uri: str) -> str:
    """A content hash for lineage: a file's own SHA-256, or for a directory / prefix a SHA-256 over the sorted
    ``relative/path\\0<sha256 of content>\\n`` lines, so the same tree hashes the same locally and on S3. The
    top-level manifest describes the content and is not part of it."""
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        client = s3.s3_client()
        single, entries = s3.entries(uri, client)
        if single:
            return s3.sha256_stream(bucket, entries[0][0], client)
        lines = [(rel, s3.sha256_stream(bucket, key, client)) for key, rel, _ in entries if rel != MANIFEST]
    else:
        path = to_path(uri)
        if path.is_file():
            return hash_file(path).sha256
        if not path.is_dir():
            raise FileNotFoundError(f"no such file or directory: {uri}")
        lines = [(rel, hash_file(p).sha256) for rel, p in walk_files(path) if rel != MANIFEST]
    digest = hashlib.sha256()
    for rel, sha256 in lines:
        digest.update(f"{rel}\0{sha256}\n".encode())
    return digest.hexdigest()


def fingerprint(uri: str) -> str:
    """A cheap identity of the data behind a URI: changes whenever a file is added, removed or rewritten.

    Listing metadata only (S3 ETags; local sizes and modification times), so a nightly run can tell whether its
    input changed without reading it. Pipelines feed it into the ingest steps' cache keys.
    """
    digest = hashlib.sha256()
    if is_s3(uri):
        _, entries = s3.entries(uri, s3.s3_client())
        for key, _, etag in entries:
            digest.update(f"{key}\0{etag}\n".encode())
    else:
        root = to_path(uri)
        if not root.exists():
            raise FileNotFoundError(f"no such file or directory: {uri}")
        files = [(root.name, root)] if root.is_file() else walk_files(root)
        for rel, path in files:
            stat = path.stat()
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]
