"""A model registry in object storage: numbered versions of a model and a pointer to the current champion.

Layout under ``<registry_uri>/<model_name>/`` (``registry_uri`` is a local path, ``file://`` or ``s3://``)::

    champion.json              pointer: version, uri, metrics, promoted_at, run_id, decision, previous
    v1/ v2/ ...                model files + README.md (model card) + lineage.json + metrics.json + _COMPLETE.json
    .staging/<promotion id>/   uploads in progress (or left by a promotion that died)

A version is *visible* only when its ``_COMPLETE.json`` manifest exists; every listing ignores the others.
:func:`promote` publishes in an order that keeps a promotion killed at any point harmless:

1. the candidate is assembled locally, with lineage, metrics and model card. An adapter chain is merged into
   full weights (so a version never depends on pipeline artifacts that may be garbage-collected) by the
   ``merge`` function the caller passes: merging needs the model layer, which sits above this one
   (:func:`preftune.eval.promotion.promote` passes it);
2. every file goes to ``.staging/<promotion id>/`` through :func:`preftune.io.storage.upload_dir`, which verifies
   each one (size and checksum) with storage's retries;
3. the version number is ``max(visible versions) + 1``, skipping any ``v<N>/`` that already holds files (a partial
   left by a killed or concurrent promotion never blocks, and nothing is mixed into it). Locally the staging
   directory, manifest included, is renamed to ``v<N>`` in one atomic step; on S3 (which has no rename) the
   files are copied server-side to ``v<N>/`` and checked (:func:`preftune.io.storage.copy_dir`), and the manifest
   is written **last**, create-only (``If-None-Match: *`` where the store supports it), so two racing promotions
   cannot both claim ``v<N>``;
4. only then is ``champion.json`` replaced (one atomic write), and the staging files removed.

A crash before step 4 leaves the old champion in place and no visible new version; the next promotion takes the
next free number. Leftover staging or partial version files are inert; :func:`remove_partials` deletes them.

Every byte goes through :mod:`preftune.io.storage`: one S3 code path, one rule for local paths.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.io import storage

log = logging.getLogger(__name__)

MANIFEST = storage.MANIFEST  # one manifest format for registry versions and uploaded directories
CHAMPION = "champion.json"
STAGING = ".staging"
_VERSION = re.compile(r"^v([1-9][0-9]*)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_VERSION_TRIES = 1000

FileInfo = storage.FileInfo
#: Writes the full weights and tokenizer of the adapter in the first directory into the second.
Merge = Callable[[Path, Path], None]


class RegistryError(RuntimeError):
    """A promotion that could not complete; the champion is unchanged."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_model_name(model_name: str) -> str:
    """Model names become path segments: letters, digits, ``.``, ``_``, ``-``; no leading dot or slash."""
    if not isinstance(model_name, str) or not _NAME.match(model_name):
        raise ValueError(
            f"invalid model name {model_name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return model_name


# ------------------------------------------------------------------------------------------------------ store


class _Store:
    """A registry root and the few operations the protocol needs, all through :mod:`preftune.io.storage`.

    Only the commit differs between the backends: a local staging directory is renamed into place, while S3
    (which has no rename) copies it and claims the version with a create-only manifest.
    """

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

    def write(self, rel: str, data: bytes) -> None:
        storage.write_bytes(self.uri(rel), data)

    def children(self, rel: str) -> list[str]:
        return storage.list_dirs(self.uri(rel))

    def occupied(self, rel: str) -> bool:
        return storage.exists(self.uri(rel))

    def stage(self, bundle: Path, staging: str) -> None:
        """Upload the bundle, every file verified; no manifest (a staging directory is never a version)."""
        storage.upload_dir(bundle, self.uri(staging), manifest=False)

    def commit(self, staging: str, model: str, files: dict[str, FileInfo], manifest: dict[str, Any]) -> int:
        return (
            self._commit_s3(staging, model, files, manifest)
            if self.s3
            else self._rename(staging, model, manifest)
        )

    def _rename(self, staging: str, model: str, manifest: dict[str, Any]) -> int:
        src = Path(self.uri(staging))
        for _ in range(_MAX_VERSION_TRIES):
            version = _next_version(self, model)
            (src / MANIFEST).write_bytes(_dumps(dict(manifest, version=version)))
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

    def _commit_s3(
        self, staging: str, model: str, files: dict[str, FileInfo], manifest: dict[str, Any]
    ) -> int:
        version = _next_version(self, model)
        target = self.uri(f"{model}/v{version}")
        storage.copy_dir(self.uri(staging), target, files)
        try:
            storage.write_bytes(
                f"{target}/{MANIFEST}", _dumps(dict(manifest, version=version)), create_only=True
            )
        except storage.AlreadyExistsError as exc:
            raise RegistryError(
                f"{target} was committed by another promotion at the same time; the champion is unchanged -- "
                "run the promotion again"
            ) from exc
        return version

    def discard(self, rel: str) -> None:
        storage.remove_tree(self.uri(rel))


def _dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def _loads(data: bytes | None) -> dict[str, Any] | None:
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _next_version(store: _Store, model: str) -> int:
    """max(visible) + 1, then past any number whose folder already holds files (a partial never blocks)."""
    complete = [v["version"] for v in _versions(store, model)]
    version = max(complete, default=0) + 1
    while store.occupied(f"{model}/v{version}"):
        version += 1
    return version


def _versions(store: _Store, model: str) -> list[dict[str, Any]]:
    found = []
    for name in store.children(model):
        match = _VERSION.match(name)
        if not match:
            continue
        manifest = _loads(store.read(f"{model}/{name}/{MANIFEST}"))
        if manifest is None:
            continue  # not committed: a promotion in progress or one that died
        manifest["version"] = int(match.group(1))
        manifest["uri"] = store.uri(f"{model}/{name}")
        found.append(manifest)
    return sorted(found, key=lambda m: m["version"])


# -------------------------------------------------------------------------------------------------- public API


def list_versions(registry_uri: str, model_name: str) -> list[dict[str, Any]]:
    """Every visible (committed) version, oldest first: each its manifest plus ``version`` and ``uri``."""
    return _versions(_Store(registry_uri), check_model_name(model_name))


def current_champion(registry_uri: str, model_name: str) -> dict[str, Any] | None:
    """The champion pointer (``version``, ``uri``, ``metrics``, ``promoted_at``, ...), or None before the first
    promotion."""
    store = _Store(registry_uri)
    return _loads(store.read(f"{check_model_name(model_name)}/{CHAMPION}"))


def resolve_champion(registry_uri: str, model_name: str) -> str:
    """The champion's URI, or "" when there is none yet (the evaluate step then skips the comparison)."""
    champion = current_champion(registry_uri, model_name)
    return str(champion["uri"]) if champion and champion.get("uri") else ""


def _pointer(
    store: _Store, model: str, version: int, entry: dict[str, Any], promoted_at: str
) -> dict[str, Any]:
    """The champion pointer to ``v<version>``, described by ``entry`` (its record or manifest)."""
    previous = _loads(store.read(f"{model}/{CHAMPION}"))
    return {
        "model_name": model,
        "version": version,
        "uri": store.uri(f"{model}/v{version}"),
        "metrics": entry.get("metrics", {}),
        "promoted_at": promoted_at,
        "run_id": entry.get("run_id", ""),
        "promotion_id": entry.get("promotion_id", ""),
        "decision": entry.get("decision"),
        "previous": previous.get("version") if previous else None,
    }


def set_champion(
    registry_uri: str, model_name: str, version: int, *, reason: str = "manual"
) -> dict[str, Any]:
    """Point the champion at an existing visible version (a rollback); returns the new pointer."""
    store = _Store(registry_uri)
    model = check_model_name(model_name)
    versions = {v["version"]: v for v in _versions(store, model)}
    if version not in versions:
        raise RegistryError(f"{model} has no complete version v{version}; versions: {sorted(versions)}")
    pointer = dict(_pointer(store, model, version, versions[version], _now()), reason=reason)
    store.write(f"{model}/{CHAMPION}", _dumps(pointer))
    return pointer


def _assemble(candidate: str, bundle: Path, merge_adapters: bool, merge: Merge | None) -> bool:
    """A local, self-contained copy of the candidate in ``bundle``; True when an adapter chain was merged into
    full weights (so the version does not depend on parent artifacts that may be garbage-collected)."""
    source = storage.local_path(candidate)  # s3: a verified copy in the download cache
    if not source.is_dir():
        raise FileNotFoundError(f"candidate model {candidate!r} is not a directory")
    if not (merge_adapters and (source / "adapter_config.json").is_file()):
        storage.download(str(source), bundle)  # verified copy; refuses links out of the candidate
        return False
    if merge is None:
        raise RegistryError(
            f"candidate {candidate!r} is a LoRA adapter and merging it needs the model: promote it with "
            "preftune.eval.promotion.promote, or pass merge_adapters=False to publish the adapter as it is "
            "(the version then depends on its parent models' artifacts)"
        )
    merge(source, bundle)
    for name in ("lineage.json", "README.md"):
        if (source / name).is_file():
            storage.download(str(source / name), bundle)
    return True


def _model_card(previous_card: str, record: dict[str, Any]) -> str:
    metrics = "\n".join(f"| {k} | {v} |" for k, v in sorted(record["metrics"].items()))
    reasons = "\n".join(f"- {r}" for r in (record.get("decision") or {}).get("reasons", []))
    return (
        f"{previous_card.rstrip()}\n\n## Registry\n\n"
        f"Promoted to `{record['model_name']}` by run `{record['run_id'] or '-'}` at {record['promoted_at']} "
        f"(promotion `{record['promotion_id']}`; the version number is in `{MANIFEST}` and `champion.json`).\n"
        f"{'Adapters were merged into full weights for the registry.' if record['merged'] else ''}\n\n"
        f"| metric | value |\n|---|---|\n{metrics}\n\n" + (f"Gate:\n\n{reasons}\n" if reasons else "")
    )


def _describe(bundle: Path, record: dict[str, Any]) -> None:
    """Add what the registry knows to the bundle: lineage, ``metrics.json`` and a model card section."""
    lineage_file = bundle / "lineage.json"
    lineage = _loads(lineage_file.read_bytes()) if lineage_file.is_file() else None
    lineage = lineage or {"stage": "external", "base_model": record["source_uri"], "chain": []}
    lineage["registry"] = {k: record[k] for k in ("model_name", "promotion_id", "run_id", "promoted_at")}
    lineage["registry"]["source_uri"] = record["source_uri"]
    if record["merged"]:
        lineage["adapter"] = False
    lineage_file.write_bytes(_dumps(lineage))
    (bundle / "metrics.json").write_bytes(_dumps(record["metrics"]))
    card = bundle / "README.md"
    previous = card.read_text(encoding="utf-8") if card.is_file() else f"# {record['model_name']}\n"
    card.write_text(_model_card(previous, record), encoding="utf-8")


def _publish(store: _Store, bundle: Path, staging: str, record: dict[str, Any]) -> int:
    """Stage the bundle and commit it as the next version (steps 2 and 3); the staging files go on failure."""
    files = storage.inventory(bundle)
    manifest = dict(record, files={k: vars(v) for k, v in files.items()})
    try:
        store.stage(bundle, staging)
        return store.commit(staging, record["model_name"], files, manifest)
    except storage.IntegrityError as exc:
        _quietly(store.discard, staging)
        raise RegistryError(f"{store.uri(staging)}: the upload could not be verified ({exc})") from exc
    except BaseException:
        _quietly(store.discard, staging)
        raise


def promote(
    candidate_dir: str,
    registry_uri: str,
    model_name: str,
    metrics: dict[str, Any],
    *,
    run_id: str = "",
    decision: dict[str, Any] | None = None,
    merge_adapters: bool = True,
    merge: Merge | None = None,
) -> dict[str, Any]:
    """Publish a candidate model as the next version and make it the champion; returns the new pointer.

    See the module docstring for the protocol. ``decision`` (the gate's) is recorded with the version; when it is
    given and says ``promote: false`` nothing is published. An adapter candidate is merged into full weights by
    ``merge`` unless ``merge_adapters`` is False; without ``merge`` it is refused (use
    :func:`preftune.eval.promotion.promote`). Raises RegistryError when an upload cannot be verified or a
    concurrent promotion claimed the version -- in every failure the champion is unchanged.
    """
    model = check_model_name(model_name)
    if decision is not None and not decision.get("promote"):
        raise RegistryError(f"the gate rejected this candidate: {'; '.join(decision.get('reasons', []))}")
    store = _Store(registry_uri)
    record = {
        "model_name": model,
        "promotion_id": uuid.uuid4().hex,
        "run_id": run_id,
        "promoted_at": _now(),
        "source_uri": str(candidate_dir),
        "metrics": dict(metrics),
        "decision": decision,
        "merged": False,
    }
    staging = f"{model}/{STAGING}/{record['promotion_id']}"
    with tempfile.TemporaryDirectory(prefix="preftune-promote-") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        record["merged"] = _assemble(str(candidate_dir), bundle, merge_adapters, merge)
        _describe(bundle, record)
        version = _publish(store, bundle, staging, record)
    pointer = _pointer(store, model, version, record, record["promoted_at"])
    store.write(f"{model}/{CHAMPION}", _dumps(pointer))
    _quietly(store.discard, staging)
    log.info("promoted %s as %s v%d (%s)", candidate_dir, model, version, pointer["uri"])
    return pointer


def remove_partials(registry_uri: str, model_name: str) -> list[str]:
    """Delete staging uploads and uncommitted ``v<N>/`` folders; returns what was removed.

    Only run it when no promotion of this model is in progress: an in-flight promotion looks the same.
    """
    store = _Store(registry_uri)
    model = check_model_name(model_name)
    removed = []
    for name in store.children(f"{model}/{STAGING}"):
        store.discard(f"{model}/{STAGING}/{name}")
        removed.append(store.uri(f"{model}/{STAGING}/{name}"))
    for name in store.children(model):
        if _VERSION.match(name) and store.read(f"{model}/{name}/{MANIFEST}") is None:
            store.discard(f"{model}/{name}")
            removed.append(store.uri(f"{model}/{name}"))
    return removed


def _quietly(func: Any, *args: Any) -> None:
    try:
        func(*args)
    except Exception as exc:  # cleanup must not hide the error that caused it
        log.warning("cleanup failed: %s", exc)
