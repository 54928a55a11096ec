"""PPO's losses, GAE, whitening, reward shaping and KL controllers against arithmetic done by hand."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.model.losses import (
    entropy_from_logits,
    gae,
    masked_mean,
    masked_moments,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)
from preftune.train.kl_control import AdaptiveKLController, FixedKLController, make_kl_controller

approx = pytest.approx


def t(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_masked_mean_ignores_padding_and_survives_an_empty_mask() -> None:
    x, mask = t([1.0, 2.0, 100.0], [3.0, 100.0, 100.0]), t([1, 1, 0], [1, 0, 0])
    assert masked_mean(x, mask).item() == approx(2.0)  # (1 + 2 + 3) / 3
    assert masked_mean(x, mask, dim=1).tolist() == approx([1.5, 3.0])
    assert masked_mean(x, torch.zeros_like(x)).item() == 0.0


def test_gae_by_hand() -> None:
    # One row of 3 response tokens then one padding position; gamma = 0.9, lambda = 0.5.
    rewards = t([0.0, 0.0, 1.0, 7.0])  # the 7 is padding and must be ignored
    values = t([0.5, 0.4, 0.2, 9.0])  # so must the 9
    mask = t([1, 1, 1, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta_2 = 1 + 0.9 * 0 - 0.2 = 0.8                       (bootstrap 0 after the last token)
    # delta_1 = 0 + 0.9 * 0.2 - 0.4 = -0.22
    # delta_0 = 0 + 0.9 * 0.4 - 0.5 = -0.14
    # A_2 = 0.8
    # A_1 = -0.22 + 0.45 * 0.8 = 0.14
    # A_0 = -0.14 + 0.45 * 0.14 = -0.077
    assert adv.tolist() == [approx([-0.077, 0.14, 0.8, 0.0], abs=1e-6)]
    # returns = A + V: -0.077 + 0.5 = 0.423, 0.14 + 0.4 = 0.54, 0.8 + 0.2 = 1.0
    assert ret.tolist() == [approx([0.423, 0.54, 1.0, 0.0], abs=1e-6)]


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards, values, mask = (
        t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0]),
        t([1.0, 1.0, 1.0], [2.0, 0.0, 0.0]),
        t([1, 1, 1], [1, 0, 0]),
    )
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: returns are the rewards to go 6, 5, 3; advantages 6 - 1, 5 - 1, 3 - 1
    assert adv[0].tolist() == approx([5.0, 4.0, 2.0]) and ret[0].tolist() == approx([6.0, 5.0, 3.0])
    # row 1 has one token: A = 4 - 2 = 2, and nothing leaks from the padding after it
    assert adv[1].tolist() == approx([2.0, 0.0, 0.0]) and ret[1].tolist() == approx([4.0, 0.0, 0.0])


def test_whiten_by_hand_and_with_a_reduce_hook() -> None:
    x, mask = t([1.0, 2.0, 50.0], [3.0, 4.0, 50.0]), t([1, 1, 0], [1, 1, 0])
    # masked values 1, 2, 3, 4: mean 2.5, unbiased variance ((1.5^2 + 0.5^2) * 2) / 3 = 5 / 3
    mean, var = masked_moments(x, mask)
    assert mean.item() == approx(2.5) and var.item() == approx(5 / 3)
    w = whiten(x, mask)
    s = math.sqrt(5 / 3)
    assert w.tolist() == [
        approx([-1.5 / s, -0.5 / s, 0.0], abs=1e-6),
        approx([0.5 / s, 1.5 / s, 0.0], abs=1e-6),
    ]
    # shift_mean=False only rescales: (x - 2.5) / s + 2.5
    kept = whiten(x, mask, shift_mean=False)
    assert kept[0, 0].item() == approx(-1.5 / s + 2.5, abs=1e-6) and kept[0, 2].item() == 0.0
    # Precomputed moments are used as given.
    given = whiten(x, mask, moments=(torch.tensor(0.0), torch.tensor(4.0)))
    assert given[1, 1].item() == approx(4.0 / 2.0, abs=1e-6)
    # A reduce hook sees the sums: doubling them (two identical "ranks") leaves the mean alone, and the variance
    # becomes the moments of the duplicated data, 2 * 5 / (8 - 1) = 10 / 7.
    calls = []

    def twice(v: torch.Tensor) -> torch.Tensor:
        calls.append(v.clone())
        return v * 2

    mean2, var2 = masked_moments(x, mask, reduce=twice)
    assert len(calls) == 2 and mean2.item() == approx(2.5) and var2.item() == approx(10 / 7)


def test_ppo_policy_loss_by_hand() -> None:
    # Three tokens and one padding token. ratio = exp(logp - old): e^0.5 = 1.6487, e^-0.5 = 0.6065, 1, (pad).
    logprobs = t([0.5, -0.5, 0.0, 3.0])
    old = t([0.0, 0.0, 0.0, 0.0])
    adv = t([1.0, 1.0, -2.0, 5.0])
    mask = t([1, 1, 1, 0])
    loss, clip_frac, approx_kl = ppo_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    r0, r1 = math.exp(0.5), math.exp(-0.5)
    # token 0: A = 1, max(-1.6487, -1.2) = -1.2 (clipped term wins)
    # token 1: A = 1, max(-0.6065, -0.8) = -0.6065 (unclipped wins: the loss stays pessimistic)
    # token 2: A = -2, ratio 1: max(2, 2) = 2 (a tie is not clipped)
    assert loss.item() == approx((-1.2 - r1 + 2.0) / 3, abs=1e-6)
    assert clip_frac.item() == approx(1 / 3)
    # approx KL = mean((r - 1) - log r): (0.6487 - 0.5) + (-0.3935 + 0.5) + 0 = 0.1487 + 0.1065
    assert approx_kl.item() == approx(((r0 - 1 - 0.5) + (r1 - 1 + 0.5)) / 3, abs=1e-6)
    # The gradient flows through the unclipped tokens only: d/dlogp of -A * ratio = -A * ratio for token 1
    lp = logprobs.clone().requires_grad_(True)
    ppo_policy_loss(lp, old, adv, mask, clip_range=0.2)[0].backward()
    assert lp.grad[0].tolist() == approx([0.0, -r1 / 3, 2.0 / 3, 0.0], abs=1e-6)


def test_ppo_policy_loss_at_the_rollout_policy_is_minus_the_mean_advantage() -> None:
    adv, mask = t([0.3, -1.0, 2.0]), t([1, 1, 1])
    loss, clip_frac, approx_kl = ppo_policy_loss(t([-1.0, -2.0, -3.0]), t([-1.0, -2.0, -3.0]), adv, mask, 0.2)
    assert (
        loss.item() == approx(-(0.3 - 1.0 + 2.0) / 3) and clip_frac.item() == 0.0 and approx_kl.item() == 0.0
    )


def test_ppo_value_loss_by_hand() -> None:
    values = t([1.0, 0.5, 2.0, 9.0])
    old = t([0.5, 0.5, 1.0, 0.0])
    returns = t([2.0, 0.0, 1.0, 0.0])
    mask = t([1, 1, 1, 0])
    loss, clip_frac = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # token 0: V 1 moved 0.5 from 0.5 -> clipped 0.7; errors (1 - 2)^2 = 1, (0.7 - 2)^2 = 1.69 -> 1.69 (clipped)
    # token 1: unchanged: (0.5 - 0)^2 = 0.25 both -> 0.25 (tie, not counted as clipped)
    # token 2: V 2 moved 1 from 1 -> clipped 1.2; errors (2 - 1)^2 = 1, (1.2 - 1)^2 = 0.04 -> 1 (unclipped)
    assert loss.item() == approx(0.5 * (1.69 + 0.25 + 1.0) / 3, abs=1e-6)
    assert clip_frac.item() == approx(1 / 3)


def test_shape_rewards_puts_the_score_on_the_last_response_token() -> None:
    logprobs = t([-1.0, -2.0, -0.5, -9.0], [-1.0, -4.0, -4.0, -4.0])
    ref = t([-1.5, -1.0, -0.5, -1.0], [-3.0, -1.0, -1.0, -1.0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])  # row 0 ends (eos) at token 2, row 1 at token 0
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = shape_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # per-token KL = logp - ref: row 0: 0.5, -1, 0, (masked); row 1: 2, (masked)...
    assert kl.tolist() == [approx([0.5, -1.0, 0.0, 0.0]), approx([2.0, 0.0, 0.0, 0.0])]
    # rewards = -0.1 * kl, + score at the last masked token: row 0: -0.05, 0.1, 0 + 2; row 1: -0.2 - 1
    assert rewards.tolist() == [approx([-0.05, 0.1, 2.0, 0.0]), approx([-1.2, 0.0, 0.0, 0.0])]


def test_shape_rewards_skips_rows_without_response_tokens() -> None:
    rewards, _ = shape_rewards(torch.tensor([5.0]), t([0.0, 0.0]), t([0.0, 0.0]), t([0, 0]), kl_coef=0.1)
    assert rewards.tolist() == [[0.0, 0.0]]


def test_entropy_from_logits_by_hand_and_chunked() -> None:
    # Uniform over 4: ln 4. Two equal logits and two at -inf-ish: ln 2.
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, -1e4, -1e4]]])
    assert entropy_from_logits(logits).tolist() == [approx([math.log(4), math.log(2)], abs=1e-5)]
    big = torch.randn(3, 7, 11)
    reference = -(torch.softmax(big, -1) * torch.log_softmax(big, -1)).sum(-1)
    assert torch.allclose(entropy_from_logits(big, chunk_size=2), reference, atol=1e-5)


def test_adaptive_kl_controller_by_hand() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    # KL 9 is 50% over target: the error is clipped to +0.2; coef *= 1 + 0.2 * 100 / 1000 = 1.02
    assert ctl.update(9.0, n_steps=100) == approx(0.102)
    # KL 5.4 is 10% under: coef *= 1 - 0.1 * 100 / 1000 = 0.99 -> 0.102 * 0.99 = 0.10098
    assert ctl.update(5.4, n_steps=100) == approx(0.10098)
    # KL 0 is 100% under, clipped to -0.2: coef *= 1 - 0.2 * 500 / 1000 = 0.9 -> 0.090882
    assert ctl.update(0.0, n_steps=500) == approx(0.090882)
    assert ctl.value == approx(0.090882)
    state = ctl.state_dict()
    again = AdaptiveKLController(1.0, target=1.0, horizon=1)
    again.load_state_dict(state)
    assert again.value == approx(0.090882) and again.target == 6.0 and again.horizon == 1000
    with pytest.raises(ValueError, match="cannot load"):
        FixedKLController(0.1).load_state_dict(state)


def test_fixed_kl_controller_and_factory() -> None:
    ctl = make_kl_controller("fixed", 0.05, target=6.0, horizon=10)
    assert isinstance(ctl, FixedKLController) and ctl.update(100.0, 64) == 0.05 and ctl.value == 0.05
    assert isinstance(make_kl_controller("adaptive", 0.05, 6.0, 10), AdaptiveKLController)
    with pytest.raises(ValueError, match="unknown KL controller"):
        make_kl_controller("pid", 0.05, 6.0, 10)
