"""After a training step succeeds: remove its resumable checkpoints.

A checkpoint holds the optimizer state beside the trainable weights (for a full fine-tune about three times
the model's size), and it exists only so that a retried pod can resume. Once the step has succeeded its model
artifact is what the pipeline uses, and the checkpoints would stay in the bucket forever, outside KFP's
lineage. Only the checkpoint directories themselves (``step-<N>/``) are removed, never anything else under the
checkpoint URI; ``keep_checkpoints`` keeps them.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
from pathlib import Path

from preftune.io import storage

log = logging.getLogger(__name__)


def checkpoint_dirs(uri: str) -> list[str]:
    """The checkpoint directories (``step-<N>``) directly under ``uri``."""
    from preftune.train.checkpoint import PREFIX  # here, not at import: the launcher stays free of torch

    names = storage.list_dirs(uri)
    return [
        posixpath.join(uri.rstrip("/"), name)
        for name in names
        if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit()
    ]


def remove_checkpoints(uri: str | None) -> int:
    """Delete the checkpoints under ``uri``; returns how many. A failure is logged, never raised: the step
    itself succeeded."""
    if not uri:
        return 0
    try:
        found = checkpoint_dirs(uri)
        for directory in found:
            storage.remove_tree(directory)
    except Exception as exc:  # noqa: BLE001 - storage errors of any backend; the training result stands
        log.warning("could not remove the checkpoints under %s (%s); remove them by hand", uri, exc)
        return 0
    if "://" not in uri:
        with contextlib.suppress(OSError):  # the directory itself, when nothing else is in it
            Path(uri).rmdir()
    if found:
        log.info("removed %d checkpoint(s) under %s (keep_checkpoints=true keeps them)", len(found), uri)
    return len(found)
