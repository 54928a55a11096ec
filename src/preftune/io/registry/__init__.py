"""A model registry: complete, numbered versions of a model and which is the champion, on two backends.

The ``registry_uri`` picks the backend (:mod:`.locations`):

- **s3** (the default, no server): a local path, ``file://`` or ``s3://bucket/prefix`` -- preftune's own
  layout, ``<model>/v<N>/`` folders and a ``champion.json`` pointer moved by compare-and-swap
  (:mod:`.store_backend`);
- **mlflow**: ``mlflow+http://host:port``, ``mlflow+https://host`` or ``mlflow://`` (the server from
  ``MLFLOW_TRACKING_URI``) -- MLflow's model registry, the champion being the ``champion`` alias
  (:mod:`.mlflow_backend`).

The functions below take either, and answer the same way: :func:`promote` publishes a candidate as a complete
version and only then makes it the champion; :func:`current_champion`, :func:`resolve_champion` and
:func:`list_versions` read it back (the champion's ``uri`` is always a location preftune's loaders read, so
the evaluate step and the gate work unchanged). In every failure the champion is unchanged, and two promotions
racing cannot both believe they won.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from preftune.io import storage
from preftune.io.registry.bundle import Merge, assemble, describe, new_record
from preftune.io.registry.interface import Backend, RegistryError, StaleChampionError, check_model_name
from preftune.io.registry.locations import check_uri, is_mlflow, parse_mlflow
from preftune.io.registry.store_backend import CHAMPION, CLAIMS, MANIFEST, STAGING, StoreBackend

__all__ = [
    "CHAMPION",
    "CLAIMS",
    "MANIFEST",
    "STAGING",
    "Backend",
    "FileInfo",
    "Merge",
    "RegistryError",
    "StaleChampionError",
    "backend",
    "check_model_name",
    "check_uri",
    "current_champion",
    "list_models",
    "list_versions",
    "promote",
    "remove_partials",
    "resolve_champion",
    "set_champion",
]

log = logging.getLogger(__name__)

FileInfo = storage.FileInfo


def backend(registry_uri: str) -> Backend:
    """The backend a ``registry_uri`` names; ValueError for a URI no backend takes."""
    if is_mlflow(registry_uri):
        from preftune.io.registry.mlflow_backend import MlflowBackend  # imports mlflow: only when used

        return MlflowBackend(parse_mlflow(registry_uri))
    return StoreBackend(check_uri(registry_uri))


def list_models(registry_uri: str) -> list[str]:
    """The names of the models the registry holds, sorted (an empty or missing registry holds none)."""
    return backend(registry_uri).models()


def list_versions(registry_uri: str, model_name: str) -> list[dict[str, Any]]:
    """Every complete version, oldest first: each its manifest plus ``version`` and ``uri``."""
    return backend(registry_uri).versions(check_model_name(model_name))


def current_champion(registry_uri: str, model_name: str) -> dict[str, Any] | None:
    """The champion pointer (``version``, ``uri``, ``metrics``, ``promoted_at``, ``previous``, ...), or None
    before the first promotion."""
    return backend(registry_uri).champion(check_model_name(model_name))


def resolve_champion(registry_uri: str, model_name: str) -> str:
    """The champion's URI, or "" when there is none yet (the evaluate step then skips the comparison)."""
    champion = current_champion(registry_uri, model_name)
    return str(champion["uri"]) if champion and champion.get("uri") else ""


def set_champion(
    registry_uri: str, model_name: str, version: int, *, reason: str = "manual"
) -> dict[str, Any]:
    """Point the champion at an existing complete version (a rollback); returns the new pointer."""
    return backend(registry_uri).set_champion(check_model_name(model_name), int(version), reason)


def remove_partials(registry_uri: str, model_name: str) -> list[str]:
    """Delete what promotions that died left behind (staging uploads, uncommitted versions); returns what was
    removed. Run it only while no promotion of this model is in progress: one in flight looks the same."""
    return backend(registry_uri).remove_partials(check_model_name(model_name))


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
    """Publish a candidate as the next complete version and make it the champion; returns the new pointer.

    ``decision`` (the gate's) is recorded with the version; when it says ``promote: false`` nothing is
    published. When it names the champion the gate compared with (``champion_uri``, as the gate step writes
    it) and the champion has changed since, the version is published but not made champion
    (StaleChampionError). An adapter candidate is merged into full weights by ``merge`` unless
    ``merge_adapters`` is False; without ``merge`` it is refused (use
    :func:`preftune.eval.promotion.promote`). Raises RegistryError when an upload cannot be verified or the
    version cannot be committed -- in every failure the champion is unchanged.
    """
    model = check_model_name(model_name)
    if decision is not None and not decision.get("promote"):
        raise RegistryError(f"the gate rejected this candidate: {'; '.join(decision.get('reasons', []))}")
    target = backend(registry_uri)
    expected = str(decision["champion_uri"] or "") if decision and "champion_uri" in decision else None
    record = new_record(model, str(candidate_dir), metrics, run_id, decision)
    with tempfile.TemporaryDirectory(prefix="preftune-promote-") as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        record["merged"] = assemble(str(candidate_dir), bundle, merge_adapters, merge)
        describe(bundle, record)
        return target.publish(bundle, record, expected)
