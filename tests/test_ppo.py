"""Tests of preftune.train.ppo on tiny random Llamas built offline (seconds on CPU).

The reward model is a toy made by hand: a one-layer Llama classifier whose attention is uniform (query and key
projections zero) and whose score head points along one token's embedding, so its score grows with how often
that token appears. A policy can learn that within a few PPO iterations.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_counting_reward, make_policy_dir, write_jsonl

from preftune.config.ppo import validate
from preftune.model import modeling
from preftune.model.sampling import eos_ids_of
from preftune.model.templating import render_prompt
from preftune.train.batching import DataError
from preftune.train.ppo import (
    PPOConfig,
    TokenValueModel,
    adapter_off,
    generate_rollout,
    load_models,
    load_prompts,
    score_responses,
    score_rollout,
    train_ppo,
)

CPU = torch.device("cpu")


def _prompt_rows(n: int) -> list[dict]:
    rows: list[dict] = [{"prompt": f"question {i}"} for i in range(n)]
    rows.append({"prompt": [{"role": "user", "content": "question 1"}]})  # the same prompt as row 2
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ppo")
    sft = make_policy_dir(root / "sft", attention_dropout=0.1)
    # The target is the token the random policy likes most after a prompt, so samples contain it now and then.
    tok = modeling.load_tokenizer(sft)
    model = modeling.load_causal_lm(sft).eval()
    ids = tok(render_prompt(tok, [{"role": "user", "content": "question 0"}]), add_special_tokens=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, -1]
    target = int(logits.argmax())
    reward = make_counting_reward(sft, root / "reward", target)
    prompts = write_jsonl(root / "pairs.jsonl", _prompt_rows(20))
    return {"sft": sft, "reward": reward, "prompts": prompts}


def _config(**overrides) -> PPOConfig:
    values = dict(
        iterations=12,
        rollout_batch_size=24,
        mini_batch_size=8,
        ppo_epochs=2,
        learning_rate=3e-3,
        critic_learning_rate=1e-2,
        max_prompt_length=32,
        max_new_tokens=12,
        kl_coef=0.01,
        max_approx_kl=0.5,
        kl_blowup=50.0,
        forward_batch_size=16,
    )
    values.update(overrides)
    return PPOConfig(**values)


METRICS = {
    "reward_first", "reward_last", "reward_gain", "kl_last", "kl_max", "entropy_last", "clip_fraction_mean",
    "value_loss_last", "explained_variance_last", "response_length_last", "iterations", "early_stops",
    "kl_blowups", "train_seconds", "rollout_seconds", "rollout_tokens_per_second", "resumed_from_iteration",
    "stage_seconds", "peak_memory_mb", "train_tokens",
}  # fmt: skip


def test_ppo_raises_the_reward_and_saves_a_loadable_policy(world: dict[str, str], tmp_path: Path) -> None:
    out, report = tmp_path / "ppo", tmp_path / "ppo.html"
    # Both learning rates decay linearly to a tenth over the run (the default schedule), so the peak is 6e-3.
    # Over 12 iterations the toy task's gain ranged 0.03 to 0.87 across seeds; 20 iterations with PPO-max's score
    # normalisation (off by default, exercised here) gained 1.1 to 4.0 on seeds 0-3, KL at most 39.
    config = _config(learning_rate=6e-3, iterations=20, normalize_scores=True)
    metrics = train_ppo(world["sft"], world["reward"], world["prompts"], str(out), str(report), config)

    assert set(metrics) == METRICS
    assert metrics["iterations"] == 20 and metrics["kl_blowups"] == 0
    assert metrics["reward_last"] > metrics["reward_first"] + 0.3, metrics
    assert metrics["reward_gain"] == pytest.approx(metrics["reward_last"] - metrics["reward_first"])
    assert math.isfinite(metrics["kl_last"]) and 0 < metrics["kl_max"] < 50
    assert 0 <= metrics["clip_fraction_mean"] <= 1 and metrics["entropy_last"] > 0
    assert metrics["rollout_seconds"] > 0 and metrics["rollout_tokens_per_second"] > 0

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["stage"] == "ppo" and lineage["parent"] == world["sft"] and lineage["adapter"] is True
    assert lineage["parameters"]["reward_model"] == world["reward"] and "prompts" in lineage["data"]
    policy = modeling.load_causal_lm(str(out))  # the adapter merged onto the SFT model
    sft = modeling.load_causal_lm(world["sft"])
    ids = torch.tensor([[1, 5, 9, 20, 33, 40]])
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, sft(input_ids=ids).logits)
    html = report.read_text()
    assert "PPO training" in html and "Sample responses" in html and "explained_variance" in html


def test_reference_and_reward_are_the_adapter_disabled_models(world: dict[str, str]) -> None:
    config = _config()
    policy, reference, critic, reward = load_models(world["sft"], world["reward"], config)
    assert reference is None and reward is None  # with LoRA one copy serves both roles
    with torch.no_grad():  # move the adapters away from their no-op initialisation
        for name, p in list(policy.named_parameters()) + list(critic.named_parameters()):
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.5 * torch.randn_like(p))
    ids = torch.tensor([[1, 5, 9, 20, 33, 40, 41]])
    mask = torch.ones_like(ids)
    sft = modeling.load_causal_lm(world["sft"]).eval()
    frozen = TokenValueModel(modeling.load_reward_model(world["reward"])).eval()
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        sft_logits = sft(input_ids=ids).logits
        assert not torch.allclose(policy(input_ids=ids).logits, sft_logits)
        with adapter_off(policy):
            assert torch.equal(policy(input_ids=ids).logits, sft_logits)
        expected = frozen(ids, mask, positions)
        assert not torch.allclose(critic(ids, mask, positions), expected)
        with adapter_off(critic):  # restores the LoRA-free backbone and the original score head
            assert torch.equal(critic(ids, mask, positions), expected)
            # the score is read where the HF classifier pools: its own output on the same tokens
            tok = modeling.load_tokenizer(world["sft"])
            prompt = [{"role": "user", "content": "question 3"}]
            texts = ["the sky is blue, thank you.", "no."]
            scores = score_responses(critic, tok, [prompt, prompt], texts, 2, CPU)
    classifier = modeling.load_reward_model(world["reward"]).eval()
    for text, score in zip(texts, scores.tolist(), strict=True):
        row = tok(render_prompt(tok, prompt) + text, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
        with torch.no_grad():
            assert classifier(input_ids=torch.tensor([row])).logits.item() == pytest.approx(score, abs=1e-5)


def test_rollouts_mask_after_eos_and_logprobs_match_unpadded_scoring(world: dict[str, str]) -> None:
    config = _config(max_new_tokens=16, rollout_batch_size=8)
    policy, reference, critic, reward = load_models(world["sft"], world["reward"], config)
    tok = modeling.load_tokenizer(world["sft"])
    prompts = load_prompts(world["prompts"])[:8]
    prompts[0] = [{"role": "user", "content": "a much longer question with many words so padding is needed"}]
    ids = [tok(render_prompt(tok, m), add_special_tokens=False)["input_ids"] for m in prompts]
    torch.manual_seed(0)
    rollout = generate_rollout(policy, tok, prompts, ids, config, eos_ids_of(tok, policy), CPU)
    score_rollout(rollout, policy, reference, critic, reward, tok, config)
    eos = tok.eos_token_id
    for i in range(len(prompts)):
        row = rollout.response_ids[i].tolist()
        n = int(rollout.response_mask[i].sum())
        assert rollout.response_mask[i, :n].all() and not rollout.response_mask[i, n:].any()
        if eos in row:
            assert n == row.index(eos) + 1 and bool(rollout.ended[i])
        else:
            assert n == config.max_new_tokens and not bool(rollout.ended[i])
        assert not rollout.logprobs[i, n:].any() and not rollout.values[i, n:].any()
        # Left padding and position ids must not change anything: score the row alone, unpadded.
        seq = torch.tensor([ids[i] + row[:n]])
        with torch.no_grad():
            logits = policy(input_ids=seq).logits[0, len(ids[i]) - 1 : -1]
        alone = torch.log_softmax(logits, -1).gather(-1, seq[0, len(ids[i]) :, None])[:, 0]
        assert torch.allclose(rollout.logprobs[i, :n], alone, atol=1e-5)
    # policy == reference before any update (the fresh LoRA adapter is a no-op)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    assert rollout.scores.shape == (8,) and rollout.entropy.shape == rollout.logprobs.shape


def test_packed_scoring_equals_one_sequence_per_row(world: dict[str, str]) -> None:
    # Packing (several prompt + response sequences per row, block-diagonal mask) changes nothing PPO reads:
    # old and reference log-probs, entropies, the critic's values and the reward model's scores.
    config = _config(max_new_tokens=16, rollout_batch_size=8, use_lora=False)
    policy, reference, critic, reward = load_models(world["sft"], world["reward"], config)
    with torch.no_grad():  # a policy and critic that differ from the reference and the reward model
        for p in list(policy.parameters()) + list(critic.parameters()):
            p.add_(0.02 * torch.randn_like(p))
    tok = modeling.load_tokenizer(world["sft"])
    prompts = load_prompts(world["prompts"])[:8]
    ids = [tok(render_prompt(tok, m), add_special_tokens=False)["input_ids"] for m in prompts]
    torch.manual_seed(0)
    rollout = generate_rollout(policy, tok, prompts, ids, config, eos_ids_of(tok, policy), CPU)
    filled = {}
    for pack_length in (0, 64, 1024):
        score_rollout(rollout, policy, reference, critic, reward, tok, _config(pack_length=pack_length))
        filled[pack_length] = [rollout.logprobs, rollout.ref_logprobs, rollout.entropy, rollout.values]
        filled[pack_length].append(rollout.scores)
    assert not torch.equal(filled[0][0], filled[0][1])
    for pack_length in (64, 1024):
        for packed, alone in zip(filled[pack_length], filled[0], strict=True):
            torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_tiny_max_approx_kl_stops_every_iteration_early(world: dict[str, str], tmp_path: Path) -> None:
    config = _config(iterations=2, rollout_batch_size=16, max_approx_kl=1e-9, use_lora=False)
    metrics = train_ppo(
        world["sft"], world["reward"], world["prompts"], str(tmp_path / "m"), str(tmp_path / "r.html"), config
    )
    assert metrics["early_stops"] == 2 and metrics["iterations"] == 2
    assert not (tmp_path / "m" / "adapter_config.json").exists()  # full fine-tuning saves full weights
    modeling.load_causal_lm(str(tmp_path / "m"))


def test_kl_blowup_stops_training(world: dict[str, str], tmp_path: Path) -> None:
    # Iteration 1 samples from the SFT model itself (KL exactly 0); after its update any KL passes 1e-6.
    config = _config(iterations=5, rollout_batch_size=16, learning_rate=1e-2, kl_blowup=1e-6)
    report = tmp_path / "r.html"
    metrics = train_ppo(
        world["sft"], world["reward"], world["prompts"], str(tmp_path / "m"), str(report), config
    )
    assert metrics["kl_blowups"] == 1 and metrics["iterations"] == 2 and metrics["kl_last"] > 1e-6
    assert "Training stopped at iteration 2" in report.read_text()


def test_load_prompts_dedupes_and_names_bad_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", _prompt_rows(3) + [{"prompt": "question 0", "chosen": "x"}])
    prompts = load_prompts(path)
    assert prompts == [[{"role": "user", "content": f"question {i}"}] for i in range(3)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"chosen": "no prompt"}])
    with pytest.raises(DataError, match=r"bad.jsonl: row 2: field 'prompt'"):
        load_prompts(bad)
    with pytest.raises(DataError, match="empty prompt"):
        load_prompts(write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "  "}]))


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="PPOConfig.kl_controller"):
        validate(_config(kl_controller="pid"))
    with pytest.raises(ValueError, match="mini_batch_size"):
        validate(_config(mini_batch_size=64))
    with pytest.raises(ValueError, match="top_p"):
        validate(_config(top_p=0.0))


@pytest.mark.parametrize(("use_lora", "expected"), [(True, 1e-3), (False, 1e-4)])
def test_default_learning_rates_follow_use_lora(
    world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_lora: bool, expected: float
) -> None:
    """-1 (the default) trains all weights at a tenth of LoRA's rates: the optimisers get the resolved ones."""
    from preftune.train.ppo import trainer

    seen = []
    real = trainer.make_optimizer

    def spy(model, learning_rate, weight_decay):  # noqa: ANN001, ANN202 - the patched function's own shape
        seen.append(learning_rate)
        return real(model, learning_rate, weight_decay)

    monkeypatch.setattr(trainer, "make_optimizer", spy)
    config = _config(iterations=1, rollout_batch_size=8, use_lora=use_lora, learning_rate=-1.0)
    config.critic_learning_rate = -1.0
    train_ppo(
        world["sft"], world["reward"], world["prompts"], str(tmp_path / "m"), str(tmp_path / "r"), config
    )
    assert seen == [pytest.approx(expected)] * 2  # policy, critic
