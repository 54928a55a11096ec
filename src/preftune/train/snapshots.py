"""Intermediate policy snapshots, kept so evaluation can draw the reward-vs-KL path of a training run.

A final model says where training ended; the frontier view (reward gained against KL spent, as in the DPO
paper) needs the points on the way. A snapshot directory holds ``step-<N>/`` model artifacts (a LoRA adapter
stacked on the same parent as the final model, or full weights) and an ``index.json`` listing them, rewritten
after each save so a reader never sees a snapshot the index does not describe.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from preftune.model import modeling

INDEX_FILE = "index.json"


#: How many snapshots ``num_checkpoints = -1`` keeps: more where each is cheap (a LoRA adapter, or the full weights
#: of a model of at most ``CHEAP_FULL_PARAMETERS``), so that evaluation's choice among them is a real one.
AUTO_COUNT = {"lora": 8, "full": 3, "cheap_full": 8}
#: 100M parameters: a full snapshot of at most 400 MB in fp32.
CHEAP_FULL_PARAMETERS = 100_000_000


def snapshot_count(requested: int, use_lora: bool, parameters: int | None = None) -> int:
    """The number of snapshots to keep: ``requested``, or for -1 :data:`AUTO_COUNT` by what a snapshot holds
    (``parameters``: the policy's parameter count, when known)."""
    if requested != -1:
        return requested
    if use_lora:
        return AUTO_COUNT["lora"]
    cheap = parameters is not None and parameters <= CHEAP_FULL_PARAMETERS
    return AUTO_COUNT["cheap_full" if cheap else "full"]


def snapshot_steps(total_steps: int, count: int) -> list[int]:
    """``count`` steps strictly inside ``(0, total_steps)``, denser early: step ``total * (k / (count + 1))^2``.

    A policy drifts from its reference fastest at the start of training, so that is where the points that stay
    within the gate's KL and diversity bounds lie; even spacing left the first snapshot already past them (a
    DPO run whose first of 3 evenly spaced snapshots, at 25%, had 1.2x the gate's KL). Fewer when the run is
    short. The final step is never among them: the final model is the training step's main output already.
    """
    if count < 0:
        raise ValueError(f"num_checkpoints must be >= 0, got {count}")
    steps = {max(1, round(total_steps * (k / (count + 1)) ** 2)) for k in range(1, count + 1)}
    return sorted(s for s in steps if 0 < s < total_steps)


class Snapshots:
    """Saves the policy at planned steps into one directory (a KFP Model artifact of its own)."""

    def __init__(self, directory: str | None, total_steps: int, count: int, *, stage: str) -> None:
        self.directory = Path(directory) if directory else None
        self.steps = set(snapshot_steps(total_steps, count)) if directory else set()
        self.stage = stage
        self.saved: list[dict[str, Any]] = []
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            if (self.directory / INDEX_FILE).is_file():  # a retried step: what the interrupted try kept
                self.saved = json.loads((self.directory / INDEX_FILE).read_text(encoding="utf-8"))[
                    "snapshots"
                ]
            self._write_index()

    def keep_until(self, step: int) -> None:
        """Forget snapshots after ``step``: a run resumed there (0 = from scratch) takes them again."""
        self.saved = [entry for entry in self.saved if entry["step"] <= step]
        if self.directory is not None:
            self._write_index()

    def due(self, step: int) -> bool:
        return step in self.steps

    def save(
        self,
        step: int,
        model: Any,
        tokenizer: Any,
        *,
        parent_uri: str,
        parameters: dict[str, Any],
        values: dict[str, float] | None = None,
    ) -> None:
        """Save ``model`` as ``step-<step>``; ``values`` (loss, reward, KL at that step) go into the index."""
        if self.directory is None:
            return
        name = f"step-{step:06d}"
        was_training = model.training
        model.eval()
        modeling.save_model(
            model,
            tokenizer,
            str(self.directory / name),
            stage=f"{self.stage}-snapshot",
            parent_uri=parent_uri,
            parameters={**parameters, "snapshot_step": step},
            data={},
            metrics=values,
        )
        model.train(was_training)
        self.saved = [e for e in self.saved if e["step"] != step]
        self.saved.append({"step": step, "path": name, "values": values or {}})
        self._write_index()

    def _write_index(self) -> None:
        assert self.directory is not None
        tmp = self.directory / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps({"stage": self.stage, "snapshots": self.saved}, indent=2), encoding="utf-8")
        os.replace(tmp, self.directory / INDEX_FILE)


def read_index(directory: str | Path) -> list[dict[str, Any]]:
    """The snapshots of a directory, oldest first, each with its absolute ``path``; empty when there are none."""
    root = Path(directory)
    index = root / INDEX_FILE
    if not index.is_file():
        raise ValueError(f"{root} is not a snapshot directory: it has no {INDEX_FILE}")
    entries = json.loads(index.read_text(encoding="utf-8")).get("snapshots", [])
    rows = []
    for entry in entries:
        path = (root / entry["path"]).resolve()
        if root.resolve() not in path.parents:
            raise ValueError(f"{index}: snapshot path {entry['path']!r} leaves the directory")
        rows.append({**entry, "path": str(path)})
    return sorted(rows, key=lambda e: e["step"])
