"""The RL loop: iterations of collect (sample, score, shape) then update, for PPO (next: GRPO, RLOO, online DPO).

A stage supplies an :class:`IterationTrainer`: ``collect`` gathers one iteration's experience from the current
policy, ``update`` learns from it. The loop owns everything around them, in this order every iteration: the
data-order fingerprint and token count of what was collected, a stop before the update when the trainer asks
for one (PPO's KL blow-up), the update, the iteration's log row, the NaN stop, snapshots, checkpoints and
progress.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Protocol

import torch

from preftune.model import modeling
from preftune.train.engine.services import Engine, Halt, Run, chain_digest
from preftune.train.engine.state import LoopState, Resumable

log = logging.getLogger(__name__)


class Experience(Protocol):
    """What ``collect`` returns, as the loop sees it."""

    ids: torch.Tensor  # what was drawn from the data (prompt indices): the data-order fingerprint
    tokens: int  # this process's real tokens in the rollouts the update trains on
    logged: dict[str, float]  # the iteration's values so far; the update adds its own
    halt: bool  # stop before the update, saving the policy as it is


class IterationTrainer:
    """What a stage trained in RL iterations supplies to :func:`run_iterations`.

    ``modules`` and ``optimizers`` (by name) are what a checkpoint saves; ``policy`` is the model snapshots and
    the final artifact take; ``state``, when set, is the trainer's own resumable state.
    """

    modules: dict[str, Any]
    optimizers: dict[str, Any]
    policy: Any
    state: Resumable | None = None

    def collect(self, iteration: int) -> Experience:
        """Sample and score this iteration's rollouts (no gradients; the loop runs it under the engine's
        autocast)."""
        raise NotImplementedError

    def update(self, experience: Experience) -> Halt | None:
        """Learn from the experience and add the update's values to ``experience.logged``; a Halt when a
        non-finite loss or gradient stopped it (that update is not applied). Its forwards run under
        ``engine.autocast()``, its backwards outside it."""
        raise NotImplementedError

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows after an iteration."""
        return {}


def run_iterations(engine: Engine, trainer: IterationTrainer, total: int) -> Run:
    """Run ``total`` iterations of ``trainer``, resuming from the newest checkpoint when there is one."""
    return _IterationLoop(engine, trainer, total).run()


class _IterationLoop:
    def __init__(self, engine: Engine, trainer: IterationTrainer, total: int) -> None:
        self.engine, self.trainer, self.total = engine, trainer, total
        self.objects = {"modules": trainer.modules, "optimizers": trainer.optimizers}
        self.state = LoopState()
        self.snapshots = engine.snapshots(total, trainer.policy)

    def run(self) -> Run:
        engine, state = self.engine, self.state
        accelerator = engine.accelerator
        if accelerator.process_index > 0:
            # every rank was seeded alike so that they start from the same weights; from here each samples from
            # its own stream (rank 0 keeps the one-process stream), or they would reuse the same draws
            modeling.set_seed(engine.config.seed + accelerator.process_index)
        # a resumed rank gets its own random stream back
        resumed = engine.resume(self.objects, state, self.trainer.state)
        resumed_from = state.step if resumed else 0
        self.snapshots.keep_until(state.step)
        self.bar = engine.progress(self.total, state.step)
        began = time.perf_counter()
        while state.step < self.total:
            state.step += 1
            with engine.autocast():  # sampling and scoring compute as the trained models' own forward does
                experience = self.trainer.collect(state.step)
            state.data_order = chain_digest(state.data_order, experience.ids)
            state.tokens += experience.tokens
            if experience.halt:
                state.history.log_train(state.step, experience.logged)
                self.bar.update(1)
                break
            self._update(experience)
        self.bar.close()
        return Run(state, resumed_from, time.perf_counter() - began)

    def _update(self, experience: Experience) -> None:
        engine, state = self.engine, self.state
        step, logged = state.step, experience.logged
        halt = self.trainer.update(experience)
        state.history.log_train(step, logged)
        if halt is not None:
            engine.halt(halt, self._save)
        if self.snapshots.due(step):
            engine.snapshot(self.snapshots, step, self.trainer.policy, logged)
        if engine.checkpointer.due(step) and step < self.total:
            self._save()
        self.bar.update(1)
        self.bar.set_postfix(**self.trainer.postfix(logged))
        rounded = {k: round(v, 5) for k, v in logged.items()}
        log.info("%s iteration %d: %s", engine.stage, step, json.dumps(rounded))

    def _save(self) -> str:
        return self.engine.save_checkpoint(self.objects, self.state, self.trainer.state)
