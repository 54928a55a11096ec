"""Local files: atomic writes, hashing, and walking or filling a directory without ever leaving it.

A file lands in a temporary sibling (``.<name>.<random>.preftune-partial``) and is renamed into place only when
complete, so a partial file never sits under its real name. Links are followed only while they stay inside the
directory they are in; anything else raises :class:`UnsafePathError` before the first byte is written.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path, PurePosixPath

from preftune.io.storage.integrity import AlreadyExistsError, FileInfo, UnsafePathError

PARTIAL_SUFFIX = ".preftune-partial"
CHUNK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def publish_file(tmp: str | Path, target: str | Path) -> None:
    """Move a finished temporary file into place atomically, with the usual umask permissions
    (``mkstemp`` creates files readable by their owner only, which other pipeline containers may not be)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, target)


def walk_files(root: Path) -> list[tuple[str, Path]]:
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


def hash_file(path: Path) -> FileInfo:
    """Size, SHA-256 and MD5 of one file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            sha.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return FileInfo(size, sha.hexdigest(), md5.hexdigest())


def mismatch(path: Path, want: FileInfo) -> str | None:
    """Why ``path`` is not the file described by ``want`` (None when it is, as far as ``want`` can tell)."""
    size = path.stat().st_size
    if size != want.size:
        return f"{size} bytes, expected {want.size}"
    if not (want.sha256 or want.md5):
        return None
    got = hash_file(path)
    if want.sha256 and got.sha256 != want.sha256:
        return "SHA-256 differs"
    if want.md5 and got.md5 != want.md5:
        return "MD5 differs"
    return None


def verified(path: Path, want: FileInfo) -> bool:
    """True for a file that exists and matches a checksum (size alone proves too little to skip a fetch)."""
    return path.is_file() and bool(want.sha256 or want.md5) and mismatch(path, want) is None


def remove_partials(dest: Path) -> None:
    """Delete temporary files a killed transfer left in ``dest`` (only ours: they carry PARTIAL_SUFFIX)."""
    if dest.is_dir():
        for path in dest.rglob(f"*{PARTIAL_SUFFIX}"):
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)


def temporary_sibling(path: Path) -> str:
    """A new, empty temporary file beside ``path`` (creating its directory), named so cleanup can find it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, *, create_only: bool = False) -> None:
    """Write through a temporary sibling then rename, so readers never see half a file.

    ``create_only`` links the finished file into place instead, which fails with AlreadyExistsError when
    ``path`` exists (a hard link never replaces a file, so two writers cannot both win).
    """
    tmp = temporary_sibling(path)
    try:
        Path(tmp).write_bytes(data)
        if not create_only:
            publish_file(tmp, path)
            return
        os.chmod(tmp, 0o666 & ~_UMASK)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AlreadyExistsError(f"{path} already exists") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def safe_target(dest: Path, relative: str, source: str) -> Path:
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


def plan_targets(dest: Path, items: list[tuple[str, str]]) -> list[Path]:
    """Checked targets for ``(relative path, source)`` items: every one inside ``dest``, none both a file and
    a directory. Raises before anything is written."""
    targets = [safe_target(dest, rel, source) for rel, source in items]
    names = {PurePosixPath(rel) for rel, _ in items}
    for rel, source in items:
        for parent in PurePosixPath(rel).parents:
            if parent in names:
                raise UnsafePathError(
                    f"refusing to download {source}: {parent} is both a file and a directory"
                )
    return targets
