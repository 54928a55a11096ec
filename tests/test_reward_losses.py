"""Reward-model losses (preftune.model.losses): hand-worked values, margins, and TRL's RewardTrainer loss."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from preftune.model.losses import bradley_terry_loss, reward_regression_loss

CHOSEN = torch.tensor([2.0, 0.0, -1.0])
REJECTED = torch.tensor([1.0, 0.0, 1.0])


def test_bradley_terry_without_margin_by_hand() -> None:
    # d = r_c - r_r = [1, 0, -2]; -log sigmoid(d) = log(1 + exp(-d)):
    #   log(1 + e^-1) = log(1.367879) = 0.313262
    #   log(1 + e^0)  = log(2)        = 0.693147
    #   log(1 + e^2)  = log(8.389056) = 2.126928
    losses = bradley_terry_loss(CHOSEN, REJECTED)
    assert losses.tolist() == pytest.approx([0.313262, 0.693147, 2.126928], abs=1e-6)
    assert float(losses.mean()) == pytest.approx((0.313262 + 0.693147 + 2.126928) / 3, abs=1e-6)
    assert losses.dtype == torch.float32


def test_bradley_terry_with_margin_by_hand() -> None:
    # margin [0.5, NaN, 1.0]: NaN means "this pair has none" and counts as 0, so d - m = [0.5, 0, -3]:
    #   log(1 + e^-0.5) = log(1.606531) = 0.474077
    #   log(1 + e^0)    = log(2)        = 0.693147
    #   log(1 + e^3)    = log(21.085537) = 3.048587
    margin = torch.tensor([0.5, float("nan"), 1.0])
    losses = bradley_terry_loss(CHOSEN, REJECTED, margin)
    assert losses.tolist() == pytest.approx([0.474077, 0.693147, 3.048587], abs=1e-6)
    # A margin makes every loss larger (the chosen answer must win by more), a zero margin changes nothing.
    assert torch.all(losses >= bradley_terry_loss(CHOSEN, REJECTED))
    assert torch.equal(
        bradley_terry_loss(CHOSEN, REJECTED, torch.zeros(3)), bradley_terry_loss(CHOSEN, REJECTED)
    )


def test_bradley_terry_gradient_by_hand() -> None:
    # d/d r_c of -log sigmoid(d) is -(1 - sigmoid(d)) = -sigmoid(-d); at d = 0 that is -0.5, and r_r gets +0.5.
    chosen = torch.zeros(1, requires_grad=True)
    rejected = torch.zeros(1, requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    assert chosen.grad.tolist() == pytest.approx([-0.5])
    assert rejected.grad.tolist() == pytest.approx([0.5])


def test_bradley_terry_computes_half_precision_inputs_in_float32() -> None:
    losses = bradley_terry_loss(CHOSEN.half(), REJECTED.bfloat16(), [0.5, 0.0, 1.0])
    assert losses.dtype == torch.float32
    assert losses.tolist() == pytest.approx([0.474077, 0.693147, 3.048587], abs=1e-6)


def test_bradley_terry_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        bradley_terry_loss(CHOSEN, REJECTED[:2])
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(CHOSEN, REJECTED, torch.zeros(2))


def test_reward_regression_by_hand() -> None:
    # (1 - 0)^2 = 1, (-0.5 - 0.5)^2 = 1, (2 - 2)^2 = 0; the MSE is 2 / 3.
    losses = reward_regression_loss(torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0]))
    assert losses.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert float(losses.mean()) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="does not match"):
        reward_regression_loss(torch.zeros(2), torch.zeros(3))


# --- against TRL (a test-only peer) ----------------------------------------------------------------------------


def _trl_reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None) -> float:
    """TRL's RewardTrainer.compute_loss on given rewards: a stand-in model returns them as its logits (chosen rows
    first, as TRL's collator stacks them), so only TRL's loss arithmetic runs."""
    trainer_module = pytest.importorskip("trl.trainer.reward_trainer")
    logits = torch.cat([chosen, rejected]).unsqueeze(-1)

    def model(**_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=logits)

    model.training = True  # type: ignore[attr-defined]
    trainer = SimpleNamespace(
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=None),
        accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.zeros(logits.shape[0], 2, dtype=torch.long),
        "attention_mask": torch.ones(logits.shape[0], 2, dtype=torch.long),
    }
    if margin is not None:
        inputs["margin"] = margin
    try:
        loss = trainer_module.RewardTrainer.compute_loss(trainer, model, inputs)
    except (AttributeError, TypeError, KeyError) as exc:  # TRL's internals changed shape
        pytest.skip(f"TRL's reward loss is not callable this way in this version: {exc}")
    return float(loss)


@pytest.mark.parametrize("with_margin", [False, True])
def test_matches_trl_reward_loss_on_random_batches(with_margin: bool) -> None:
    g = torch.Generator().manual_seed(7 + with_margin)
    for _ in range(5):
        chosen, rejected = (3.0 * torch.randn(16, generator=g) for _ in range(2))
        margin = torch.rand(16, generator=g) * 2.0 if with_margin else None
        ours = float(bradley_terry_loss(chosen, rejected, margin).mean())
        assert ours == pytest.approx(_trl_reward_loss(chosen, rejected, margin), abs=1e-5)
        assert math.isfinite(ours)
