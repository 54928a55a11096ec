"""A model registry in object storage: numbered versions of a model and a pointer to the current champion.

Layout under ``<registry_uri>/<model_name>/`` (``registry_uri`` is a local path, ``file://`` or ``s3://``)::

    champion.json              pointer: version, uri, metrics, promoted_at, run_id, decision, previous
    v1/ v2/ ...                model files + README.md (model card) + lineage.json + metrics.json + _COMPLETE.json
    .staging/<promotion id>/   uploads in progress (or left by a promotion that died)

A version is *visible* only when its ``_COMPLETE.json`` manifest exists; every listing ignores the others.
:func:`promote` publishes in an order that keeps a promotion killed at any point harmless:

1. the candidate is assembled locally (an adapter chain is merged into full weights, so a version never depends
   on pipeline artifacts that may be garbage-collected), with lineage, metrics and model card;
2. every file goes to ``.staging/<promotion id>/`` and the staged listing is checked against the local sizes
   (and MD5s where the store's ETag is one);
3. the version number is ``max(visible versions) + 1``, skipping any ``v<N>/`` that already holds files (a partial
   left by a killed or concurrent promotion never blocks, and nothing is mixed into it). Locally the staging
   directory, manifest included, is renamed to ``v<N>`` in one atomic step; on S3 (which has no rename) the
   files are copied to ``v<N>/``, the copy is checked, and the manifest is written **last** -- with
   ``If-None-Match: *`` where the store supports it, so two racing promotions cannot both claim ``v<N>``;
4. only then is ``champion.json`` replaced (one atomic write), and the staging files removed.

A crash before step 4 leaves the old champion in place and no visible new version; the next promotion takes the
next free number. Leftover staging or partial version files are inert; :func:`remove_partials` deletes them.

S3 primitives that :mod:`preftune.io.storage` does not offer (delimited listing, server-side copy, conditional put,
batch delete) are implemented here with boto3.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
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


class RegistryError(RuntimeError):
    """A promotion that could not complete; the champion is unchanged."""


FileInfo = storage.FileInfo


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


def _inventory(root: Path) -> dict[str, FileInfo]:
    return storage.inventory(root)


# ------------------------------------------------------------------------------------------------------ stores


class _LocalStore:
    """A registry on a filesystem: staging directory renamed into place (atomic on POSIX)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, rel: str) -> bytes | None:
        path = self.root / rel
        return path.read_bytes() if path.is_file() else None

    def write(self, rel: str, data: bytes) -> None:
        storage.write_bytes(str(self.root / rel), data)

    def children(self, rel: str) -> list[str]:
        path = self.root / rel
        return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []

    def occupied(self, rel: str) -> bool:
        path = self.root / rel
        return path.exists() and (not path.is_dir() or any(path.iterdir()))

    def stage(self, bundle: Path, staging: str) -> None:
        dest = self.root / staging
        dest.mkdir(parents=True)
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            target = dest / path.relative_to(bundle)
            target.parent.mkdir(parents=True, exist_ok=True)
            _copy_file(path, target)

    def verify(self, rel: str, files: dict[str, FileInfo]) -> None:
        _check_listing(rel, files, _local_listing(self.root / rel), etags={})

    def commit(self, staging: str, model: str, files: dict[str, FileInfo], manifest: dict[str, Any]) -> int:
        src = self.root / staging
        for _ in range(_MAX_VERSION_TRIES):
            version = _next_version(self, model)
            body = dict(manifest, version=version)
            (src / MANIFEST).write_bytes(_dumps(body))
            target = self.root / model / f"v{version}"
            if target.exists() and any(target.iterdir()):
                continue
            try:
                os.rename(src, target)  # fails when another promotion filled v<N> meanwhile
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue
                raise
            return version
        raise RegistryError(f"could not claim a version number under {self.root / model}")

    def discard(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)

    def uri(self, rel: str) -> str:
        return str(self.root / rel)


def _local_listing(path: Path) -> dict[str, int]:
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*") if p.is_file()}


def _copy_file(src: Path, dest: Path) -> None:
    """One file copy; a separate function so tests can interrupt a promotion between files."""
    shutil.copyfile(src, dest)


class _S3Store:
    """A registry on S3: staged uploads, server-side copies into ``v<N>/``, the manifest written last."""

    def __init__(self, uri: str) -> None:
        self.bucket, key = storage.split_s3(uri)
        self.prefix = key.strip("/") + "/" if key.strip("/") else ""
        self.client = storage.s3_client()

    def key(self, rel: str) -> str:
        return self.prefix + rel

    def read(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def write(self, rel: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=data)

    def children(self, rel: str) -> list[str]:
        prefix = self.key(rel.rstrip("/") + "/")
        names = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        ):
            names += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    def objects(self, rel: str) -> dict[str, dict[str, Any]]:
        prefix = self.key(rel.rstrip("/") + "/")
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"][len(prefix) :]] = obj
        return found

    def occupied(self, rel: str) -> bool:
        prefix = self.key(rel.rstrip("/") + "/")
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        return bool(page.get("Contents"))

    def stage(self, bundle: Path, staging: str) -> None:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            _upload_file(
                self.client, path, self.bucket, self.key(f"{staging}/{path.relative_to(bundle).as_posix()}")
            )

    def verify(self, rel: str, files: dict[str, FileInfo]) -> None:
        objects = self.objects(rel)
        sizes = {name: int(obj["Size"]) for name, obj in objects.items()}
        etags = {name: str(obj.get("ETag", "")).strip('"') for name, obj in objects.items()}
        _check_listing(rel, files, sizes, etags)

    def commit(self, staging: str, model: str, files: dict[str, FileInfo], manifest: dict[str, Any]) -> int:
        version = _next_version(self, model)
        target = f"{model}/v{version}"
        for name in sorted(files):
            _copy_object(
                self.client, self.bucket, self.key(f"{staging}/{name}"), self.key(f"{target}/{name}")
            )
        self.verify(target, files)
        body = _dumps(dict(manifest, version=version))
        self._put_manifest(self.key(f"{target}/{MANIFEST}"), body)
        return version

    def _put_manifest(self, key: str, body: bytes) -> None:
        """The commit point: conditional (create-only) where the store supports it."""
        from botocore.exceptions import ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise RegistryError(
                    f"s3://{self.bucket}/{key} was committed by another promotion at the same time; "
                    "the champion is unchanged -- run the promotion again"
                ) from exc
            if code not in ("NotImplemented", "InvalidArgument", "501", "400"):
                raise
            self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def discard(self, rel: str) -> None:
        keys = [self.key(f"{rel}/{name}") for name in self.objects(rel)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def uri(self, rel: str) -> str:
        return f"s3://{self.bucket}/{self.key(rel)}"


def _upload_file(client: Any, path: Path, bucket: str, key: str) -> None:
    """One upload; a separate function so tests can interrupt a promotion between files."""
    client.upload_file(str(path), bucket, key)


def _copy_object(client: Any, bucket: str, src_key: str, dest_key: str) -> None:
    """One server-side copy (managed: multipart for objects over 5 GB)."""
    client.copy({"Bucket": bucket, "Key": src_key}, bucket, dest_key)


def _check_listing(
    rel: str, files: dict[str, FileInfo], sizes: dict[str, int], etags: dict[str, str]
) -> None:
    """Every expected file is there with its size (and MD5 where the ETag is a plain MD5); nothing else."""
    problems = storage.listing_problems(files, sizes, etags)
    if problems:
        raise RegistryError(f"{rel} does not match what was uploaded: " + "; ".join(problems[:10]))


def _store(registry_uri: str) -> _LocalStore | _S3Store:
    if not registry_uri or not str(registry_uri).strip():
        raise ValueError("registry_uri is empty: give a local directory or an s3://bucket/prefix")
    if storage.is_s3(registry_uri):
        return _S3Store(registry_uri)
    return _LocalStore(_local_path(registry_uri))


def _local_path(uri: str) -> Path:
    """A plain path or ``file://`` URI as a Path."""
    from urllib.parse import unquote, urlparse

    uri = os.fspath(uri)
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file://") else Path(uri)


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


def _next_version(store: _LocalStore | _S3Store, model: str) -> int:
    """max(visible) + 1, then past any number whose folder already holds files (a partial never blocks)."""
    complete = [v["version"] for v in _versions(store, model)]
    version = max(complete, default=0) + 1
    while store.occupied(f"{model}/v{version}"):
        version += 1
    return version


def _versions(store: _LocalStore | _S3Store, model: str) -> list[dict[str, Any]]:
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
    return _versions(_store(registry_uri), check_model_name(model_name))


def current_champion(registry_uri: str, model_name: str) -> dict[str, Any] | None:
    """The champion pointer (``version``, ``uri``, ``metrics``, ``promoted_at``, ...), or None before the first
    promotion."""
    store = _store(registry_uri)
    return _loads(store.read(f"{check_model_name(model_name)}/{CHAMPION}"))


def resolve_champion(registry_uri: str, model_name: str) -> str:
    """The champion's URI, or "" when there is none yet (the evaluate step then skips the comparison)."""
    champion = current_champion(registry_uri, model_name)
    return str(champion["uri"]) if champion and champion.get("uri") else ""


def set_champion(
    registry_uri: str, model_name: str, version: int, *, reason: str = "manual"
) -> dict[str, Any]:
    """Point the champion at an existing visible version (a rollback); returns the new pointer."""
    store = _store(registry_uri)
    model = check_model_name(model_name)
    versions = {v["version"]: v for v in _versions(store, model)}
    if version not in versions:
        raise RegistryError(f"{model} has no complete version v{version}; versions: {sorted(versions)}")
    previous = _loads(store.read(f"{model}/{CHAMPION}"))
    entry = versions[version]
    pointer = {
        "model_name": model,
        "version": version,
        "uri": entry["uri"],
        "metrics": entry.get("metrics", {}),
        "promoted_at": _now(),
        "run_id": entry.get("run_id", ""),
        "promotion_id": entry.get("promotion_id", ""),
        "decision": entry.get("decision"),
        "previous": previous.get("version") if previous else None,
        "reason": reason,
    }
    store.write(f"{model}/{CHAMPION}", _dumps(pointer))
    return pointer


def _assemble(candidate: str, bundle: Path, merge_adapters: bool) -> bool:
    """A local, self-contained copy of the candidate in ``bundle``; True when an adapter chain was merged into
    full weights (so the version does not depend on parent artifacts that may be garbage-collected)."""
    source = storage.local_path(candidate) if storage.is_s3(candidate) else _local_path(candidate)
    if not source.is_dir():
        raise FileNotFoundError(f"candidate model {candidate!r} is not a directory")
    if merge_adapters and (source / "adapter_config.json").is_file():
        from preftune.model.modeling import load_causal_lm, load_tokenizer

        model = load_causal_lm(str(source))
        model.save_pretrained(str(bundle), safe_serialization=True)
        load_tokenizer(str(source)).save_pretrained(str(bundle))
        for name in ("lineage.json", "README.md"):
            if (source / name).is_file():
                shutil.copyfile(source / name, bundle / name)
        return True
    storage.download(str(source), bundle)  # verified copy; refuses links out of the candidate
    return False


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


def promote(
    candidate_dir: str,
    registry_uri: str,
    model_name: str,
    metrics: dict[str, Any],
    *,
    run_id: str = "",
    decision: dict[str, Any] | None = None,
    merge_adapters: bool = True,
) -> dict[str, Any]:
    """Publish a candidate model as the next version and make it the champion; returns the new pointer.

    See the module docstring for the protocol. ``decision`` (the gate's) is recorded with the version; when it is
    given and says ``promote: false`` nothing is published. Raises RegistryError when an upload cannot be
    verified or a concurrent promotion claimed the version -- in every failure the champion is unchanged.
    """
    model = check_model_name(model_name)
    if decision is not None and not decision.get("promote"):
        raise RegistryError(f"the gate rejected this candidate: {'; '.join(decision.get('reasons', []))}")
    store = _store(registry_uri)
    promotion_id = uuid.uuid4().hex
    record = {
        "model_name": model,
        "promotion_id": promotion_id,
        "run_id": run_id,
        "promoted_at": _now(),
        "source_uri": str(candidate_dir),
        "metrics": {k: v for k, v in metrics.items()},
        "decision": decision,
        "merged": False,
    }
    staging = f"{model}/{STAGING}/{promotion_id}"
    with tempfile.TemporaryDirectory(prefix="preftune-promote-") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        record["merged"] = _assemble(str(candidate_dir), bundle, merge_adapters)
        lineage_file = bundle / "lineage.json"
        lineage = _loads(lineage_file.read_bytes()) if lineage_file.is_file() else None
        lineage = lineage or {"stage": "external", "base_model": str(candidate_dir), "chain": []}
        lineage["registry"] = {k: record[k] for k in ("model_name", "promotion_id", "run_id", "promoted_at")}
        lineage["registry"]["source_uri"] = str(candidate_dir)
        if record["merged"]:
            lineage["adapter"] = False
        lineage_file.write_bytes(_dumps(lineage))
        (bundle / "metrics.json").write_bytes(_dumps(record["metrics"]))
        card = bundle / "README.md"
        card.write_text(
            _model_card(card.read_text(encoding="utf-8") if card.is_file() else f"# {model}\n", record),
            encoding="utf-8",
        )
        files = _inventory(bundle)
        manifest = dict(record, files={k: vars(v) for k, v in files.items()})
        try:
            store.stage(bundle, staging)
            store.verify(staging, files)
            version = store.commit(staging, model, files, manifest)
        except BaseException:
            _quietly(store.discard, staging)
            raise
    previous = _loads(store.read(f"{model}/{CHAMPION}"))
    pointer = {
        "model_name": model,
        "version": version,
        "uri": store.uri(f"{model}/v{version}"),
        "metrics": record["metrics"],
        "promoted_at": record["promoted_at"],
        "run_id": run_id,
        "promotion_id": promotion_id,
        "decision": decision,
        "previous": previous.get("version") if previous else None,
    }
    store.write(f"{model}/{CHAMPION}", _dumps(pointer))
    _quietly(store.discard, staging)
    log.info("promoted %s as %s v%d (%s)", candidate_dir, model, version, pointer["uri"])
    return pointer


def remove_partials(registry_uri: str, model_name: str) -> list[str]:
    """Delete staging uploads and uncommitted ``v<N>/`` folders; returns what was removed.

    Only run it when no promotion of this model is in progress: an in-flight promotion looks the same.
    """
    store = _store(registry_uri)
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
