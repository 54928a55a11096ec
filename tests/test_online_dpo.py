"""Online DPO (preftune.train.online_dpo) on tiny random Llamas built offline: pairs from ranked samples, the
reference staying the SFT model, the first step's ln 2, and the judge's reward rising round after round."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_counting_reward, make_policy_dir, write_jsonl

from preftune.config.fields import ConfigError
from preftune.config.online_dpo import OnlineDPOConfig, validate
from preftune.model import modeling
from preftune.model.templating import render_prompt
from preftune.train.online_dpo import rollout_pairs, train_online_dpo
from preftune.train.ppo.rollout import Rollout
from preftune.train.snapshots import read_index

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("online_dpo")
    sft = make_policy_dir(root / "sft")
    tok = modeling.load_tokenizer(sft)
    model = modeling.load_causal_lm(sft).eval()
    ids = tok(render_prompt(tok, [{"role": "user", "content": "question 0"}]), add_special_tokens=False)
    with torch.no_grad():
        target = int(model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, -1].argmax())
    return {
        "sft": sft,
        "reward": make_counting_reward(sft, root / "reward", target),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(24)]),
    }


def _config(**overrides: Any) -> OnlineDPOConfig:
    values: dict[str, Any] = dict(
        rounds=8,
        prompts_per_round=12,
        num_generations=4,
        batch_size=6,
        learning_rate=3e-3,
        max_prompt_length=32,
        max_new_tokens=12,
        forward_batch_size=24,
        kl_blowup=50.0,
    )
    values.update(overrides)
    return OnlineDPOConfig(**values)


def test_each_group_s_best_and_worst_answers_become_a_dpo_pair() -> None:
    k = 3
    prompt_tokens = [[1, 2], [1, 2], [1, 2], [1, 3], [1, 3], [1, 3]]
    responses = [[10, 2], [11, 2], [12], [13, 2], [14, 2], [15, 2]]
    rollout = Rollout(
        query_ids=torch.zeros(6, 2, dtype=torch.long),
        query_mask=torch.ones(6, 2, dtype=torch.long),
        response_ids=torch.zeros(6, 2, dtype=torch.long),
        response_mask=torch.ones(6, 2, dtype=torch.long),
        prompts=[[{"role": "user", "content": "q"}]] * 6,
        texts=["a", "b", "c", "d", "e", "f"],
        ended=torch.tensor([True, True, False, True, True, True]),
        prompt_tokens=prompt_tokens,
        response_tokens=responses,
    )
    scores = torch.tensor([0.5, 2.0, -1.0, 0.3, 0.3, 0.3])  # group 2 all tied: no pair
    pairs = rollout_pairs(rollout, scores, k, 0.0)
    assert pairs == [
        {
            "prompt_ids": [1, 2],
            "chosen_ids": [11, 2],  # the best answer, as sampled (with its eos)
            "rejected_ids": [12],  # the worst, cut without eos: trained on as sampled
            "chosen_score": 2.0,
            "rejected_score": -1.0,
            "index": 0,
        }
    ]
    assert rollout_pairs(rollout, scores, k, 3.0) == []  # a gap of 3 or less is no preference


def test_config_refusals() -> None:
    with pytest.raises(ConfigError, match=r"batch_size \(16\) is larger than the pairs a round can give"):
        validate(_config(batch_size=16))
    with pytest.raises(ConfigError, match="OnlineDPOConfig.loss_type"):
        validate(_config(loss_type="kto"))
    with pytest.raises(ConfigError, match="reward_functions entry"):
        validate(_config(reward_functions="nope"))


METRICS = {
    "reward_first", "reward_last", "reward_gain", "kl_last", "kl_max", "entropy_last", "response_length_last",
    "distinct_answers_last", "iterations", "kl_blowups", "train_seconds", "rollout_seconds",
    "rollout_tokens_per_second", "resumed_from_iteration", "stage_seconds", "peak_memory_mb", "train_tokens",
    "pairs", "first_step_loss", "train_loss_last", "reward_accuracy_last",
}  # fmt: skip


def test_online_dpo_raises_the_judge_s_reward_against_the_sft_reference(
    world: dict[str, str], tmp_path: Path
) -> None:
    out, report = tmp_path / "policy", tmp_path / "report.html"
    metrics = train_online_dpo(
        world["sft"], world["reward"], world["prompts"], str(out), str(report), _config(rounds=10, num_checkpoints=2),
        snapshot_dir=str(tmp_path / "snapshots"),
    )  # fmt: skip
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))

    assert set(metrics) == METRICS
    assert metrics["iterations"] == 10 and metrics["kl_blowups"] == 0
    assert metrics["pairs"] == 120  # every prompt of every round ranked its answers into a pair
    # step 1: the policy is the reference (both scored under the SFT model), so the loss is exactly ln 2
    assert metrics["first_step_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["reward_last"] > metrics["reward_first"] + 0.05, metrics
    assert 0 < metrics["kl_max"] < 15
    lineage = json.loads((out / "lineage.json").read_text())
    assert (
        lineage["stage"] == "online_dpo" and lineage["parent"] == world["sft"] and lineage["adapter"] is True
    )
    assert lineage["parameters"]["rounds"] == 10 and lineage["parameters"]["num_generations"] == 4
    assert [s["step"] for s in read_index(tmp_path / "snapshots")] == [1, 4]  # denser early
    html = report.read_text()
    assert "Online DPO training" in html and "ln 2 = 0.6931 expected" in html and "chosen_score" in html


def test_the_reference_stays_the_sft_model_round_after_round(world: dict[str, str], tmp_path: Path) -> None:
    from preftune.train import online_dpo

    seen: list[float] = []
    real = online_dpo.OnlineDPOTrainer._reference_logps

    def record(self, pairs):  # the reference log-probs of round r's pairs, re-scored under the SFT model
        real(self, pairs)
        if pairs:
            sft = modeling.load_causal_lm(world["sft"]).eval()
            p = pairs[0]
            seq = torch.tensor([p["prompt_ids"] + p["chosen_ids"]])
            with torch.no_grad():
                logits = sft(input_ids=seq).logits[0, len(p["prompt_ids"]) - 1 : -1]
            alone = torch.log_softmax(logits, -1).gather(-1, seq[0, len(p["prompt_ids"]) :, None]).sum()
            seen.append(abs(float(alone) - p["ref_chosen_logps"]))

    online_dpo.OnlineDPOTrainer._reference_logps = record
    try:
        train_online_dpo(
            world["sft"], world["reward"], world["prompts"], str(tmp_path / "m"), str(tmp_path / "r.html"),
            _config(rounds=3, learning_rate=1e-2),
        )  # fmt: skip
    finally:
        online_dpo.OnlineDPOTrainer._reference_logps = real
    assert len(seen) == 3 and max(seen) < 1e-4


def test_a_round_without_pairs_trains_nothing(world: dict[str, str], tmp_path: Path) -> None:
    metrics = train_online_dpo(
        world["sft"], world["reward"], world["prompts"], str(tmp_path / "m"), str(tmp_path / "r.html"),
        _config(rounds=2, min_score_gap=1e6),
    )  # fmt: skip
    assert metrics["pairs"] == 0 and metrics["iterations"] == 2
    assert math.isnan(metrics["first_step_loss"]) and metrics["kl_max"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("use_lora", "expected"), [(True, 5e-4), (False, 5e-5)])
def test_the_default_learning_rate_follows_use_lora(
    world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_lora: bool, expected: float
) -> None:
    """-1 (the default) trains all weights at a tenth of LoRA's rate: the optimiser gets the resolved one."""
    from preftune.train import online_dpo

    seen = []
    real = online_dpo.make_optimizer

    def spy(model, learning_rate, weight_decay):  # noqa: ANN001, ANN202 - the patched function's own shape
        seen.append(learning_rate)
        return real(model, learning_rate, weight_decay)

    monkeypatch.setattr(online_dpo, "make_optimizer", spy)
    config = _config(rounds=1, prompts_per_round=6, use_lora=use_lora, learning_rate=-1.0)
    train_online_dpo(
        world["sft"], world["reward"], world["prompts"], str(tmp_path / "m"), str(tmp_path / "r.html"), config
    )
    assert seen == [pytest.approx(expected)]
