"""The mlflow backend: MLflow's model registry; the champion is the registered model's ``champion`` alias.

A promotion into MLflow, in order:

1. an MLflow run is created in the registry experiment (``preftune-registry`` unless the URI says otherwise),
   tagged with the model, the promotion id and the KFP run id;
2. the version's files (the same bundle the s3 backend publishes: model, ``lineage.json``, ``metrics.json``,
   ``README.md``) go through :mod:`preftune.io.storage` -- every file verified, ``_COMPLETE.json`` written
   last -- into the run's artifact directory (or under ``artifacts=s3://...`` from the URI), and the run gets
   the metrics, the lineage as parameters and the model card as its description;
3. only then is the model version created, pointing at those files, with the model card as its description:
   a version is complete from the moment it exists;
4. the promotion waits for its turn (:mod:`.mlflow_turns`), reads the champion, records it as the version's
   ``preftune.previous`` and moves the ``champion`` alias to the new version.

The champion's ``uri`` is where its files are (``s3://...`` or a local path), so the evaluate step loads it
like any other model, and MLflow users load the same version as ``models:/<name>@champion``. The MLflow client
is imported here only, so the s3 backend needs no MLflow at all (``pip install 'preftune[mlflow]'`` adds it).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from preftune.io import storage
from preftune.io.registry import mlflow_turns as turns
from preftune.io.registry.interface import RegistryError, check_expected, loads, now
from preftune.io.registry.locations import MlflowLocation

log = logging.getLogger(__name__)

ALIAS = "champion"
MANIFEST = storage.MANIFEST
TAG_MODEL = "preftune.model_name"
TAG_RUN = "preftune.run_id"
TAG_FILES = "preftune.files"
TAG_PROMOTED_AT = "preftune.promoted_at"
TAG_CHAMPION_AT = "preftune.champion_at"
TAG_PREVIOUS = "preftune.previous"
TAG_REASON = "preftune.reason"
_DESCRIPTION_LIMIT = 5000  # characters MLflow keeps of a model version's description
_NOTE_LIMIT = 8000  # and of a run's description (the mlflow.note.content tag)
_PARAM_LIMIT = 6000
_BATCH = 100  # params per log_batch request


class MlflowBackend:
    """A registry on an MLflow tracking server (see the module docstring)."""

    def __init__(self, location: MlflowLocation) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise RegistryError(
                f"registry_uri {location.uri!r} needs the MLflow client: pip install 'preftune[mlflow]'"
            ) from exc
        self.location = location
        self.client = MlflowClient(tracking_uri=location.tracking_uri, registry_uri=location.tracking_uri)

    # ---------------------------------------------------------------------------------------- the interface

    def publish(self, bundle: Path, record: dict[str, Any], expected_champion: str | None) -> dict[str, Any]:
        model = record["model_name"]
        self._ensure_registered(model)
        run_id, where = self._record_run(bundle, record)
        version = self._register(model, where, run_id, record, bundle)
        try:
            turns.wait_for_turn(self.client, model, version, self.location.turn_timeout)
            pointer = self._move_alias(model, version, expected_champion, reason="")
        except BaseException as exc:
            _quietly(self._end_turn, model, version, f"not champion: {type(exc).__name__}: {exc}")
            raise
        log.info("promoted %s as %s v%d (%s)", record["source_uri"], model, version, where)
        return pointer

    def models(self) -> list[str]:
        """The registered models preftune created (tagged ``preftune``)."""
        names, token = [], None
        while True:
            page = self.client.search_registered_models(max_results=1000, page_token=token)
            names += [rm.name for rm in page if rm.tags.get("preftune") == "true"]
            token = page.token
            if not token:
                return sorted(names)

    def champion(self, model: str) -> dict[str, Any] | None:
        registered = self._registered(model)
        version = registered.aliases.get(ALIAS) if registered is not None else None
        if version is None:
            return None
        return self._pointer(self.client.get_model_version(model, str(version)))

    def versions(self, model: str) -> list[dict[str, Any]]:
        if self._registered(model) is None:
            return []
        found = []
        for number, mv in sorted(turns.all_versions(self.client, model).items()):
            manifest = _manifest(mv.source)
            if manifest is not None:  # published by preftune, files complete
                found.append(
                    dict(manifest, version=number, uri=mv.source, model_uri=f"models:/{model}/{number}")
                )
        return found

    def set_champion(self, model: str, version: int, reason: str) -> dict[str, Any]:
        if version not in {v["version"] for v in self.versions(model)}:
            raise RegistryError(f"{model} has no complete version v{version} in {self.location.uri}")
        return self._move_alias(model, version, None, reason=reason)

    def remove_partials(self, model: str) -> list[str]:
        """Files and runs of promotions that died before registering their version."""
        experiment = self.client.get_experiment_by_name(self.location.experiment)
        if experiment is None:
            return []
        registered = {mv.run_id for mv in turns.all_versions(self.client, model).values()}
        runs, token = [], None
        while True:  # the whole listing first: deleting while paging would shift the pages
            page = self.client.search_runs(
                [experiment.experiment_id], f"tags.`{TAG_MODEL}` = '{model}'", page_token=token
            )
            runs += [run for run in page if run.info.run_id not in registered]
            token = page.token
            if not token:
                break
        removed = []
        for run in runs:
            files = run.data.tags.get(TAG_FILES, "")
            if files:
                storage.remove_tree(files)
                removed.append(files)
            self.client.delete_run(run.info.run_id)
        return removed

    # ------------------------------------------------------------------------------------------------ steps

    def _registered(self, model: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(model)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def _ensure_registered(self, model: str) -> None:
        from mlflow.exceptions import MlflowException

        if self._registered(model) is not None:
            return
        try:
            self.client.create_registered_model(
                model, tags={"preftune": "true"}, description="Versions published by preftune's promote step."
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another promotion created it first
                raise

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.location.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return str(self.client.create_experiment(name))
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage != "active":
            raise RegistryError(
                f"MLflow experiment {name!r} is deleted: restore it, or name another one with "
                "?experiment= in the registry_uri"
            )
        return str(experiment.experiment_id)

    def _record_run(self, bundle: Path, record: dict[str, Any]) -> tuple[str, str]:
        """Steps 1 and 2: the promotion run, its files uploaded and verified, metrics, lineage and card."""
        model, promotion = record["model_name"], record["promotion_id"]
        run = self.client.create_run(
            self._experiment_id(),
            run_name=f"promote-{model}-{promotion[:8]}",
            tags={TAG_MODEL: model, turns.PROMOTION: promotion, TAG_RUN: record["run_id"]},
        )
        run_id = run.info.run_id
        try:
            where = self._files_location(model, run_id, run.info.artifact_uri)
            self.client.set_tag(run_id, TAG_FILES, where)
            files = storage.inventory(bundle)
            storage.upload_dir(bundle, where, manifest=False)
            manifest = storage.manifest_bytes(files, **record, mlflow_run_id=run_id)
            storage.write_bytes(f"{where}/{MANIFEST}", manifest)  # written last: the files are complete
            self._log(run_id, record, bundle)
        except BaseException:
            _quietly(self.client.set_terminated, run_id, "FAILED")
            raise
        self.client.set_terminated(run_id, "FINISHED")
        return run_id, where

    def _files_location(self, model: str, run_id: str, artifact_uri: str) -> str:
        if self.location.artifacts:
            return f"{self.location.artifacts}/{model}/{run_id}"
        where = f"{artifact_uri.rstrip('/')}/model"
        try:
            storage.check_uri(where)
        except ValueError:
            raise RegistryError(
                f"MLflow keeps this run's artifacts at {artifact_uri}, which preftune cannot write (it "
                "writes s3:// and local paths). Add ?artifacts=s3://bucket/prefix to the registry_uri, or "
                "run the server with --default-artifact-root s3://bucket/prefix --no-serve-artifacts"
            ) from None
        return where

    def _log(self, run_id: str, record: dict[str, Any], bundle: Path) -> None:
        from mlflow.entities import Metric, Param, RunTag

        stamp = int(time.time() * 1000)
        metrics = [
            Metric(_key(k), float(v), stamp, 0)
            for k, v in sorted(record["metrics"].items())
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        lineage = loads((bundle / "lineage.json").read_bytes()) or {}
        params = [
            Param(_key(k), str(v)[:_PARAM_LIMIT]) for k, v in sorted(_lineage_params(lineage, record).items())
        ]
        card = (bundle / "README.md").read_text(encoding="utf-8")
        self.client.log_batch(
            run_id, metrics=metrics, tags=[RunTag("mlflow.note.content", card[:_NOTE_LIMIT])]
        )
        for start in range(0, len(params), _BATCH):
            self.client.log_batch(run_id, params=params[start : start + _BATCH])

    def _register(self, model: str, where: str, run_id: str, record: dict[str, Any], bundle: Path) -> int:
        """Step 3: the model version, complete when created. A create retried after a lost answer may have
        registered the promotion twice: the lowest number is kept and the others deleted."""
        card = (bundle / "README.md").read_text(encoding="utf-8")
        if len(card) > _DESCRIPTION_LIMIT:
            card = (
                card[: _DESCRIPTION_LIMIT - 80]
                + "\n\n(truncated: the full model card is README.md in the files)"
            )
        tags = {
            turns.PROMOTION: record["promotion_id"],
            TAG_RUN: record["run_id"],
            TAG_PROMOTED_AT: record["promoted_at"],
        }
        created = self.client.create_model_version(model, where, run_id=run_id, tags=tags, description=card)
        mine = sorted(
            number
            for number, mv in turns.all_versions(self.client, model).items()
            if mv.tags.get(turns.PROMOTION) == record["promotion_id"]
        ) or [int(created.version)]
        for extra in mine[1:]:
            self.client.delete_model_version(model, str(extra))
        return mine[0]

    def _move_alias(self, model: str, version: int, expected: str | None, reason: str) -> dict[str, Any]:
        """Step 4 (the caller holds the turn): check, record ``previous``, move the alias, settle."""
        current = self.champion(model)
        mv = self.client.get_model_version(model, str(version))
        check_expected(model, expected, current, mv.source)
        if not reason and mv.tags.get(turns.SETTLED):
            raise RegistryError(
                f"{model} v{version} lost its turn ({mv.tags[turns.SETTLED]}); the champion is unchanged"
            )
        set_tag = self.client.set_model_version_tag
        set_tag(model, str(version), TAG_PREVIOUS, str(current["version"]) if current else "")
        set_tag(model, str(version), TAG_CHAMPION_AT, now())
        if reason:
            set_tag(model, str(version), TAG_REASON, reason)
        self.client.set_registered_model_alias(model, ALIAS, str(version))
        if not reason:
            turns.settle(self.client, model, version, "champion")
        return self._pointer(self.client.get_model_version(model, str(version)))

    def _end_turn(self, model: str, version: int, outcome: str) -> None:
        """Settle a version whose promotion failed, unless its turn already ended (it moved the alias)."""
        if not turns.is_settled(self.client, model, version):
            turns.settle(self.client, model, version, outcome)

    def _pointer(self, mv: Any) -> dict[str, Any]:
        """The champion pointer of a model version, shaped like the s3 backend's ``champion.json``."""
        model, number, tags = mv.name, int(mv.version), mv.tags
        manifest = _manifest(mv.source)
        if manifest is None:
            raise RegistryError(
                f"the champion of {model} is v{number} at {mv.source!r}, which has no complete preftune "
                f"version there ({MANIFEST}): it was not published by preftune's promote step, or preftune "
                "cannot read that location (s3:// and local paths only)"
            )
        pointer = {
            "model_name": model,
            "version": number,
            "uri": mv.source,
            "metrics": manifest.get("metrics", {}),
            "promoted_at": tags.get(TAG_CHAMPION_AT) or tags.get(TAG_PROMOTED_AT, ""),
            "run_id": manifest.get("run_id", ""),
            "promotion_id": tags.get(turns.PROMOTION, ""),
            "decision": manifest.get("decision"),
            "previous": int(tags[TAG_PREVIOUS]) if tags.get(TAG_PREVIOUS, "").isdigit() else None,
            "model_uri": f"models:/{model}/{number}",
            "mlflow_run_id": mv.run_id or "",
        }
        if tags.get(TAG_REASON):
            pointer["reason"] = tags[TAG_REASON]
        return pointer


def _manifest(source: str) -> dict[str, Any] | None:
    """The preftune manifest of a version's files, or None (not preftune's, incomplete, or unreadable)."""
    try:
        storage.check_uri(source)
        return loads(storage.read_bytes(f"{source.rstrip('/')}/{MANIFEST}"))
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _lineage_params(lineage: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The lineage as flat run parameters: stage, base model, parent, chain, training parameters, data
    hashes."""
    params: dict[str, Any] = {
        k: lineage[k] for k in ("stage", "base_model", "parent", "adapter") if k in lineage
    }
    params["chain"] = " -> ".join(
        f"{c.get('stage', '?')}:{c.get('uri', '?')}" for c in lineage.get("chain", [])
    )
    params.update({"source_uri": record["source_uri"], "merged_adapters": record["merged"]})
    for group in ("parameters", "data"):
        for key, value in (lineage.get(group) or {}).items():
            params[f"{group}.{key}"] = value
    return params


def _key(name: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, ``_-. /``; 250 characters)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", str(name))[:250] or "_"


def _quietly(func: Any, *args: Any) -> None:
    try:
        func(*args)
    except Exception as exc:  # cleanup must not hide the error that caused it
        log.warning("cleanup failed: %s", exc)
