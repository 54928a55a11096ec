"""Which backend a ``registry_uri`` names, read without importing any backend (so parameter checks stay fast).

- a local path, ``file://`` or ``s3://bucket/prefix``: the **s3** backend, preftune's own layout in object
  storage (:mod:`.store_backend`), no server;
- ``mlflow+http://host:port[/path]`` or ``mlflow+https://...``: the **mlflow** backend
  (:mod:`.mlflow_backend`), MLflow's model registry at that tracking server;
- ``mlflow://``: the same, with the server taken from ``MLFLOW_TRACKING_URI`` (set by the environment, e.g. a
  Kubernetes Secret or ConfigMap), so one compiled pipeline works on every cluster.

An mlflow URI takes options as a query string: ``artifacts=s3://bucket/prefix`` (where the model files go when
the server's own artifact location is not one preftune can write, such as a proxied ``mlflow-artifacts:``
root), ``experiment=<name>`` (the MLflow experiment of the promotion runs, default ``preftune-registry``) and
``turn_timeout=<seconds>`` (see :mod:`.mlflow_turns`). Credentials never go in the URI -- it is a pipeline
parameter, visible in the compiled YAML and the run's page -- but in ``MLFLOW_TRACKING_TOKEN`` or
``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, which the MLflow client reads itself.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from urllib.parse import SplitResult, parse_qs, urlsplit

from preftune.io import storage

MLFLOW_SCHEMES = ("mlflow://", "mlflow+http://", "mlflow+https://")
DEFAULT_EXPERIMENT = "preftune-registry"
DEFAULT_TURN_TIMEOUT = 120.0
_OPTIONS = ("artifacts", "experiment", "turn_timeout")


@dataclass(frozen=True)
class MlflowLocation:
    """An MLflow registry: the tracking server and where preftune writes the model files."""

    uri: str  # the registry_uri as given
    tracking_uri: str
    artifacts: str = ""  # "" = the promotion run's own artifact location
    experiment: str = DEFAULT_EXPERIMENT
    turn_timeout: float = DEFAULT_TURN_TIMEOUT


def is_mlflow(registry_uri: str) -> bool:
    """True for the mlflow backend's URIs (``mlflow://``, ``mlflow+http(s)://``)."""
    return str(registry_uri).strip().lower().startswith(MLFLOW_SCHEMES)


def check_uri(registry_uri: str) -> str:
    """``registry_uri`` unchanged when some backend takes it; ValueError saying what is accepted otherwise."""
    if is_mlflow(registry_uri):
        parse_mlflow(registry_uri, environ={"MLFLOW_TRACKING_URI": "http://checked-at-run-time"})
        return registry_uri
    try:
        return storage.check_uri(registry_uri)
    except ValueError as exc:
        raise ValueError(
            f"{exc}; or, for the MLflow model registry: mlflow+http://host:port, mlflow+https://host "
            "or mlflow:// (the server from MLFLOW_TRACKING_URI)"
        ) from None


def parse_mlflow(registry_uri: str, environ: dict[str, str] | None = None) -> MlflowLocation:
    """The MLflow location an ``mlflow...://`` registry URI names; ValueError naming what is wrong."""
    text = str(registry_uri).strip()
    parts = urlsplit(text)
    if parts.username or parts.password:
        raise ValueError(
            f"registry_uri {_redacted(parts)!r} carries credentials: pipeline parameters are shown in the "
            "compiled YAML and the run's page. Set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD, from a Kubernetes Secret instead"
        )
    if parts.fragment:
        raise ValueError(f"registry_uri {text!r}: a '#fragment' means nothing here")
    scheme = parts.scheme.lower()
    if scheme == "mlflow":
        if parts.netloc or parts.path.strip("/"):
            raise ValueError(
                f"registry_uri {text!r}: mlflow:// takes the server from MLFLOW_TRACKING_URI; to name the "
                "server, write mlflow+http://host:port or mlflow+https://host"
            )
        tracking = (os.environ if environ is None else environ).get("MLFLOW_TRACKING_URI", "").strip()
        if not tracking:
            raise ValueError(
                f"registry_uri {text!r} takes the MLflow server from MLFLOW_TRACKING_URI, which is not set"
            )
    else:
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError:
            raise ValueError(f"registry_uri {text!r}: the port is not a number") from None
        if not parts.hostname:
            raise ValueError(f"registry_uri {text!r} names no MLflow server (mlflow+http://host:port)")
        tracking = f"{scheme.split('+', 1)[1]}://{parts.netloc}{parts.path.rstrip('/')}"
    return MlflowLocation(text, tracking, **_options(text, parts.query))


def _options(text: str, query: str) -> dict[str, object]:
    values = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(values) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"registry_uri {text!r}: unknown option(s) {unknown}; known: {list(_OPTIONS)}")
    found: dict[str, object] = {}
    for name, given in values.items():
        if len(given) != 1 or not given[0].strip():
            raise ValueError(f"registry_uri {text!r}: give option {name!r} once, with a value")
        found[name] = given[0].strip()
    if "artifacts" in found:
        artifacts = str(found["artifacts"])
        if not artifacts.lower().startswith("s3://"):
            raise ValueError(
                f"registry_uri {text!r}: artifacts={artifacts!r} must be an s3://bucket/prefix (MLflow "
                "accepts a local model version source only inside the run's own artifact directory)"
            )
        found["artifacts"] = artifacts.rstrip("/")
    if "turn_timeout" in found:
        try:
            found["turn_timeout"] = float(str(found["turn_timeout"]))
        except ValueError:
            found["turn_timeout"] = -1.0
        if not (math.isfinite(found["turn_timeout"]) and found["turn_timeout"] > 0):
            raise ValueError(f"registry_uri {text!r}: turn_timeout must be a positive number of seconds")
    return found


def _redacted(parts: SplitResult) -> str:
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://***@{host}{parts.path}"
