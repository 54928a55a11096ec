"""Whole files and directories moved between local paths and S3: verified, resumable, never half-visible.

* every file lands in a temporary sibling and is renamed into place only after its size and checksum were
  verified (:func:`fetch`), :data:`~preftune.io.storage.s3.FETCH_ATTEMPTS` whole-file attempts at most;
* a directory upload writes its manifest **last**, after removing an old one first, so a reader never takes a
  directory that is being (re)written for a complete one; a download copies the source's manifest last too;
* a re-run skips files already present and verified and re-fetches partial or mismatched ones;
* every target is checked before the first byte is written: keys with ``..``, absolute keys, backslashes, a key
  that is both a file and a directory, and links leading out raise UnsafePathError.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from preftune.io.storage import s3
from preftune.io.storage.integrity import FileInfo, IntegrityError
from preftune.io.storage.local import (
    atomic_write,
    hash_file,
    mismatch,
    plan_targets,
    publish_file,
    remove_partials,
    safe_target,
    temporary_sibling,
    verified,
    walk_files,
)
from preftune.io.storage.manifests import (
    MANIFEST,
    listing_problems,
    manifest_bytes,
    parse_manifest,
    select,
)
from preftune.io.storage.uris import dir_prefix, is_s3, split_s3, to_path

log = logging.getLogger(__name__)


def fetch(target: Path, want: FileInfo, transfer: Callable[[str], None], source: str) -> bool:
    """Put ``source`` at ``target`` through a verified temporary file; False when ``target`` already matched.

    ``transfer(tmp)`` writes the bytes to ``tmp``. Bounded: FETCH_ATTEMPTS whole-file attempts, then
    IntegrityError (``target`` untouched).
    """
    if verified(target, want):
        return False
    transient = s3.transient_errors()
    problem = ""
    for attempt in range(1, s3.FETCH_ATTEMPTS + 1):
        tmp = temporary_sibling(target)
        try:
            transfer(tmp)
            problem = mismatch(Path(tmp), want) or ""
            if not problem:
                publish_file(tmp, target)
                return True
        except transient as exc:
            problem = f"{type(exc).__name__}: {exc}"
        finally:
            Path(tmp).unlink(missing_ok=True)
        log.warning("%s: attempt %d of %d failed (%s)", source, attempt, s3.FETCH_ATTEMPTS, problem)
    raise IntegrityError(
        f"{source}: could not be transferred intact in {s3.FETCH_ATTEMPTS} attempts ({problem}); "
        f"{target} was not written"
    )


def begin(dest: Path) -> None:
    """Before filling ``dest``: drop an old manifest (``dest`` is not complete while it changes) and the
    temporary files of a transfer that was killed."""
    remove_partials(dest)
    (dest / MANIFEST).unlink(missing_ok=True)


def _copy_from(path: Path) -> Callable[[str], None]:
    return lambda tmp: shutil.copyfile(path, tmp)


# --------------------------------------------------------------------------------------------------- reading


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
    src = to_path(uri)
    if src.is_file():
        target = plan_targets(dest, [(src.name, str(src))])[0]
        fetch(target, hash_file(src), _copy_from(src), str(src))
        return target
    if not src.is_dir():
        raise FileNotFoundError(f"no such file or directory: {uri}")
    found = dict(walk_files(src))
    manifest_path = found.get(MANIFEST)
    manifest = parse_manifest(manifest_path.read_bytes(), str(manifest_path)) if manifest_path else None
    listing = {rel: (str(path), path.stat().st_size) for rel, path in found.items()}
    names, targets = select(str(src), listing, manifest, dest, require_manifest)
    begin(dest)
    for rel, target in zip(names, targets, strict=True):
        path = found[rel]
        want = manifest[rel] if manifest is not None else hash_file(path)
        fetch(target, want, _copy_from(path), str(path))
    if manifest_path is not None:
        atomic_write(dest / MANIFEST, manifest_path.read_bytes())
    return dest.resolve()


def _download_s3(uri: str, dest: Path, require_manifest: bool) -> Path:
    client = s3.s3_client()
    bucket, _ = split_s3(uri)
    head, objects = s3.listing(uri, client)
    if head is not None:
        key = objects[0].key
        target = plan_targets(dest, [(objects[0].rel, uri)])[0]
        fetch(target, s3.want_from_head(head), lambda tmp: client.download_file(bucket, key, tmp), uri)
        return target
    by_rel = {o.rel: o for o in objects}
    manifest_obj = by_rel.get(MANIFEST)
    manifest_data = s3.get_bytes(client, bucket, manifest_obj.key) if manifest_obj else None
    manifest = None
    if manifest_obj is not None and manifest_data is not None:
        manifest = parse_manifest(manifest_data, f"s3://{bucket}/{manifest_obj.key}")
    listing = {o.rel: (f"s3://{bucket}/{o.key}", o.size) for o in objects}
    names, targets = select(uri, listing, manifest, dest, require_manifest)
    begin(dest)
    for rel, target in zip(names, targets, strict=True):
        key = by_rel[rel].key
        if manifest is not None:
            want = manifest[rel]
        else:  # no manifest: the object's own metadata and ETag say what it must be
            want = s3.want_from_head(client.head_object(Bucket=bucket, Key=key))
        fetch(target, want, lambda tmp, k=key: client.download_file(bucket, k, tmp), listing[rel][0])
    if manifest_data is not None:
        atomic_write(dest / MANIFEST, manifest_data)
    return dest.resolve()


# --------------------------------------------------------------------------------------------------- writing


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
    root = to_path(local_dir)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {local_dir}")
    found = dict(walk_files(root))
    found.pop(MANIFEST, None)
    files = {rel: hash_file(path) for rel, path in found.items()}
    if is_s3(uri):
        return _upload_s3(root, found, files, uri, manifest)
    dest = to_path(uri)
    targets = plan_targets(dest, [(rel, str(path)) for rel, path in sorted(found.items())])
    begin(dest)
    sent, skipped = [], []
    for (rel, path), target in zip(sorted(found.items()), targets, strict=True):
        copied = fetch(target, files[rel], _copy_from(path), str(path))
        (sent if copied else skipped).append(rel)
    if manifest:
        atomic_write(dest / MANIFEST, manifest_bytes(files))
    return Transfer(sent, skipped)


def _upload_s3(
    root: Path, found: dict[str, Path], files: dict[str, FileInfo], uri: str, manifest: bool
) -> Transfer:
    bucket, key = split_s3(uri)
    prefix = dir_prefix(key)
    client = s3.s3_client()
    existing = {o["Key"][len(prefix) :]: o for o in s3.iter_objects(bucket, prefix, client)}
    if MANIFEST in existing:
        old = parse_manifest(s3.get_bytes(client, bucket, prefix + MANIFEST), uri)
        sizes = {rel: int(o["Size"]) for rel, o in existing.items()}
        etags = {rel: str(o.get("ETag", "")) for rel, o in existing.items()}
        if manifest and old == files and not listing_problems(files, sizes, etags, allow_extra=True):
            return Transfer([], sorted(files))  # already there, complete
        client.delete_object(Bucket=bucket, Key=prefix + MANIFEST)
    sent, skipped = [], []
    for rel, path in sorted(found.items()):
        info, obj = files[rel], existing.get(rel)
        if obj is not None and s3.already_there(client, bucket, prefix + rel, obj, info):
            skipped.append(rel)
            continue
        s3.send(client, path, bucket, prefix + rel, info)
        sent.append(rel)
    problems = s3.problems(client, bucket, prefix, files)
    if problems:
        raise IntegrityError(
            f"{uri} does not match what was uploaded from {root}: "
            + "; ".join(problems[:10])
            + f"; no {MANIFEST} was written, run the upload again to resume"
        )
    if manifest:
        s3.put_bytes(client, bucket, prefix + MANIFEST, manifest_bytes(files))
    return Transfer(sent, skipped)


def copy_dir(src_uri: str, dest_uri: str, files: dict[str, FileInfo]) -> None:
    """Copy the files ``files`` lists from one directory to another of the same store, verified; no manifest.

    On S3 the copies are server-side (no bytes pass through this process) and keep each object's metadata.
    Afterwards ``dest_uri`` must hold exactly ``files``: a missing, different or unexpected file (another
    writer in the same place) raises IntegrityError. Callers that want the copy to be complete write its
    manifest themselves, after this returns.
    """
    if is_s3(src_uri) != is_s3(dest_uri):
        raise ValueError(
            f"copy_dir copies within one store; {src_uri} -> {dest_uri}: use upload_dir or download"
        )
    names = sorted(files)
    if is_s3(src_uri):
        src_bucket, src_key = split_s3(src_uri)
        bucket, key = split_s3(dest_uri)
        client = s3.s3_client()
        for rel in names:
            s3.copy_object(client, bucket, dir_prefix(src_key) + rel, dir_prefix(key) + rel, src_bucket)
        problems = s3.problems(client, bucket, dir_prefix(key), files, allow_extra=False)
    else:
        src, dest = to_path(src_uri), to_path(dest_uri)
        targets = plan_targets(dest, [(rel, str(src / rel)) for rel in names])
        for rel, target in zip(names, targets, strict=True):
            fetch(target, files[rel], _copy_from(safe_target(src, rel, str(src / rel))), str(src / rel))
        problems = [f"{rel}: unexpected file" for rel, _ in walk_files(dest) if rel not in files]
    if problems:
        raise IntegrityError(
            f"{dest_uri} does not match {src_uri} after the copy: " + "; ".join(problems[:10])
        )
