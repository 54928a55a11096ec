"""The training engine on a tiny fake trainer (a linear regression, seconds on CPU), and PPO's pieces alone.

The epoch loop: optimiser steps under gradient accumulation, the logging and evaluation cadence, the NaN stop
with its checkpoint, and a resume that continues exactly (same weights, data order and logs as an uninterrupted
run). PPO: shaped advantages on a hand-computed example, and its resumable state through a round trip.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from preftune.train.checkpoint import Checkpointer
from preftune.train.engine import (
    Engine,
    EpochTrainer,
    Loss,
    NonFiniteLossError,
    Resumable,
    Run,
    fit,
)
from preftune.train.kl_control import make_kl_controller
from preftune.train.loop import Meter, make_optimizer
from preftune.train.ppo import PPOState, PromptCycler, shaped_advantages

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = 12


@dataclasses.dataclass
class FakeConfig:
    """The fields the engine and its epoch loop read."""

    seed: int = 0
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    epochs: int = 2
    max_steps: int = -1
    warmup_ratio: float = 0.0
    learning_rate: float = 0.05
    logging_steps: int = 1
    eval_steps: int = 0
    max_grad_norm: float = 1.0
    batch_size: int = 2
    checkpoint_uri: str = ""
    checkpoint_every: int = 0


@dataclasses.dataclass
class Seen(Resumable):
    """The fake trainer's own resumable state: how many batches' steps completed."""

    batches: int = 0
    first: Meter = dataclasses.field(default_factory=Meter)


class Regression(EpochTrainer):
    """Mean squared error of a linear model; records every batch it is given and every evaluation."""

    def __init__(self, poison: int | None = None) -> None:
        self.state = Seen()
        self.calls: list[list[int]] = []  # the example ids of each compute_loss call
        self.values: list[float] = []  # and the loss it returned
        self.evals: list[int] = []
        self.poison = poison  # the call (1-based) whose loss is NaN

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Loss:
        self.calls.append(batch["input_ids"].view(-1).tolist())
        losses = (model(batch["x"]).squeeze(-1) - batch["y"]) ** 2
        loss = losses.mean() * (float("nan") if len(self.calls) == self.poison else 1.0)
        self.values.append(float(loss.detach()))
        return Loss(loss, {"loss": self.values[-1]}, float(losses.numel()))

    def evaluate(self, model: Any) -> dict[str, float]:
        self.evals.append(len(self.calls))
        with torch.no_grad():
            x, y = _data(7)
            return {"loss": float(((model(x).squeeze(-1) - y) ** 2).mean())}

    def observe(self, step: int, loss: Loss) -> None:
        self.state.batches += 1
        if step == 0:
            self.state.first.add(loss.weight, loss=loss.values["loss"])


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(EXAMPLES, 3, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(EXAMPLES, generator=g)


def _collate(rows: list[tuple[int, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([[i] for i, _, _ in rows]),
        "x": torch.stack([x for _, x, _ in rows]),
        "y": torch.stack([y for _, _, y in rows]),
    }


def _train(config: FakeConfig, trainer: Regression) -> tuple[Run, torch.nn.Module, Engine]:
    engine = Engine("fake", config)
    model = torch.nn.Linear(3, 1)
    x, y = _data(0)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        [(i, x[i], y[i]) for i in range(EXAMPLES)],
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=_collate,
    )
    optimizer = make_optimizer(model, config.learning_rate, 0.0)
    model, optimizer, loader = engine.accelerator.prepare(model, optimizer, loader)
    run = fit(engine, trainer, model=model, optimizer=optimizer, loader=loader, generator=generator)
    return run, model, engine


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------------ epoch loop


def test_accumulation_steps_once_per_window_and_logs_each_windows_mean() -> None:
    # 6 batches an epoch in windows of 4: steps after batches 4 and 6 (accelerate closes the short last window)
    trainer = Regression()
    run, _, _ = _train(FakeConfig(gradient_accumulation_steps=4), trainer)
    assert run.state.step == 4 and len(trainer.calls) == 12
    windows = [trainer.values[0:4], trainer.values[4:6], trainer.values[6:10], trainer.values[10:12]]
    rows = run.history.train
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
    assert [r["loss"] for r in rows] == pytest.approx([sum(w) / len(w) for w in windows], rel=1e-12)
    assert run.state.epoch_meter.means()["loss"] == pytest.approx(sum(trainer.values[6:]) / 6, rel=1e-12)
    assert run.state.tokens == 24  # every example twice, one token each
    assert trainer.state.batches == 12  # observe saw every batch once
    assert (
        trainer.state.first.state_dict()
        == {  # the first step's 4 batches of 2
            "sums": {"loss": pytest.approx(2 * sum(trainer.values[:4]), rel=1e-12)},
            "weights": {"loss": 8.0},
        }
    )


def test_the_optimiser_and_schedule_step_once_per_window() -> None:
    trainer = Regression()
    config = FakeConfig(gradient_accumulation_steps=4, warmup_ratio=0.5)
    engine = Engine("fake", config)
    model = torch.nn.Linear(3, 1)
    x, y = _data(0)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(
        [(i, x[i], y[i]) for i in range(EXAMPLES)],
        batch_size=2,
        shuffle=True,
        generator=generator,
        collate_fn=_collate,
    )
    optimizer = make_optimizer(model, config.learning_rate, 0.0)
    model, optimizer, loader = engine.accelerator.prepare(model, optimizer, loader)
    run = fit(engine, trainer, model=model, optimizer=optimizer, loader=loader, generator=generator)
    steps = {int(s["step"]) for s in optimizer.optimizer.state.values()}
    assert steps == {4}  # Adam took 4 steps, not 12
    # warm-up over ceil(4 * 0.5) = 2 steps, then linear decay to 0 at step 4 (the lr logged after each step)
    assert [r["lr"] for r in run.history.train] == pytest.approx([0.05 * 2 / 3, 0.05, 0.025, 0.0])


def test_logging_and_evaluation_follow_their_cadence() -> None:
    # 6 batches of 2 an epoch, no accumulation: 12 steps; logs every 5 (and at the last), evaluations every 4
    # steps inside an epoch, at every epoch's end, and at step 0
    trainer = Regression()
    run, _, _ = _train(FakeConfig(logging_steps=5, eval_steps=4), trainer)
    assert [r["step"] for r in run.history.train] == [5.0, 10.0, 12.0]
    assert [(r["step"], r["epoch"]) for r in run.history.eval] == [
        (0.0, 0.0),
        (4.0, pytest.approx(4 / 6)),
        (6.0, 1.0),
        (8.0, pytest.approx(1 + 2 / 6)),
        (12.0, 2.0),
    ]
    assert trainer.evals == [0, 4, 6, 8, 12]  # batches seen at each evaluation
    # a row averages the steps since the previous row: steps 1-5, 6-10, 11-12
    windows = [trainer.values[0:5], trainer.values[5:10], trainer.values[10:12]]
    assert [r["loss"] for r in run.history.train] == pytest.approx(
        [sum(w) / len(w) for w in windows], rel=1e-12
    )
    assert run.state.epoch_meter.weights == {"loss": 12.0}  # the last epoch only


def test_a_nan_loss_stops_after_checkpointing_the_last_good_step_and_the_retry_continues_exactly(
    tmp_path: Path,
) -> None:
    config = FakeConfig(
        gradient_accumulation_steps=2, checkpoint_uri=str(tmp_path / "ckpt"), checkpoint_every=100
    )
    whole_trainer = Regression()
    whole, whole_model, _ = _train(dataclasses.replace(config, checkpoint_uri=""), whole_trainer)

    # call 4 is epoch 1's 4th batch, the second of step 2's window: step 1 is the last good one
    with pytest.raises(
        NonFiniteLossError, match=r"fake: the loss is nan at step 2 \(epoch 1, batch 4\)"
    ) as err:
        _train(config, Regression(poison=4))
    assert f"the last good state (step 1) is saved in {config.checkpoint_uri}" in str(err.value)
    engine = Engine("fake", config)
    assert Checkpointer(config.checkpoint_uri, 1, engine.accelerator, stage="fake").complete() == [1]

    retry_trainer = Regression()
    resumed, resumed_model, _ = _train(config, retry_trainer)
    assert resumed.resumed_from == 1
    # the retry replays the window the NaN interrupted, then goes on as the uninterrupted run did
    assert retry_trainer.calls == whole_trainer.calls[2:]
    assert all(torch.equal(a, b) for a, b in zip(_weights(whole_model), _weights(resumed_model), strict=True))
    assert resumed.state.data_order == whole.state.data_order
    assert resumed.state.tokens == whole.state.tokens
    assert resumed.history.train == whole.history.train
    assert resumed.history.eval == whole.history.eval
    assert retry_trainer.state.batches == whole_trainer.state.batches  # the trainer's own state came back
    assert retry_trainer.state.first.state_dict() == whole_trainer.state.first.state_dict()


def test_without_a_checkpoint_uri_a_nan_loss_says_nothing_was_saved() -> None:
    with pytest.raises(NonFiniteLossError, match="no checkpoint_uri is set, so nothing was saved"):
        _train(FakeConfig(), Regression(poison=3))


def test_a_run_resumed_from_a_periodic_checkpoint_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    # checkpoints every 3 steps of 6 batches an epoch: step 9 lies in the second epoch, whose data order must
    # come back from the checkpoint, not from the seed
    config = FakeConfig(epochs=3, eval_steps=4, checkpoint_uri=str(tmp_path / "ckpt"), checkpoint_every=3)
    whole_trainer = Regression()
    whole, whole_model, _ = _train(config, whole_trainer)
    engine = Engine("fake", config)
    checkpointer = Checkpointer(config.checkpoint_uri, 3, engine.accelerator, stage="fake")
    assert checkpointer.complete() == [
        12,
        15,
    ]  # keep=2; the last step (18) is the final model, not a checkpoint
    from preftune.io import storage

    storage.remove_tree(f"{config.checkpoint_uri}/step-00000015")  # as if killed between steps 12 and 15

    retry_trainer = Regression()
    resumed, resumed_model, _ = _train(config, retry_trainer)
    assert resumed.resumed_from == 12
    assert retry_trainer.calls == whole_trainer.calls[12:]
    assert all(torch.equal(a, b) for a, b in zip(_weights(whole_model), _weights(resumed_model), strict=True))
    assert resumed.state.data_order == whole.state.data_order and resumed.state.tokens == whole.state.tokens
    assert resumed.history.train == whole.history.train and resumed.history.eval == whole.history.eval
    assert resumed.state.epoch_meter.state_dict() == whole.state.epoch_meter.state_dict()


# --------------------------------------------------------------------------------------------------- PPO pieces


def _ppo_config(**overrides: Any) -> SimpleNamespace:
    return SimpleNamespace(**{"gamma": 1.0, "lam": 1.0, "whiten_advantages": False, **overrides})


def test_shaped_advantages_match_a_hand_computed_example() -> None:
    # one response of 3 tokens then padding; score 1.0; log pi - log ref = 0.5, 0.0, -0.5; kl_coef 0.1
    rollout = SimpleNamespace(
        response_mask=torch.tensor([[1, 1, 1, 0]]),
        scores=torch.tensor([1.0]),
        logprobs=torch.tensor([[-1.0, -2.0, -3.0, 0.0]]),
        ref_logprobs=torch.tensor([[-1.5, -2.0, -2.5, 0.0]]),
        values=torch.tensor([[0.2, 0.4, 0.6, 9.0]]),
    )
    shaped = shaped_advantages(rollout, 0.1, _ppo_config(gamma=1.0, lam=0.5))
    # rewards: -0.1 * kl per token, + score on the last: -0.05, 0, 0.05 + 1
    assert shaped.rewards[0].tolist() == pytest.approx([-0.05, 0.0, 1.05, 0.0])
    assert shaped.kl[0].tolist() == pytest.approx([0.5, 0.0, -0.5, 0.0])
    # deltas: r_t + V_{t+1} - V_t = -0.05 + 0.4 - 0.2 = 0.15, 0 + 0.6 - 0.4 = 0.2, 1.05 + 0 - 0.6 = 0.45
    # advantages: A_2 = 0.45, A_1 = 0.2 + 0.5 * 0.45 = 0.425, A_0 = 0.15 + 0.5 * 0.425 = 0.3625
    assert shaped.advantages[0].tolist() == pytest.approx([0.3625, 0.425, 0.45, 0.0])
    assert shaped.returns[0].tolist() == pytest.approx([0.5625, 0.825, 1.05, 0.0])

    whitened = shaped_advantages(rollout, 0.1, _ppo_config(gamma=1.0, lam=0.5, whiten_advantages=True))
    values = torch.tensor([0.3625, 0.425, 0.45], dtype=torch.float64)
    expected = (values - values.mean()) / torch.sqrt(values.var() + 1e-8)
    assert whitened.advantages[0, :3].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert whitened.advantages[0, 3] == 0


def test_ppo_state_round_trips_through_a_checkpoints_json() -> None:
    import json

    state = PPOState(make_kl_controller("adaptive", 0.1, 6.0, 100), PromptCycler(7, seed=3))
    state.cycler.take(3)
    state.controller.update(9.0, 16)
    state.early_stops, state.blowups, state.rollout_seconds, state.rollout_tokens = 2, 1, 1.5, 40
    state.all_clip.extend([0.1, 0.25])
    state.samples["10"] = [{"iteration": 10, "prompt": "p", "response": "r", "score": 0.5}]
    saved = json.loads(json.dumps(state.state_dict()))

    restored = PPOState(make_kl_controller("adaptive", 0.1, 6.0, 100), PromptCycler(7, seed=0))
    restored.load_state_dict(saved)
    assert restored.state_dict() == state.state_dict()
    assert restored.controller.value == state.controller.value != 0.1
    # the prompt order goes on exactly as it would have, across the reshuffle after a full pass
    assert restored.cycler.take(10) == state.cycler.take(10)
    restored.all_clip.append(0.5)
    assert state.all_clip == [0.1, 0.25]  # a restored state shares nothing with the saved one
