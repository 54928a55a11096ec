"""Directory manifests: ``_COMPLETE.json``, written last, says a directory is complete and what it holds.

A manifest lists the size, SHA-256 and MD5 of every file. A directory with one is complete; one without is either
still being written, or was not written by preftune (KFP's launcher uploads artifacts without one). Readers
verify against the manifest when there is one and against the listing (sizes, MD5 ETags) otherwise. The format
is shared with :mod:`preftune.io.registry`, whose versions are directories of the same kind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from preftune.io.storage import s3
from preftune.io.storage.integrity import FileInfo, IncompleteError, IntegrityError
from preftune.io.storage.local import hash_file, plan_targets, walk_files
from preftune.io.storage.uris import dir_prefix, is_s3, split_s3, to_path

log = logging.getLogger(__name__)

MANIFEST = "_COMPLETE.json"


def inventory(root: str | Path) -> dict[str, FileInfo]:
    """Size, SHA-256 and MD5 of every file under a local directory, by relative path; the top-level manifest is
    not content and is left out. Links follow the rules of the transfers (see :mod:`preftune.io.storage`)."""
    return {rel: hash_file(path) for rel, path in walk_files(Path(root)) if rel != MANIFEST}


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
        client = s3.s3_client()
        manifest_key = dir_prefix(key) + MANIFEST
        try:
            data = s3.get_bytes(client, bucket, manifest_key)
        except client.exceptions.NoSuchKey:
            return None
        return parse_manifest(data, f"s3://{bucket}/{manifest_key}")
    path = to_path(uri) / MANIFEST
    return parse_manifest(path.read_bytes(), str(path)) if path.is_file() else None


def listing_problems(
    files: dict[str, FileInfo], sizes: dict[str, int], etags: dict[str, str], *, allow_extra: bool = False
) -> list[str]:
    """What is wrong with a listing that should hold ``files``: missing files, wrong sizes, MD5 ETags that
    differ (only where the ETag is a plain MD5), and -- unless ``allow_extra`` -- files that should not be there
    (the manifest itself aside)."""
    problems = []
    for name, info in sorted(files.items()):
        etag = s3.plain_md5(etags.get(name, ""))
        if name not in sizes:
            problems.append(f"{name}: missing")
        elif sizes[name] != info.size:
            problems.append(f"{name}: {sizes[name]} bytes, expected {info.size}")
        elif etag and info.md5 and etag != info.md5:
            problems.append(f"{name}: checksum differs")
    if not allow_extra:
        problems += [f"{name}: unexpected file" for name in sorted(set(sizes) - set(files) - {MANIFEST})]
    return problems


def select(
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
    targets = plan_targets(
        dest, [(rel, listing[rel][0] if rel in listing else f"{uri}{sep}{rel}") for rel in names]
    )
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
