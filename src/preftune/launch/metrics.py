"""Logging a step's metrics to its KFP Metrics artifact, with every value a cluster can parse.

KFP writes an artifact's metadata with Python's ``json.dumps``, which turns a NaN or an infinity into the bare
tokens ``NaN`` / ``Infinity``: not JSON, so the Go launcher on a cluster fails to read the step's output (the
local runner does not notice). A non-finite value is therefore logged as the string ``"nan"``, ``"inf"`` or
``"-inf"`` (``float()`` reads each back; the gate reports such a metric as not finite) with a warning in the
step's log; anything that is not a number is left out, with a warning.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)


def metric_value(name: str, value: Any) -> float | str | None:
    """What a metric is logged as: a finite float, the string of a non-finite one, or None (left out)."""
    try:
        number = float(value)  # also numpy and torch scalars, and bools as 0 / 1
    except (TypeError, ValueError):
        log.warning("metric %s is not a number (%r); not logged", name, value)
        return None
    if math.isfinite(number):
        return number
    text = "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")
    log.warning("metric %s is not finite (%s); logged as the string %r", name, number, text)
    return text


def log_metrics(metrics: Any, values: Mapping[str, Any]) -> dict[str, float | str]:
    """Log ``values`` to the KFP Metrics artifact ``metrics``; returns what was logged.

    The one function every component logs its metrics with, so a non-finite value never reaches the
    executor output as a bare ``NaN``.
    """
    logged: dict[str, float | str] = {}
    for name, value in values.items():
        clean = metric_value(name, value)
        if clean is None:
            continue
        if isinstance(clean, str):
            metrics.metadata[name] = clean
        else:
            metrics.log_metric(name, clean)
        logged[name] = clean
    return logged
