"""preftune's GRPO, Dr. GRPO, RLOO and KTO objectives against TRL's own trainers on the same inputs, within 1e-5.

TRL is a test dependency only. Its objectives live inside trainer methods (``GRPOTrainer._generate_and_score_completions``
and ``_compute_loss``, ``RLOOTrainer``'s, ``KTOTrainer._compute_loss``), so each is called unbound on a stand-in
object that carries exactly the attributes the method reads; the stand-in's "model" returns fixed per-token
log-probabilities, so both sides see the same numbers. What is compared:

- advantages from the same rewards of two reward functions, weighted: GRPO's group normalisation, Dr. GRPO's
  (``scale_rewards="none"``), RLOO's leave-one-out baseline with the KL taken off the reward;
- the loss and its gradient with respect to the policy's log-probabilities, and the clipped share: GRPO and Dr.
  GRPO (per-token ratio, the k3 KL in the loss), RLOO (the sequence's ratio);
- KTO's loss, its gradient, and the reference point from mismatched pairs.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from preftune.model.policy_losses import (
    clipped_policy_loss,
    group_advantages,
    kto_loss,
    kto_reference_point,
    leave_one_out_advantages,
    sequence_kl,
)

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
trl_rloo = pytest.importorskip("trl.trainer.rloo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")

TOL = 1e-5
GROUPS, K, LONGEST = 3, 4, 6
N = GROUPS * K
WEIGHTS = torch.tensor([1.0, 0.5])


class _Accelerator:
    """One process: every collective is the identity."""

    device = torch.device("cpu")
    process_index = 0
    num_processes = 1
    sync_gradients = True

    def gather(self, x: Any) -> Any:
        return x

    gather_for_metrics = gather

    def reduce(self, x: Any, reduction: str = "sum") -> Any:
        return x


def _data(seed: int = 0) -> dict[str, Any]:
    """Answers of different lengths, their log-probs under the sampling policy, the reference and the current
    policy (moved away enough that some ratios leave the clip range), and two reward functions' values."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, LONGEST + 1, (N,), generator=g)
    lengths[0] = LONGEST
    mask = (torch.arange(LONGEST)[None] < lengths[:, None]).float()
    old = -torch.rand(N, LONGEST, generator=g) * 3 * mask
    ref = (old - 0.3 * torch.randn(N, LONGEST, generator=g)) * mask
    new = (old + 0.25 * torch.randn(N, LONGEST, generator=g)) * mask
    return {
        "lengths": lengths.tolist(),
        "mask": mask,
        "old": old,
        "ref": ref,
        "new": new,
        "rewards": torch.randn(N, 2, generator=g),
        "completion_ids": [list(range(10, 10 + n)) for n in lengths.tolist()],
        "prompt_ids": [[1, 2, 3] for _ in range(N)],
    }


def _metrics() -> dict[str, defaultdict]:
    return {"train": defaultdict(list), "eval": defaultdict(list)}


def _logs() -> dict[str, Any]:
    return {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
        "images": [],
    }


def _sampling_stand_in(data: dict[str, Any], *, beta: float, policy: Any, reference: Any) -> SimpleNamespace:
    """What TRL's ``_generate_and_score_completions`` (GRPO's and RLOO's) reads, with generation, scoring and
    the reward functions replaced by the fixed data."""

    def logps(model: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None, None]:
        return (data["old"] if model is policy else data["ref"]).clone(), None, None

    return SimpleNamespace(
        accelerator=_Accelerator(),
        model=policy,
        ref_model=reference,
        beta=beta,
        num_generations=K,
        num_iterations=1,
        reward_weights=WEIGHTS,
        reward_func_names=["first", "second"],
        multi_objective_aggregation="sum_then_normalize",
        reward_clip_range=None,
        normalize_advantages=False,
        environment_factories=None,
        environments=None,
        tools=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        mask_truncated_completions=False,
        pad_to_multiple_of=None,
        log_multimodal=False,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        args=SimpleNamespace(
            per_device_train_batch_size=N,
            per_device_eval_batch_size=N,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
        ),
        _metrics=_metrics(),
        _logs=_logs(),
        _pending_extra_logs={},
        _pending_metrics={},
        _get_per_token_logps_and_entropies=logps,
        _calculate_rewards=lambda *args: data["rewards"].clone(),
    )


def _trl_advantages(module: Any, trainer: str, data: dict[str, Any], **settings: Any) -> dict[str, Any]:
    policy = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    reference = SimpleNamespace(training=False, is_gradient_checkpointing=False)
    stand_in = _sampling_stand_in(data, beta=settings.pop("beta"), policy=policy, reference=reference)
    for name, value in settings.items():
        setattr(stand_in, name, value)
    texts = [f"answer {i}" for i in range(N)]
    if trainer == "GRPOTrainer":
        stand_in._generate = lambda prompts: (
            data["prompt_ids"],
            data["completion_ids"],
            None,
            texts,
            None,
            {},
            None,
            None,
        )
    else:
        stand_in._generate = lambda prompts: (data["prompt_ids"], data["completion_ids"], texts)
    inputs = [{"prompt": f"question {i // K}"} for i in range(N)]
    return getattr(module, trainer)._generate_and_score_completions(stand_in, inputs)


def _total_reward(data: dict[str, Any]) -> torch.Tensor:
    return (data["rewards"] * WEIGHTS).sum(dim=1)


@pytest.mark.parametrize(("scale_rewards", "scale"), [("group", True), ("none", False)])
def test_grpo_and_dr_grpo_advantages_match_trl(scale_rewards: str, scale: bool) -> None:
    data = _data()
    out = _trl_advantages(trl_grpo, "GRPOTrainer", data, beta=0.04, scale_rewards=scale_rewards)
    ours = group_advantages(_total_reward(data), K, scale=scale)
    assert torch.equal(out["completion_mask"].float(), data["mask"])  # both see the same answers
    assert ours.tolist() == pytest.approx(out["advantages"].tolist(), abs=TOL)
    assert float(ours.abs().max()) > 0.5  # a real signal, not zeros on both sides


def test_rloo_advantages_with_the_kl_reward_penalty_match_trl() -> None:
    data, beta = _data(1), 0.05
    out = _trl_advantages(trl_rloo, "RLOOTrainer", data, beta=beta)
    penalised = _total_reward(data) - beta * sequence_kl(data["old"], data["ref"], data["mask"])
    ours = leave_one_out_advantages(penalised, K)
    assert ours.tolist() == pytest.approx(out["advantages"].tolist(), abs=TOL)
    assert out["old_logps"].tolist() == pytest.approx((data["old"] * data["mask"]).sum(1).tolist(), abs=TOL)


def _loss_stand_in(new: torch.Tensor, **settings: Any) -> SimpleNamespace:
    """What TRL's ``_compute_loss`` (GRPO's and RLOO's) reads; the "model" returns ``new``."""
    return SimpleNamespace(
        accelerator=_Accelerator(),
        model=SimpleNamespace(training=True),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False),
        _metrics=_metrics(),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (new, torch.zeros_like(new), None),
        **settings,
    )


def _loss_inputs(data: dict[str, Any], advantages: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "prompt_ids": torch.ones(N, 3, dtype=torch.long),
        "prompt_mask": torch.ones(N, 3, dtype=torch.long),
        "completion_ids": torch.ones(N, LONGEST, dtype=torch.long),
        "completion_mask": data["mask"].long(),
        "advantages": advantages,
    }


@pytest.mark.parametrize(
    ("loss_type", "aggregation"), [("grpo", "sequence_mean"), ("dr_grpo", "constant_length")]
)
def test_grpo_and_dr_grpo_losses_and_gradients_match_trl(loss_type: str, aggregation: str) -> None:
    data, beta, longest = _data(2), 0.04, LONGEST + 2
    advantages = group_advantages(_total_reward(data), K, scale=loss_type == "grpo")
    trl_new = data["new"].clone().requires_grad_()
    stand_in = _loss_stand_in(
        trl_new,
        loss_type=loss_type,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=longest,
    )
    inputs = {
        **_loss_inputs(data, advantages),
        "old_per_token_logps": data["old"],
        "ref_per_token_logps": data["ref"],
    }
    trl_loss = trl_grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)
    trl_loss.backward()

    new = data["new"].clone().requires_grad_()
    ours = clipped_policy_loss(
        new,
        data["old"],
        advantages,
        data["mask"],
        clip_low=0.2,
        clip_high=0.28,
        aggregation=aggregation,
        max_length=longest,
        ref_logprobs=data["ref"],
        kl_coef=beta,
    )
    ours.loss.backward()
    assert float(ours.loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=TOL)
    gap = float((new.grad - trl_new.grad).abs().max())
    assert gap <= TOL, f"gradients differ by {gap}"
    assert float(ours.clip_fraction) == pytest.approx(
        stand_in._metrics["train"]["clip_ratio/region_mean"][0], abs=TOL
    )
    assert float(ours.clip_fraction) > 0  # the data does leave the trust region
    assert float(ours.kl) == pytest.approx(stand_in._metrics["train"]["kl"][0], abs=TOL)


def test_rloo_loss_and_gradient_match_trl() -> None:
    data = _data(3)
    advantages = leave_one_out_advantages(_total_reward(data), K)
    trl_new = data["new"].clone().requires_grad_()
    stand_in = _loss_stand_in(trl_new, epsilon_low=0.2, epsilon_high=0.2)
    inputs = {**_loss_inputs(data, advantages), "old_logps": (data["old"] * data["mask"]).sum(1)}
    trl_loss = trl_rloo.RLOOTrainer._compute_loss(stand_in, None, inputs)
    trl_loss.backward()

    new = data["new"].clone().requires_grad_()
    ours = clipped_policy_loss(new, data["old"], advantages, data["mask"], clip_low=0.2, level="sequence")
    ours.loss.backward()
    assert float(ours.loss.detach()) == pytest.approx(float(trl_loss.detach()), abs=TOL)
    assert float((new.grad - trl_new.grad).abs().max()) <= TOL
    assert float(ours.clip_fraction) == pytest.approx(
        stand_in._metrics["train"]["clip_ratio/region_mean"][0], abs=TOL
    )
    assert float(ours.clip_fraction) > 0


# ------------------------------------------------------------------------------------------------------- KTO


class _KTOModel:
    """Returns per-token log-probs of the answers, or of the mismatched answers when given their input ids."""

    def __init__(self, answers: torch.Tensor, mismatched: torch.Tensor, kl_ids: torch.Tensor) -> None:
        self.answers, self.mismatched, self.kl_ids = answers, mismatched, kl_ids

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> SimpleNamespace:
        log_probs = self.mismatched if input_ids is self.kl_ids else self.answers
        return SimpleNamespace(
            log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs)
        )


@pytest.mark.parametrize(("desirable_weight", "undesirable_weight"), [(1.0, 1.0), (1.33, 0.8)])
def test_kto_loss_reference_point_and_gradient_match_trl(
    desirable_weight: float, undesirable_weight: float
) -> None:
    g = torch.Generator().manual_seed(4)
    batch, width, beta = 8, 7, 0.1
    mask = (torch.arange(width - 1)[None] < torch.randint(2, width, (batch, 1), generator=g)).float()
    answers = -torch.rand(batch, width - 1, generator=g) * 2 * mask  # the policy's per-token log-probs
    mismatched = -torch.rand(batch, width - 1, generator=g) * 2 * mask
    ref_logps = answers.sum(1) - 0.5 * torch.randn(batch, generator=g)
    ref_kl_logps = mismatched.sum(1) - 0.2 - 0.3 * torch.rand(batch, generator=g)  # policy drifted: z0 > 0
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    kl_ids = torch.zeros(batch, width, dtype=torch.long)
    inputs = {
        "label": labels.long(),
        "input_ids": torch.ones(batch, width, dtype=torch.long),
        "attention_mask": torch.ones(batch, width, dtype=torch.long),
        "completion_mask": torch.ones(batch, width, dtype=torch.long),
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones(batch, width, dtype=torch.long),
        "KL_completion_mask": torch.ones(batch, width, dtype=torch.long),
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    trl_answers = answers.clone().requires_grad_()
    stand_in = SimpleNamespace(
        accelerator=_Accelerator(),
        model=SimpleNamespace(training=True),
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        aux_loss_enabled=False,
        _metrics=_metrics(),
        _total_train_tokens=0,
        _tp_size=1,
        _compute_kl_logps=lambda model, batch: trl_kto.KTOTrainer._compute_kl_logps(stand_in, model, batch),
    )
    trl_loss = trl_kto.KTOTrainer._compute_loss(
        stand_in, _KTOModel(trl_answers, mismatched, kl_ids), inputs, False
    )
    trl_loss.backward()

    policy = answers.clone().requires_grad_()
    z0 = kto_reference_point(mismatched.sum(1), ref_kl_logps)
    losses, _ = kto_loss(
        policy.sum(1),
        ref_logps,
        labels,
        z0,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    losses.mean().backward()
    assert float(z0) > 0.1
    assert float(z0) == pytest.approx(stand_in._metrics["train"]["kl"][0], abs=TOL)
    assert float(losses.mean().detach()) == pytest.approx(float(trl_loss.detach()), abs=TOL)
    assert float((policy.grad - trl_answers.grad).abs().max()) <= TOL
