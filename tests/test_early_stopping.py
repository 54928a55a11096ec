"""Early stopping with the best weights kept (preftune.train.engine.stopping), and the pieces of issue 16's
defaults that are plain arithmetic: the prompt split of the held-out judge, PPO's score normalisation, the
automatic snapshot and iteration counts."""

from __future__ import annotations

import statistics

import pytest
import torch

from preftune.config.ppo import PPOConfig
from preftune.train.engine import BestSoFar, EarlyStopping, StopRule
from preftune.train.ppo.driver import planned_iterations
from preftune.train.ppo.scores import RunningMoments
from preftune.train.reward import split_by_prompt
from preftune.train.snapshots import snapshot_count


def _model(value: float) -> torch.nn.Linear:
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_the_best_weights_come_back_and_patience_ends_training() -> None:
    stopping = EarlyStopping(StopRule("accuracy", patience=2), BestSoFar())
    model = _model(0.0)
    # step 0 is the starting point: never a candidate, however good it looks
    assert stopping.observe(0, {"accuracy": 0.99}, model) is False and stopping.best.step == -1
    for step, accuracy in ((10, 0.7), (20, 0.9)):
        model.weight.data.fill_(step)
        assert stopping.observe(step, {"accuracy": accuracy}, model) is False
    model.weight.data.fill_(30)
    assert stopping.observe(30, {"accuracy": 0.9}, model) is False  # a tie is no improvement (earliest wins)
    model.weight.data.fill_(40)
    assert stopping.observe(40, {"accuracy": 0.8}, model) is True  # two evaluations without improvement
    assert (stopping.best.step, stopping.best.value) == (20, 0.9)
    assert stopping.restore(model, 40) is True
    assert torch.equal(model.weight, torch.full((1, 2), 20.0))
    assert stopping.restore(model, 20) is False  # already the best


def test_ties_by_loss_and_the_record_survives_a_checkpoint() -> None:
    rule = StopRule("accuracy", patience=0, ties_by_loss=True)
    stopping = EarlyStopping(rule, BestSoFar())
    stopping.observe(5, {"accuracy": 1.0, "loss": 0.5}, _model(5))
    stopping.observe(10, {"accuracy": 1.0, "loss": 0.2}, _model(10))  # same accuracy, more confident
    assert (
        stopping.observe(15, {"accuracy": 1.0, "loss": 0.3}, _model(15)) is False
    )  # patience 0: never stops
    assert stopping.best.step == 10
    resumed = EarlyStopping(rule, BestSoFar(**vars(stopping.best)))
    resumed.load(stopping.tensors())
    model = _model(99)
    assert resumed.restore(model, 15) and torch.equal(model.weight, torch.full((1, 2), 10.0))


def test_the_judge_and_the_policy_reward_model_never_share_a_prompt() -> None:
    features = [
        {"prompt_ids": [p], "index": i, "pair": i} for i, p in enumerate([1, 1, 2, 3, 3, 3, 4, 5] * 25)
    ]
    judge = split_by_prompt(features, "judge", 0.25, seed=0)
    policy = split_by_prompt(features, "policy", 0.25, seed=0)
    assert len(judge) + len(policy) == len(features)
    assert not {tuple(f["prompt_ids"]) for f in judge} & {tuple(f["prompt_ids"]) for f in policy}
    assert [f["index"] for f in judge] == list(range(len(judge)))  # re-indexed for the loader
    assert split_by_prompt(features, "all", 0.25, seed=0) is features
    many = [{"prompt_ids": [p], "index": p} for p in range(4000)]
    share = len(split_by_prompt(many, "judge", 0.25, seed=3)) / len(many)
    assert share == pytest.approx(0.25, abs=0.03)


def test_running_moments_normalise_by_every_score_so_far() -> None:
    moments = RunningMoments()
    first, second = [1.0, 2.0, 3.0], [10.0, 20.0]
    moments.update(torch.tensor(first))
    moments.update(torch.tensor(second))
    everything = first + second
    assert moments.count == 5 and moments.mean == pytest.approx(statistics.fmean(everything))
    assert moments.std == pytest.approx(statistics.pstdev(everything))
    scaled = moments.normalise(torch.tensor([moments.mean, 1e6]), clip=5.0)
    assert scaled.tolist() == pytest.approx([0.0, 5.0])
    assert RunningMoments().std == 1.0  # nothing to scale by yet


def test_automatic_counts() -> None:
    assert snapshot_count(-1, use_lora=True) == 8 and snapshot_count(-1, use_lora=False) == 3
    # full weights of a small model are cheap to keep: as many as adapters; of a large one, 3
    assert snapshot_count(-1, use_lora=False, parameters=500_000) == 8
    assert snapshot_count(-1, use_lora=False, parameters=7_000_000_000) == 3
    assert snapshot_count(5, use_lora=True) == 5
    config = PPOConfig(rollout_batch_size=32)
    assert planned_iterations(config, 20) == 8  # at least 8
    assert planned_iterations(config, 1000) == 32  # one pass over the prompts
    assert planned_iterations(config, 10**6) == 64  # at most 64
    assert planned_iterations(PPOConfig(iterations=5), 10**6) == 5
