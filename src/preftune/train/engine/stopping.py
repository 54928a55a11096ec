"""Early stopping on a held-out metric, with the best weights kept: how the reward model and DPO train "to
convergence" without training past it.

A reward model overfits its preference data within an epoch or two (InstructGPT trains its reward model for a
single epoch for that reason; "Secrets of RLHF" picks reward models by held-out accuracy), and DPO keeps
widening its implicit-reward margins long after held-out accuracy has stopped rising -- the part of training
that moves the policy away from its reference and costs it diversity (the IPO paper's argument against
DPO's unbounded margins). So a trainer may declare a :class:`StopRule`: after every evaluation the loop keeps
the weights of the best one so far (the highest metric; ties broken by the lower loss, or by the earlier step,
as the rule says; never the starting weights of step 0), stops once ``patience`` evaluations in a row brought no improvement, and ends the run with
the best weights back in the model. The best weights travel in resumable checkpoints, so a resumed run
chooses exactly as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from preftune.train.engine.state import BestSoFar

#: Checkpoint tensors of the best weights are named ``best.<parameter name>``.
PREFIX = "best."


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Which evaluation is best: the highest ``metric`` (an evaluation without it is not compared); on a tie,
    the lower ``loss`` when ``ties_by_loss`` (a more confident reward model), else the earlier one (DPO: the
    same accuracy for less drift). ``patience``: evaluations without improvement before training stops (0 =
    never stop early; the best weights are still restored at the end)."""

    metric: str
    patience: int
    ties_by_loss: bool = False


def trainable_copy(model: Any) -> dict[str, torch.Tensor]:
    """The trainable weights of a model (an adapter and its head, or every weight), copied to the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


class EarlyStopping:
    """Applies a :class:`StopRule` over a run's evaluations and holds the best weights."""

    def __init__(self, rule: StopRule, best: BestSoFar) -> None:
        self.rule, self.best = rule, best
        self.weights: dict[str, torch.Tensor] = {}

    def observe(self, step: int, values: Mapping[str, float], model: Any) -> bool:
        """Record an evaluation of ``model`` at ``step``; True when training should stop now. The evaluation
        before the first step is not a candidate: those are the starting weights (a reward model's untrained
        head, DPO's reference), which a run that trained at all must not end with."""
        value = values.get(self.rule.metric)
        if value is None or step == 0:
            return False
        best, loss = self.best, values.get("loss")
        better = best.value is None or value > best.value
        if not better and value == best.value and self.rule.ties_by_loss and loss is not None:
            better = best.loss is None or loss < best.loss
        if better:
            best.value, best.loss, best.step, best.waited = float(value), loss, step, 0
            self.weights = trainable_copy(model)
            return False
        best.waited += 1
        return self.rule.patience > 0 and best.waited >= self.rule.patience

    def restore(self, model: Any, step: int) -> bool:
        """Put the best weights back when the model at ``step`` is not the best one; True when it did."""
        if self.best.step in (-1, step) or not self.weights:
            return False
        own = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                own[name].copy_(value.to(own[name].device, own[name].dtype))
        return True

    def tensors(self) -> dict[str, torch.Tensor]:
        """The best weights as checkpoint tensors."""
        return {PREFIX + name: value for name, value in self.weights.items()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The best weights back from a checkpoint's tensors."""
        self.weights = {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
