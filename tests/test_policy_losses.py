"""preftune.model.policy_losses against arithmetic done by hand: group advantages (GRPO, Dr. GRPO), the
leave-one-out baseline (RLOO), the clipped ratio loss and its KL term, KTO's loss and reference point, and online
DPO's pairs from ranked samples."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.model.policy_losses import (
    ESTIMATORS,
    best_worst_pairs,
    clipped_policy_loss,
    group_advantages,
    k3_kl,
    kto_loss,
    kto_reference_point,
    leave_one_out_advantages,
    mismatched_order,
    sequence_kl,
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------ advantages


def test_grpo_advantages_are_normalised_within_each_group() -> None:
    # group 1: rewards 1, 2, 3, 6: mean 3, deviations -2, -1, 0, 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
    # group 2: all 5: no deviation, so 0 whatever the std (0 + 1e-4)
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt(14 / 3)
    expected = [-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-6)


def test_dr_grpo_advantages_only_subtract_the_group_mean() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 1.0, 0.0, 1.0])
    # means 3 and 0.5; no division by the std (which would blow up the second group's small differences)
    assert group_advantages(rewards, 4, scale=False).tolist() == [-2.0, -1.0, 0.0, 3.0, -0.5, 0.5, -0.5, 0.5]
    assert torch.equal(
        ESTIMATORS["dr_grpo"].advantages(rewards, 4), group_advantages(rewards, 4, scale=False)
    )


def test_leave_one_out_baseline_is_the_mean_of_the_other_answers() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    # baselines: (2 + 3 + 6) / 3 = 11/3, (1 + 3 + 6) / 3 = 10/3, (1 + 2 + 6) / 3 = 3, (1 + 2 + 3) / 3 = 2
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2]
    assert leave_one_out_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-6)
    # the same as K / (K - 1) x (r - group mean)
    scaled = (4 / 3 * group_advantages(rewards, 4, scale=False)).tolist()
    assert leave_one_out_advantages(rewards, 4).tolist() == pytest.approx(scaled, abs=1e-6)
    # with two answers each is the other's baseline
    assert leave_one_out_advantages(torch.tensor([0.25, 1.0]), 2).tolist() == [-0.75, 0.75]


@pytest.mark.parametrize("size", [1, 3])
def test_advantages_refuse_what_is_not_whole_groups(size: int) -> None:
    with pytest.raises(ValueError, match="group"):
        group_advantages(torch.zeros(4), size)


# ------------------------------------------------------------------------------------------- the clipped loss


def test_k3_and_summed_log_ratio_by_hand() -> None:
    logprobs, ref = torch.tensor([[-1.0, -0.5]]), torch.tensor([[-2.0, -0.5]])
    # delta = ref - logp = -1, 0: exp(-1) + 1 - 1 = 0.36788, exp(0) - 0 - 1 = 0
    assert k3_kl(logprobs, ref).tolist()[0] == pytest.approx([math.exp(-1), 0.0], abs=1e-6)
    assert sequence_kl(logprobs, ref, torch.tensor([[1, 1]])).tolist() == [1.0]
    assert sequence_kl(logprobs, ref, torch.tensor([[0, 1]])).tolist() == [0.0]


# Two answers: the first has two tokens, the second one (then padding). Log-ratios new - old: 0.1, -0.5 | 0.3.
NEW = torch.tensor([[-1.0, -2.5], [-0.7, -9.0]])
OLD = torch.tensor([[-1.1, -2.0], [-1.0, -3.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
ADV = torch.tensor([1.0, -2.0])


def test_token_level_clipped_loss_averages_per_answer_then_over_answers() -> None:
    out = clipped_policy_loss(NEW, OLD, ADV, MASK, clip_low=0.2)
    r = [math.exp(0.1), math.exp(-0.5), math.exp(0.3)]
    # answer 1 (A = 1): -min(r A, clip(r) A): -min(1.105, 1.105) = -1.105; -min(0.607, 0.8) = -0.607
    # answer 2 (A = -2): -min(-2 r, -2 clip(r)) = 2 max(r, clip(r)) = 2 x 1.350 (clip would be 1.2)
    answer_1 = (-r[0] - r[1]) / 2
    answer_2 = 2 * r[2]
    assert float(out.loss) == pytest.approx((answer_1 + answer_2) / 2, abs=1e-6)
    # clipped region: token 2 (r < 0.8 with A > 0 is not it: that is where min keeps the unclipped value) and
    # token 3 (r > 1.2 with A < 0 is not either): nothing is clipped here
    assert float(out.clip_fraction) == 0.0
    # approx KL over the 3 real tokens of (r - 1) - log r
    approx = sum((x - 1) - math.log(x) for x in r) / 3
    assert float(out.approx_kl) == pytest.approx(approx, abs=1e-6)


def test_the_clip_cuts_the_gradient_where_the_ratio_left_the_trust_region() -> None:
    new = torch.tensor([[0.5, 0.0]], requires_grad=True)  # ratio e^0.5 = 1.65 on token 1, 1 on token 2
    out = clipped_policy_loss(new, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_low=0.2)
    # token 1: -min(1.65, 1.2) = -1.2 (clipped, no gradient); token 2: -1 (gradient -1 / 2 from the mean)
    assert float(out.loss.detach()) == pytest.approx((-1.2 - 1.0) / 2, abs=1e-6)
    assert float(out.clip_fraction) == 0.5
    out.loss.backward()
    assert new.grad.tolist()[0] == pytest.approx([0.0, -0.5], abs=1e-6)


def test_clip_high_widens_the_upper_bound_only() -> None:
    new = torch.tensor([[0.5]])  # ratio 1.6487
    out = clipped_policy_loss(
        new, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), clip_low=0.2, clip_high=0.28
    )
    assert float(out.loss) == pytest.approx(-1.28, abs=1e-6)


def test_dr_grpo_divides_the_token_sum_by_a_constant_length() -> None:
    out = clipped_policy_loss(NEW, OLD, ADV, MASK, aggregation="constant_length", max_length=4)
    r = [math.exp(0.1), math.exp(-0.5), math.exp(0.3)]
    # every token counts the same, whatever its answer's length: (sum of the 3 token losses) / (2 answers x 4)
    assert float(out.loss) == pytest.approx((-r[0] - r[1] + 2 * r[2]) / 8, abs=1e-6)
    with pytest.raises(ValueError, match="max_length"):
        clipped_policy_loss(NEW, OLD, ADV, MASK, aggregation="constant_length")


def test_sequence_level_ratio_is_the_answer_s_summed_log_ratio() -> None:
    out = clipped_policy_loss(NEW, OLD, ADV, MASK, clip_low=0.2, level="sequence")
    # answer 1: log-ratio 0.1 - 0.5 = -0.4, ratio 0.670, A = 1: -min(0.670, 0.8) = -0.670
    # answer 2: log-ratio 0.3 (its padding ignored), ratio 1.350, A = -2: 2 x max(1.350, 1.2) = 2.700
    expected = (-math.exp(-0.4) + 2 * math.exp(0.3)) / 2
    assert float(out.loss) == pytest.approx(expected, abs=1e-6)
    assert float(out.clip_fraction) == 0.0


def test_kl_loss_term_is_aggregated_like_the_policy_term() -> None:
    ref = torch.tensor([[-2.0, -2.5], [-0.7, -1.0]])  # k3: e^-1 (delta -1), 0, 0 | padding ignored
    plain = clipped_policy_loss(NEW, OLD, ADV, MASK)
    with_kl = clipped_policy_loss(NEW, OLD, ADV, MASK, ref_logprobs=ref, kl_coef=0.5)
    # per answer means: (e^-1 + 0) / 2 and 0; then the mean over answers: e^-1 / 4
    assert float(with_kl.kl_loss) == pytest.approx(math.exp(-1) / 4, abs=1e-6)
    assert float(with_kl.loss) == pytest.approx(float(plain.loss) + 0.5 * math.exp(-1) / 4, abs=1e-6)
    assert float(with_kl.kl) == pytest.approx(math.exp(-1) / 3, abs=1e-6)  # mean per real token
    sequence = clipped_policy_loss(NEW, OLD, ADV, MASK, level="sequence", ref_logprobs=ref, kl_coef=1.0)
    assert float(sequence.kl_loss) == pytest.approx(math.exp(-1) / 2, abs=1e-6)  # summed per answer, mean


# ------------------------------------------------------------------------------------------------------- KTO


def test_kto_reference_point_is_the_clamped_mean_log_ratio_on_mismatched_pairs() -> None:
    kl_logps, ref = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-4.0, -5.0, -4.0])
    assert float(kto_reference_point(kl_logps, ref)) == pytest.approx(1.0)  # (1 + 0 + 2) / 3
    assert float(kto_reference_point(ref, kl_logps)) == 0.0  # -1 clamps to 0
    assert float(kto_reference_point(kl_logps, ref, reduce=lambda t: t * 0.5)) == pytest.approx(0.5)
    assert not kto_reference_point(kl_logps.requires_grad_(), ref).requires_grad


def test_mismatched_order_pairs_each_prompt_with_the_previous_answer() -> None:
    assert mismatched_order(4) == [3, 0, 1, 2]
    assert all(i != j for i, j in enumerate(mismatched_order(5)))
    assert mismatched_order(1) == [0]


def test_kto_loss_by_hand() -> None:
    # desirable with log-ratio 2, undesirable with log-ratio -1 and with 0.5; z0 = 0.5, beta = 0.1
    logps, ref = torch.tensor([-1.0, -4.0, -2.5]), torch.tensor([-3.0, -3.0, -3.0])
    desirable = torch.tensor([True, False, False])
    losses, rewards = kto_loss(
        logps, ref, desirable, 0.5, beta=0.1, desirable_weight=1.33, undesirable_weight=1.0
    )
    expected = [
        1.33 * (1 - _sigmoid(0.1 * (2.0 - 0.5))),
        1.0 * (1 - _sigmoid(0.1 * (0.5 - -1.0))),
        1.0 * (1 - _sigmoid(0.1 * (0.5 - 0.5))),
    ]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.2, -0.1, 0.05], abs=1e-6)
    # the policy equal to the reference and z0 = 0: every loss is half its weight
    equal, _ = kto_loss(ref, ref, desirable, 0.0, beta=0.1, desirable_weight=2.0)
    assert equal.tolist() == [1.0, 0.5, 0.5]


def test_kto_loss_pushes_desirable_up_and_undesirable_down() -> None:
    logps = torch.tensor([-2.0, -2.0], requires_grad=True)
    losses, _ = kto_loss(logps, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), 0.0, beta=0.1)
    losses.sum().backward()
    desirable_grad, undesirable_grad = logps.grad.tolist()
    assert desirable_grad < 0 < undesirable_grad  # descent raises the first, lowers the second


# ------------------------------------------------------------------------------------------------ online DPO


def test_online_dpo_pairs_each_group_s_best_answer_with_its_worst() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.2, 0.2, 1.0, -1.0, 1.0, 0.3, 0.0, 0.35])
    # group 0: best 1 (0.9), worst 0 (0.1); group 1: all tied, no pair; group 2: best 6 (first of the tied
    # 1.0s), worst 7; group 3: best 11 (0.35), worst 10 (0.0)
    assert best_worst_pairs(scores, 3) == [(1, 0), (6, 7), (11, 10)]
    # a gap of 0.35 or less is no preference
    assert best_worst_pairs(scores, 3, min_gap=0.35) == [(1, 0), (6, 7)]
    assert best_worst_pairs(scores, 3, min_gap=5.0) == []
