"""The s3 backend: preftune's own registry layout in object storage or a local folder, no server.

Layout under ``<registry_uri>/<model_name>/`` (``registry_uri`` is a local path, ``file://`` or ``s3://``)::

    champion.json              pointer: version, uri, metrics, promoted_at, run_id, decision, previous
    v1/ v2/ ...                model files, README.md (model card), lineage.json, metrics.json, _COMPLETE.json
    .staging/<promotion id>/   uploads in progress (or left by a promotion that died)
    .claims/v<N>.json          on S3: the promotion that claimed number N and is copying into v<N>/

A version is *visible* only when its ``_COMPLETE.json`` manifest exists; every listing ignores the others.
A promotion publishes in an order that keeps one killed at any point harmless:

1. every file of the bundle goes to ``.staging/<promotion id>/`` through
   :func:`preftune.io.storage.upload_dir`, which verifies each one (size and checksum) with storage's retries;
2. the version number is ``max(visible versions) + 1``, skipping any ``v<N>/`` that already holds files (a
   partial left by a killed or concurrent promotion never blocks, and nothing is mixed into it). Locally the
   staging directory, manifest included, is renamed to ``v<N>`` in one atomic step. On S3 (which has no
   rename) the number is first claimed with a create-only ``.claims/v<N>.json`` (``If-None-Match: *``), so no
   two promotions ever copy into the same folder; then the files are copied server-side and checked
   (:func:`preftune.io.storage.copy_dir`), the manifest is written **last**, create-only, and the claim
   removed;
3. only then does ``champion.json`` move, by compare-and-swap (:mod:`.conditional`: ``If-Match`` on its ETag
   on S3, a locked check locally). A promotion whose write lost re-reads the pointer and tries again on top of
   the winner, so the champion is always exactly one version and each pointer's ``previous`` is the champion
   it replaced -- unless the gate compared the candidate with a champion that is no longer current: then the
   version stays published and the promotion fails with StaleChampionError.

A crash before step 3 leaves the old champion in place and no visible new version; the next promotion takes
the next free number. Leftover staging or partial version files are inert; ``remove_partials`` deletes them.
Every byte goes through :mod:`preftune.io.storage`: one S3 code path, one rule for local paths.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.io import storage
from preftune.io.registry import conditional
from preftune.io.registry.interface import RegistryError, check_expected, dumps, loads, now

log = logging.getLogger(__name__)

MANIFEST = storage.MANIFEST  # one manifest format for registry versions and uploaded directories
CHAMPION = "champion.json"
STAGING = ".staging"
CLAIMS = ".claims"
_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_MODEL_DIR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # what check_model_name accepts
_MAX_VERSION_TRIES = 1000
_MAX_POINTER_TRIES = 100


class StoreBackend:
    """A registry root and the operations the protocol needs, all through :mod:`preftune.io.storage`."""

    def __init__(self, registry_uri: str) -> None:
        if not registry_uri or not str(registry_uri).strip():
            raise ValueError("registry_uri is empty: give a local directory or an s3://bucket/prefix")
        self.s3 = storage.is_s3(registry_uri)
        self.root = registry_uri.rstrip("/") if self.s3 else str(storage.local_path(registry_uri))

    def uri(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.s3 else str(Path(self.root) / rel)

    def read(self, rel: str) -> bytes | None:
        try:
            return storage.read_bytes(self.uri(rel))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    # ---------------------------------------------------------------------------------------- the interface

    def publish(self, bundle: Path, record: dict[str, Any], expected_champion: str | None) -> dict[str, Any]:
        model = record["model_name"]
        staging = f"{model}/{STAGING}/{record['promotion_id']}"
        try:
            version = self._commit(bundle, staging, record)
        finally:
            _quietly(storage.remove_tree, self.uri(staging))
        entry = dict(record, version=version, uri=self.uri(f"{model}/v{version}"))
        pointer = self._move_champion(model, entry, expected_champion)
        log.info("promoted %s as %s v%d (%s)", record["source_uri"], model, version, pointer["uri"])
        return pointer

    def models(self) -> list[str]:
        return sorted(name for name in storage.list_dirs(self.root) if _MODEL_DIR.match(name))

    def champion(self, model: str) -> dict[str, Any] | None:
        return loads(self.read(f"{model}/{CHAMPION}"))

    def versions(self, model: str) -> list[dict[str, Any]]:
        found = []
        for name in storage.list_dirs(self.uri(model)):
            match = _VERSION.match(name)
            if not match:
                continue
            manifest = loads(self.read(f"{model}/{name}/{MANIFEST}"))
            if manifest is None:
                continue  # not committed: a promotion in progress or one that died
            manifest["version"] = int(match.group(1))
            manifest["uri"] = self.uri(f"{model}/{name}")
            found.append(manifest)
        return sorted(found, key=lambda m: m["version"])

    def set_champion(self, model: str, version: int, reason: str) -> dict[str, Any]:
        versions = {v["version"]: v for v in self.versions(model)}
        if version not in versions:
            raise RegistryError(f"{model} has no complete version v{version}; versions: {sorted(versions)}")
        entry = dict(versions[version], promoted_at=now(), reason=reason)
        return self._move_champion(model, entry, None)

    def remove_partials(self, model: str) -> list[str]:
        removed = []
        for name in storage.list_dirs(self.uri(f"{model}/{STAGING}")):
            storage.remove_tree(self.uri(f"{model}/{STAGING}/{name}"))
            removed.append(self.uri(f"{model}/{STAGING}/{name}"))
        for name in storage.list_dirs(self.uri(model)):
            if _VERSION.match(name) and self.read(f"{model}/{name}/{MANIFEST}") is None:
                storage.remove_tree(self.uri(f"{model}/{name}"))
                removed.append(self.uri(f"{model}/{name}"))
        for claim in _listing(self.uri(f"{model}/{CLAIMS}")) if self.s3 else []:
            name = claim.rsplit("/", 1)[-1].removesuffix(".json")
            if self.read(f"{model}/{name}/{MANIFEST}") is None:  # a claim whose promotion died
                conditional.remove(claim)
                removed.append(claim)
        return removed

    # --------------------------------------------------------------------------------------- the version

    def next_version(self, model: str) -> int:
        """max(visible) + 1, then past any number whose folder holds files (a partial never blocks)."""
        version = max((v["version"] for v in self.versions(model)), default=0) + 1
        while storage.exists(self.uri(f"{model}/v{version}")) or (
            self.s3 and storage.exists(self._claim_uri(model, version))
        ):
            version += 1
        return version

    def _claim_uri(self, model: str, version: int) -> str:
        return self.uri(f"{model}/{CLAIMS}/v{version}.json")

    def _commit(self, bundle: Path, staging: str, record: dict[str, Any]) -> int:
        """Stage the bundle, every file verified, and commit it as the next version."""
        files = storage.inventory(bundle)
        manifest = dict(record, files={k: vars(v) for k, v in files.items()})
        try:
            storage.upload_dir(bundle, self.uri(staging), manifest=False)  # a staging folder is no version
            if self.s3:
                return self._commit_s3(staging, record, files, manifest)
            return self._rename(staging, record["model_name"], manifest)
        except storage.IntegrityError as exc:
            raise RegistryError(f"{self.uri(staging)}: the upload could not be verified ({exc})") from exc

    def _rename(self, staging: str, model: str, manifest: dict[str, Any]) -> int:
        src = Path(self.uri(staging))
        for _ in range(_MAX_VERSION_TRIES):
            version = self.next_version(model)
            (src / MANIFEST).write_bytes(dumps(dict(manifest, version=version)))
            target = Path(self.uri(f"{model}/v{version}"))
            if target.exists() and any(target.iterdir()):
                continue
            try:
                os.rename(src, target)  # fails when another promotion filled v<N> meanwhile
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue
                raise
            return version
        raise RegistryError(f"could not claim a version number under {self.uri(model)}")

    def _claim(self, model: str, promotion_id: str) -> int:
        """The next free version number, claimed create-only so that no other promotion copies into it."""
        for _ in range(_MAX_VERSION_TRIES):
            version = self.next_version(model)
            try:
                storage.write_bytes(
                    self._claim_uri(model, version),
                    dumps({"promotion_id": promotion_id}),
                    create_only=True,
                )
            except storage.AlreadyExistsError:
                continue
            return version
        raise RegistryError(f"could not claim a version number under {self.uri(model)}")

    def _commit_s3(
        self,
        staging: str,
        record: dict[str, Any],
        files: dict[str, storage.FileInfo],
        manifest: dict[str, Any],
    ) -> int:
        model = record["model_name"]
        version = self._claim(model, record["promotion_id"])
        target = self.uri(f"{model}/v{version}")
        storage.copy_dir(self.uri(staging), target, files)
        claim = loads(self.read(f"{model}/{CLAIMS}/v{version}.json")) or {}
        if claim.get("promotion_id") != record["promotion_id"]:  # only on a store without conditional puts
            raise RegistryError(f"{target} was claimed by another promotion; the champion is unchanged")
        try:
            storage.write_bytes(
                f"{target}/{MANIFEST}", dumps(dict(manifest, version=version)), create_only=True
            )
        except storage.AlreadyExistsError as exc:
            raise RegistryError(
                f"{target} was committed by another promotion at the same time; the champion is unchanged -- "
                "run the promotion again"
            ) from exc
        _quietly(conditional.remove, self._claim_uri(model, version))
        return version

    # --------------------------------------------------------------------------------------- the pointer

    def _move_champion(self, model: str, entry: dict[str, Any], expected: str | None) -> dict[str, Any]:
        """Compare-and-swap ``champion.json`` to ``entry``'s version, on top of whatever won meanwhile."""
        return swap_pointer(
            self.uri(f"{model}/{CHAMPION}"), lambda current: _pointer(model, entry, current, expected)
        )


def swap_pointer(uri: str, build: Callable[[dict[str, Any] | None], dict[str, Any]]) -> dict[str, Any]:
    """Replace the JSON pointer at ``uri`` with ``build(current pointer)`` by compare-and-swap, retrying on
    top of any write that landed in between (``build`` sees each current value; it may raise to refuse)."""
    for attempt in range(_MAX_POINTER_TRIES):
        snapshot = conditional.read(uri)
        new = build(loads(snapshot.data))
        if conditional.swap(uri, dumps(new), snapshot):
            return new
        if loads(conditional.read(uri).data) == new:
            return new  # our write landed but its answer was lost, and the retry saw our own ETag
        time.sleep(random.uniform(0, min(1.0, 0.02 * (attempt + 1))))  # let the winner's readers through
    raise RegistryError(f"{uri} kept changing under {_MAX_POINTER_TRIES} attempts; the champion is unchanged")


def _pointer(
    model: str, entry: dict[str, Any], current: dict[str, Any] | None, expected: str | None
) -> dict[str, Any]:
    """The champion pointer to ``entry``'s version (its record or manifest), replacing ``current``."""
    check_expected(model, expected, current, entry["uri"])
    pointer = {
        "model_name": model,
        "version": entry["version"],
        "uri": entry["uri"],
        "metrics": entry.get("metrics", {}),
        "promoted_at": entry.get("promoted_at", now()),
        "run_id": entry.get("run_id", ""),
        "promotion_id": entry.get("promotion_id", ""),
        "decision": entry.get("decision"),
        "previous": current.get("version") if current else None,
    }
    if entry.get("reason"):
        pointer["reason"] = entry["reason"]
    return pointer


def _listing(uri: str) -> list[str]:
    try:
        return storage.list_files(uri)
    except FileNotFoundError:
        return []


def _quietly(func: Any, *args: Any) -> None:
    try:
        func(*args)
    except Exception as exc:  # cleanup must not hide the error that caused it
        log.warning("cleanup failed: %s", exc)
