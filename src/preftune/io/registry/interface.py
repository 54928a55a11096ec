"""What every registry backend does, and the vocabulary they share: errors, names, pointers, JSON.

A backend stores complete versions of a model and says which one is the champion. :func:`preftune.io.registry.
promote` assembles the version locally (model files, lineage, metrics, model card) and hands it to the
backend's :meth:`Backend.publish`, which must make the version complete before it can become the champion, and
must move the champion so that two promotions racing cannot both believe they won.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from preftune.io import storage

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RegistryError(RuntimeError):
    """A promotion (or lookup) that could not complete as asked; the message says what the champion is now."""


class StaleChampionError(RegistryError):
    """The champion moved after the gate compared the candidate with it: published, but not champion."""


class Backend(Protocol):
    """One registry: complete versions of each model and a pointer to its champion."""

    def publish(self, bundle: Path, record: dict[str, Any], expected_champion: str | None) -> dict[str, Any]:
        """Store ``bundle`` as the next complete version of ``record["model_name"]``, then make it the
        champion (unless ``expected_champion`` is not None and the champion's URI is no longer it:
        StaleChampionError). Returns the new champion pointer."""
        ...

    def models(self) -> list[str]:
        """The names of the models this registry holds versions of, sorted."""
        ...

    def champion(self, model: str) -> dict[str, Any] | None:
        """The champion pointer (``version``, ``uri``, ``metrics``, ``previous``, ...) or None."""
        ...

    def versions(self, model: str) -> list[dict[str, Any]]:
        """Every complete version, oldest first: its manifest plus ``version`` and ``uri``."""
        ...

    def set_champion(self, model: str, version: int, reason: str) -> dict[str, Any]:
        """Point the champion at an existing complete version; returns the new pointer."""
        ...

    def remove_partials(self, model: str) -> list[str]:
        """Delete what promotions that died left behind; returns what was removed."""
        ...


def check_model_name(model_name: str) -> str:
    """Model names become path segments: letters, digits, ``.``, ``_``, ``-``; no leading dot or slash."""
    if not isinstance(model_name, str) or not _NAME.match(model_name):
        raise ValueError(
            f"invalid model name {model_name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return model_name


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def dumps(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8")


def loads(data: bytes | None) -> dict[str, Any] | None:
    """A JSON object, or None for nothing, bytes that are not JSON, or JSON that is not an object."""
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def same_location(a: str, b: str) -> bool:
    """Whether two model URIs name the same place (``file://`` or not, trailing slash or not)."""
    if not a or not b:
        return a == b
    try:
        if not storage.is_s3(a) and not storage.is_s3(b):
            return storage.local_path(a).resolve() == storage.local_path(b).resolve()
    except ValueError:
        pass
    return a.rstrip("/") == b.rstrip("/")


def check_expected(
    model: str, expected: str | None, current: dict[str, Any] | None, version_uri: str
) -> None:
    """Refuse to move the champion when the gate compared the candidate with another one than the current.

    ``expected`` is the champion URI the gate saw ("" = none yet); None skips the check.
    """
    if expected is None:
        return
    current_uri = str(current.get("uri", "")) if current else ""
    if same_location(current_uri, expected):
        return
    now_is = f"v{current['version']} ({current_uri})" if current else "none"
    raise StaleChampionError(
        f"{version_uri} is published but NOT made the champion of {model}: the gate compared it with "
        f"{expected or 'no champion'}, and the champion is now {now_is} (another promotion or a rollback "
        "happened meanwhile). Evaluate it against the current champion, or make it champion with set_champion"
    )
