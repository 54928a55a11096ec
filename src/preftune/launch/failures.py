"""Deterministic failures are not retried on a cluster.

A training step carries KFP's retry policy (pipelines/cluster.py) so that a preempted pod resumes from its
checkpoints; but the policy has no condition, so a configuration or data error would be retried three times with
minutes of backoff, each attempt failing the same way. KFP keeps a task's output URIs across its retries, so a
step records a deterministic failure next to its output (``<output uri>-failure.json``) and a later attempt of
the same task that finds the record fails at once with the original reason instead of running again.

``preftune run`` decides retries itself (it sets ``PREFTUNE_FAILURE_FILE``, see
preftune.orchestration.step_main), so there the record is neither written nor read: ``--resume`` reruns a
failed step on purpose.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator

from preftune.io import storage

logger = logging.getLogger(__name__)

LOCAL_RUN_ENV = "PREFTUNE_FAILURE_FILE"

#: Errors that come out the same on every attempt: bad settings, bad data, a bug. Connection, timeout, memory and
#: other OS errors (a preempted or overloaded machine) may not, and stay retried.
DETERMINISTIC: tuple[type[BaseException], ...] = (
    ValueError,  # ConfigError, DataError, DataFormatError, RejectedFractionError, UnsafePathError, JSON, Unicode
    TypeError,
    LookupError,
    AttributeError,
    NameError,
    ArithmeticError,  # FloatingPointError (NonFiniteLossError), OverflowError, ZeroDivisionError
    AssertionError,
    NotImplementedError,
    ImportError,
    SyntaxError,
    RecursionError,
    FileNotFoundError,  # a missing input or model directory (IncompleteError: a directory without manifest)
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


class RepeatedFailure(RuntimeError):
    """An earlier attempt of this task failed deterministically; this attempt does not run again."""

    deterministic = True


def is_deterministic(error: BaseException) -> bool:
    """Whether ``error`` would happen again on a retry of the same step with the same inputs."""
    return isinstance(error, DETERMINISTIC) or bool(getattr(error, "deterministic", False))


def record_uri(output_uri: str) -> str:
    """Where a task's deterministic failure is recorded: beside its output, whose URI every retry shares."""
    return output_uri.rstrip("/") + "-failure.json"


def _earlier_failure(record: str) -> dict | None:
    """The recorded failure of an earlier attempt, or None; an unreachable store means "none found", since
    running the step again is what would have happened without the record."""
    try:
        if not storage.exists(record):
            return None
        return json.loads(storage.read_bytes(record))
    except Exception as error:  # noqa: BLE001 - the step itself reports a store that stays unreachable
        logger.warning("could not read %s (%s); running the step", record, error)
        return None


@contextlib.contextmanager
def not_retried(output_uri: str | None) -> Iterator[None]:
    """Run a step's body; on a deterministic error record it, and fail a later attempt that finds the record."""
    if not output_uri or os.environ.get(LOCAL_RUN_ENV):
        yield
        return
    record = record_uri(output_uri)
    found = _earlier_failure(record)
    if found is not None:
        raise RepeatedFailure(
            f"an earlier attempt of this step failed with {found['type']}: {found['message']} "
            "(a configuration or data error: retrying cannot help; fix it and start a new run)"
        )
    try:
        yield
    except BaseException as error:
        if is_deterministic(error):
            text = json.dumps({"type": type(error).__name__, "message": str(error)})
            with contextlib.suppress(Exception):  # the original error matters more than its record
                storage.write_bytes(record, text.encode("utf-8"))
        raise
