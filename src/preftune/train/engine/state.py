"""A training loop's resumable state, declared once as a dataclass and saved whole in every checkpoint.

A field holds a JSON value (numbers, strings, lists, dicts) or an object with ``state_dict`` /
``load_state_dict`` (a Meter, the History, a KL controller); :class:`Resumable` turns the whole dataclass into
a checkpoint's ``state.json`` entry and back. Nothing is assembled by hand, so a field added to a state is saved
and restored without touching the loop.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from preftune.train.loop import History, Meter


class Resumable:
    """Mixin for a dataclass of resumable state: ``state_dict`` / ``load_state_dict`` over every field."""

    def state_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (an object with ``state_dict`` contributes its own)."""
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.state_dict() if hasattr(value, "state_dict") else copy.deepcopy(value)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore every field saved by :meth:`state_dict`; an object with ``load_state_dict`` loads in place."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            current = getattr(self, f.name)
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(state[f.name])
            else:
                setattr(self, f.name, copy.deepcopy(state[f.name]))


@dataclasses.dataclass
class LoopState(Resumable):
    """What every loop shape keeps: where it is, what it trained on (fingerprint and tokens), and its logs.

    ``step`` counts optimiser steps (epoch loop) or iterations (RL loop). ``data_order`` is a sha256 chain over
    the ids of every batch or rollout drawn (the lineage records it: a resumed run must match an uninterrupted
    one); ``tokens`` counts this process's real (non-padding) training tokens.
    """

    step: int = 0
    data_order: str = ""
    tokens: int = 0
    history: History = dataclasses.field(default_factory=History)


@dataclasses.dataclass
class BestSoFar(Resumable):
    """Early stopping's record (preftune.train.engine.stopping): the best evaluation so far (its value, loss
    and step) and how many evaluations since brought nothing."""

    value: float | None = None
    loss: float | None = None
    step: int = -1
    waited: int = 0


@dataclasses.dataclass
class EpochState(LoopState):
    """The epoch loop's position and running means, enough to continue exactly where it stopped.

    ``epoch`` and ``batch`` say how far into the data the last completed step went; ``epoch_start`` is the data
    generator's state when that epoch began (a uint8 list), so the resumed epoch draws the same order.
    ``window`` averages over the current logging window, ``epoch_meter`` over the current epoch; ``best`` is
    early stopping's record.
    """

    epoch: int = 0
    batch: int = 0
    epoch_start: list[int] = dataclasses.field(default_factory=list)
    window: Meter = dataclasses.field(default_factory=Meter)
    epoch_meter: Meter = dataclasses.field(default_factory=Meter)
    best: BestSoFar = dataclasses.field(default_factory=BestSoFar)
