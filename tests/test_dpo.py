"""Tests of preftune.train.dpo on tiny random Llamas built offline (seconds on CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_policy_dir, pair_rows, write_jsonl

from preftune.model import modeling
from preftune.train.batching import PairCollator, load_pair_features
from preftune.train.dpo import DPOConfig, pair_logprobs, score_reference, train_dpo
from preftune.train.loop import make_accelerator
from preftune.train.sft import SFTConfig, train_sft


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A random model stands in for the SFT model: DPO only needs a starting policy that is also the reference.
    # Dropout is on in the config: disable_dropout must make step 0 exact anyway.
    return make_policy_dir(tmp_path_factory.mktemp("sft"), attention_dropout=0.1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "train.jsonl", pair_rows(12))


def _config(**overrides) -> DPOConfig:
    values = dict(
        epochs=4,
        learning_rate=1e-2,
        batch_size=4,
        max_length=48,
        logging_steps=1,
        eval_batch_size=5,
        beta=0.1,
    )
    values.update(overrides)
    return DPOConfig(**values)


def _logits(ref: str) -> torch.Tensor:
    model = modeling.load_causal_lm(ref)
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 20, 33, 40]])).logits


@pytest.mark.parametrize("use_lora", [True, False])
def test_dpo_starts_at_ln2_and_learns_the_preference(
    sft: str, pairs: str, tmp_path: Path, use_lora: bool
) -> None:
    out, report = tmp_path / "dpo", tmp_path / "dpo.html"
    # The train pairs double as eval pairs: the final eval then measures reward accuracy on the training set.
    metrics = train_dpo(sft, pairs, pairs, str(out), str(report), _config(use_lora=use_lora))

    assert set(metrics) == {
        "first_step_loss", "train_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin",
        "eval_chosen_reward", "eval_rejected_reward", "steps", "train_pairs", "train_seconds",
        "resumed_from_step", "stage_seconds", "peak_memory_mb", "train_tokens", "best_step", "stopped_early",
    }  # fmt: skip
    assert metrics["resumed_from_step"] == 0
    # the weights kept are those of the earliest best held-out evaluation, one of the four epoch ends
    assert metrics["best_step"] in (3, 6, 9, 12) and metrics["stopped_early"] in (0, 1)
    # Step 0: policy == reference (dropout off), so h = 0 and the sigmoid loss is -log sigmoid(0) = ln 2.
    assert metrics["first_step_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["steps"] == 12  # 12 pairs / batch 4 = 3 steps x 4 epochs
    assert metrics["train_pairs"] == 12
    # Before training the reward accuracy is 0 (all rewards are 0, and a tie is not a win); now it is high.
    assert metrics["eval_reward_accuracy"] >= 0.9
    assert metrics["eval_reward_margin"] > 0
    assert metrics["eval_chosen_reward"] > metrics["eval_rejected_reward"]
    assert metrics["eval_loss"] < math.log(2)

    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["stage"] == "dpo" and lineage["parent"] == sft and lineage["adapter"] is use_lora
    assert (out / "adapter_config.json").is_file() is use_lora
    html = report.read_text()
    assert "DPO training" in html and "Reward accuracy" in html

    # The artifact loads back (LoRA: merged onto the SFT model) and differs from the SFT model.
    assert not torch.allclose(_logits(str(out)), _logits(sft), atol=1e-4)


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("sigmoid", math.log(2)),  # -log sigmoid(0)
        ("ipo", 25.0),  # (0 - 1 / (2 * 0.1)) ** 2 = (-5) ** 2
        ("hinge", 1.0),  # relu(1 - 0.1 * 0)
    ],
)
def test_first_step_loss_per_loss_type_with_accumulation(
    sft: str, pairs: str, tmp_path: Path, loss_type: str, expected: float
) -> None:
    config = _config(
        loss_type=loss_type, max_steps=1, batch_size=3, gradient_accumulation_steps=2, use_lora=False
    )
    metrics = train_dpo(sft, pairs, pairs, str(tmp_path / "m"), str(tmp_path / "r.html"), config)
    assert metrics["steps"] == 1
    assert metrics["first_step_loss"] == pytest.approx(expected, abs=1e-4)


def test_dpo_adapter_stacks_on_lora_sft(sft: str, pairs: str, tmp_path: Path) -> None:
    sft_rows = [{"id": r["id"], "prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows(8)]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    sft_dir = tmp_path / "sft"
    sft_config = SFTConfig(max_steps=2, batch_size=4, max_length=48, use_lora=True, learning_rate=1e-2)
    train_sft(sft, sft_data, sft_data, str(sft_dir), str(tmp_path / "sft.html"), sft_config)

    dpo_dir = tmp_path / "dpo"
    metrics = train_dpo(
        str(sft_dir), pairs, pairs, str(dpo_dir), str(tmp_path / "dpo.html"), _config(max_steps=3)
    )
    # The reference is the merged SFT model, so step 0 is still exactly ln 2.
    assert metrics["first_step_loss"] == pytest.approx(math.log(2), abs=1e-4)
    adapter = json.loads((dpo_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(sft_dir)
    lineage = json.loads((dpo_dir / "lineage.json").read_text())
    assert [c["stage"] for c in lineage["chain"]][-2:] == ["sft", "dpo"]
    sft_logits, dpo_logits = _logits(str(sft_dir)), _logits(str(dpo_dir))
    assert not torch.allclose(sft_logits, _logits(sft), atol=1e-4)  # the SFT adapter was merged in
    assert not torch.allclose(dpo_logits, sft_logits, atol=1e-4)


def test_dpo_rejects_bad_config_and_rows(sft: str, pairs: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss_type"):
        train_dpo(sft, pairs, pairs, str(tmp_path / "m"), str(tmp_path / "r"), _config(loss_type="kto"))
    rows = pair_rows(3)
    del rows[2]["rejected"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 3: field 'rejected'"):
        train_dpo(sft, bad, pairs, str(tmp_path / "m"), str(tmp_path / "r"), _config())


def test_reference_scores_match_one_pair_at_a_time(sft: str, pairs: str) -> None:
    # Batched, right-padded scoring gives each pair the log-probs it gets alone: padding does not leak.
    tok = modeling.load_tokenizer(sft)
    model = modeling.prepare_for_training(sft, use_lora=True)
    features = load_pair_features(pairs, tok, 48)
    collator = PairCollator(tok)
    score_reference(model, features, collator, 5, make_accelerator("no"))
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        for f in features:
            chosen, rejected = pair_logprobs(
                model, collator([{k: v for k, v in f.items() if "ref" not in k}])
            )
            assert f["ref_chosen_logps"] == pytest.approx(float(chosen[0]), abs=1e-4)
            assert f["ref_rejected_logps"] == pytest.approx(float(rejected[0]), abs=1e-4)
            assert f["ref_chosen_logps"] != f["ref_rejected_logps"]
