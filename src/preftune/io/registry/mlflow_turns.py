"""Promotions into MLflow move the champion alias one at a time, in the order of their version numbers.

MLflow's registry has no compare-and-swap for an alias (``set_registered_model_alias`` overwrites), so two
promotions that each read the champion and then move the alias could both believe they won, and the second
would record the wrong ``previous``. What the registry does have is an atomic counter: every new model version
gets the next number, once. preftune uses those numbers as tickets. A promotion registers its version only
when the version is complete, then waits until every lower version that preftune published is *settled* (its
``preftune.settled`` tag says it moved the alias, was refused or failed), and only then reads the champion and
moves the alias. So alias moves happen one at a time, each on top of the previous one.

A promotion that died between registering and settling would block the queue: a predecessor that stays the
first one unsettled, with no progress, for ``turn_timeout`` seconds is settled as abandoned and the queue goes
on; if that promotion was only slow, it finds itself settled and fails instead of moving the alias out of
turn. Versions that preftune did not publish (no ``preftune.promotion_id`` tag) never block.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from preftune.io.registry.interface import RegistryError

log = logging.getLogger(__name__)

PROMOTION = "preftune.promotion_id"
SETTLED = "preftune.settled"
_POLL_SECONDS = 0.3


def all_versions(client: Any, model: str) -> dict[int, Any]:
    """Every version of ``model`` (MLflow ModelVersion objects, with their tags) by number."""
    found: dict[int, Any] = {}
    token = None
    while True:
        page = client.search_model_versions(f"name='{model}'", page_token=token)
        found.update({int(mv.version): mv for mv in page})
        token = page.token
        if not token:
            return found


def settle(client: Any, model: str, version: int, outcome: str) -> None:
    """Record how ``version``'s turn ended, so the promotions behind it go on."""
    client.set_model_version_tag(model, str(version), SETTLED, outcome[:4000])


def is_settled(client: Any, model: str, version: int) -> str:
    """The outcome recorded for ``version`` ("" while its promotion still holds its turn)."""
    return str(client.get_model_version(model, str(version)).tags.get(SETTLED, ""))


def wait_for_turn(client: Any, model: str, version: int, timeout: float) -> None:
    """Return once every lower version that preftune published is settled (see the module docstring).

    Raises RegistryError when ``version`` itself was settled meanwhile (it waited past another promotion's
    ``timeout``, which took it for dead) or deleted.
    """
    pending_before: list[int] = []
    since = time.monotonic()
    while True:
        versions = all_versions(client, model)
        if version not in versions:
            raise RegistryError(f"{model} v{version} was deleted while it waited for its turn")
        outcome = versions[version].tags.get(SETTLED)
        if outcome:
            raise RegistryError(
                f"{model} v{version} lost its turn ({outcome}); the champion was not moved by it"
            )
        pending = sorted(
            number
            for number, mv in versions.items()
            if number < version and PROMOTION in mv.tags and SETTLED not in mv.tags
        )
        if not pending:
            return
        if pending != pending_before:
            pending_before, since = pending, time.monotonic()
        elif time.monotonic() - since > timeout:
            head = pending[0]
            log.warning(
                "%s v%d held its turn for %.0f s without progress: taking it for dead", model, head, timeout
            )
            settle(
                client,
                model,
                head,
                f"abandoned: no progress for {timeout:.0f} s, taken for dead by v{version}",
            )
            since = time.monotonic()
            continue
        time.sleep(_POLL_SECONDS * random.uniform(0.5, 1.5))
