"""fp32 master weights, the precision setting, LoRA dropout, and full fine-tuning on top of LoRA artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_policy_dir, pair_rows, save_model_dir, write_jsonl

from preftune.config.dpo import DPOConfig
from preftune.config.ppo import PPOConfig
from preftune.config.reward import RewardConfig
from preftune.config.sft import SFTConfig
from preftune.model import modeling
from preftune.model.losses import head_logprobs
from preftune.model.precision import resolve_precision, trainable_dtypes
from preftune.train.loop import lora_options, ready_for_training


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny preference policy saved in bf16, as hub checkpoints are."""
    tmp = tmp_path_factory.mktemp("bf16")
    fp32 = make_policy_dir(tmp / "fp32")
    return save_model_dir(
        modeling.load_causal_lm(fp32).to(torch.bfloat16), modeling.load_tokenizer(fp32), tmp / "b"
    )


def test_precision_resolves_auto_and_the_older_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if not torch.cuda.is_available():
        assert resolve_precision("auto").name == "fp32"
    assert (
        resolve_precision("no").name == "fp32" and resolve_precision("bf16").compute_dtype == torch.bfloat16
    )
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision("auto").name == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8")


def test_trainable_weights_are_fp32_whatever_the_checkpoint(bf16_base: str) -> None:
    frozen = torch.bfloat16
    lora = modeling.prepare_for_training(bf16_base, use_lora=True, dtype=frozen)
    assert trainable_dtypes(lora) == {torch.float32}
    assert {p.dtype for p in lora.parameters() if not p.requires_grad} == {torch.bfloat16}  # memory kept low
    full = modeling.prepare_for_training(bf16_base, use_lora=False, dtype=frozen)
    assert {p.dtype for p in full.parameters()} == {torch.float32} and all(
        p.requires_grad for p in full.parameters()
    )
    reward = modeling.prepare_reward_model(bf16_base, use_lora=True, dtype=frozen)
    assert trainable_dtypes(reward) == {torch.float32}
    assert any("score" in n for n, p in reward.named_parameters() if p.requires_grad), (
        "the head is trained, fp32"
    )


def test_the_fused_head_runs_fp32_hidden_states_against_bf16_weights_under_autocast() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, requires_grad=True)  # fp32 residual stream
    weight = torch.randn(11, 8, dtype=torch.bfloat16, requires_grad=True)  # a frozen bf16 head
    targets = torch.randint(0, 11, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = head_logprobs(hidden, weight, targets, chunk_size=4)
    logps.sum().backward()  # backward runs outside autocast: it used to fail on mixed dtypes
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.bfloat16
    exact = torch.log_softmax(hidden.detach() @ weight.detach().float().t(), dim=-1)[torch.arange(6), targets]
    assert torch.allclose(logps, exact, atol=0.05)


@pytest.mark.parametrize("config", [DPOConfig(lora_dropout=0.5), RewardConfig(lora_dropout=0.5)])
def test_disable_dropout_keeps_lora_dropout(bf16_base: str, config: object) -> None:
    prepare = (
        modeling.prepare_reward_model if isinstance(config, RewardConfig) else modeling.prepare_for_training
    )
    model = ready_for_training(prepare(bf16_base, **lora_options(config)), config)
    drops = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert drops and all(p == 0.5 for n, p in drops.items() if "lora_dropout" in n)
    assert all(p == 0.0 for n, p in drops.items() if "lora_dropout" not in n)
    with torch.no_grad():  # give the adapter a branch to drop
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    model.train()
    first, second = (model(input_ids=ids).logits for _ in range(2))
    assert not torch.equal(first, second), "lora_dropout acts in training"
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_ppo_keeps_lora_dropout_on_policy_and_critic(tmp_path: Path, bf16_base: str) -> None:
    from preftune.train.ppo.models import load_models

    reward = save_model_dir(
        modeling.prepare_reward_model(bf16_base, use_lora=False),
        modeling.load_tokenizer(bf16_base),
        tmp_path / "r",
    )
    policy, _, critic, _ = load_models(bf16_base, reward, PPOConfig(lora_dropout=0.3))
    for model in (policy, critic):
        drops = [
            m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n
        ]
        assert drops and set(drops) == {0.3}


def test_full_fine_tuning_on_top_of_a_lora_artifact_trains_in_every_stage(
    tmp_path: Path, bf16_base: str
) -> None:
    """Merged adapters used to leave every weight frozen: 'model has no trainable parameters' in every stage."""
    from preftune.train.dpo import train_dpo
    from preftune.train.ppo import train_ppo
    from preftune.train.reward import train_reward_model
    from preftune.train.sft import train_sft

    tok = modeling.load_tokenizer(bf16_base)
    sft = modeling.prepare_for_training(bf16_base, use_lora=True, dtype=torch.bfloat16)
    sft_dir = str(tmp_path / "sft")
    modeling.save_model(sft, tok, sft_dir, stage="sft", parent_uri=bf16_base, parameters={}, data={})
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    rows = write_jsonl(
        tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows(4)]
    )
    report = str(tmp_path / "report.html")
    step = dict(max_steps=1, batch_size=4, use_lora=False)
    assert train_sft(sft_dir, rows, rows, str(tmp_path / "sft2"), report, SFTConfig(**step))["steps"] == 1
    assert train_dpo(sft_dir, pairs, pairs, str(tmp_path / "dpo"), report, DPOConfig(**step))["steps"] == 1
    reward_dir = str(tmp_path / "reward")
    lora_reward = RewardConfig(max_steps=1, batch_size=4)
    train_reward_model(sft_dir, pairs, pairs, reward_dir, report, lora_reward)  # a LoRA reward artifact
    assert (
        train_reward_model(sft_dir, pairs, pairs, str(tmp_path / "rm"), report, RewardConfig(**step))["steps"]
        == 1
    )
    ppo = PPOConfig(
        iterations=1, rollout_batch_size=4, mini_batch_size=4, use_lora=False, max_prompt_length=64
    )
    assert train_ppo(sft_dir, reward_dir, pairs, str(tmp_path / "ppo"), report, ppo)["iterations"] == 1
