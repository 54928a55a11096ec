"""GRPO, Dr. GRPO and RLOO (preftune.train.group_rl) on tiny random Llamas built offline (seconds on CPU).

The reward model is test_ppo's toy: a one-layer classifier whose score grows with how often one token appears,
that token being the one the random policy likes most after a prompt, so samples hold it now and then. The reward
functions below are importable as ``test_grpo:<name>`` (pytest puts tests/ on the path).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_counting_reward, make_policy_dir, write_jsonl

from preftune.config.fields import ConfigError
from preftune.config.grpo import validate
from preftune.model import modeling
from preftune.model.sampling import eos_ids_of
from preftune.model.templating import render_prompt
from preftune.train.group_rl import (
    GRPOConfig,
    RewardFunctionError,
    RewardSources,
    call_reward_function,
    load_policy,
    load_prompt_records,
    load_reward_functions,
    sample_groups,
    score_tokens,
    train_grpo,
)
from preftune.train.ppo.prompts import encode_prompts
from preftune.train.snapshots import read_index

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- reward functions for the tests


def letter_e(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    """0.1 per letter e in the answer."""
    return [0.1 * c.count("e") for c in completions]


def counts_word(prompts: list[Any], completions: list[str], word: list[str], **columns: Any) -> list[float]:
    """0.5 per occurrence of the row's ``word`` column in the answer."""
    return [0.5 * c.count(w) for w, c in zip(word, completions, strict=True)]


def matches_answer(
    prompts: list[Any], completions: list[str], answer: list[Any], **columns: Any
) -> list[float]:
    """1 when the answer holds the row's ``answer`` column (a verifiable reward)."""
    return [float(str(a) in c) for a, c in zip(answer, completions, strict=True)]


def length_of(prompts: list[Any], completions: list[str], **columns: Any) -> list[int]:
    return [len(c) for c in completions]


def fails_on_question_2(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    if "question 2" in prompts:
        raise KeyError("no grader for this one")
    return [0.0] * len(completions)


def nan_on_question_3(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    return [math.nan if p == "question 3" else 1.0 for p in prompts]


def too_few(prompts: list[Any], completions: list[str], **columns: Any) -> list[float]:
    return [1.0]


def words(prompts: list[Any], completions: list[str], **columns: Any) -> list[str]:
    return ["high" for _ in completions]


def verdicts(prompts: list[Any], completions: list[str], **columns: Any) -> list[Any]:
    """A verifier's pass / fail, and numbers of other kinds: all rewards."""
    return [True, False, torch.tensor(0.25), 2][: len(completions)]


# ------------------------------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("grpo")
    sft = make_policy_dir(root / "sft")
    tok = modeling.load_tokenizer(sft)
    model = modeling.load_causal_lm(sft).eval()
    ids = tok(render_prompt(tok, [{"role": "user", "content": "question 0"}]), add_special_tokens=False)
    with torch.no_grad():
        target = int(model(input_ids=torch.tensor([ids["input_ids"]])).logits[0, -1].argmax())
    reward = make_counting_reward(sft, root / "reward", target)
    word = tok.decode([target])  # what the reward function counts, as the reward model counts the token
    rows = [{"prompt": f"question {i}", "answer": i % 3, "word": word} for i in range(20)]
    rows.append({"prompt": [{"role": "user", "content": "question 1"}], "answer": 99})  # a duplicate prompt
    prompts = write_jsonl(root / "prompts.jsonl", rows)
    return {"sft": sft, "reward": reward, "prompts": prompts}


def _config(**overrides: Any) -> GRPOConfig:
    values: dict[str, Any] = dict(
        iterations=12,
        prompts_per_iteration=6,
        num_generations=4,
        mini_batch_size=12,
        learning_rate=3e-3,
        max_prompt_length=32,
        max_new_tokens=12,
        kl_coef=0.01,
        forward_batch_size=24,
        kl_blowup=50.0,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def _train(
    world: dict[str, str], tmp_path: Path, config: GRPOConfig, *, reward: str | None = "rm", **kw: Any
) -> dict:
    return train_grpo(
        world["sft"],
        world["reward"] if reward == "rm" else reward,
        world["prompts"],
        str(tmp_path / "policy"),
        str(tmp_path / "report.html"),
        config,
        **kw,
    )


# --------------------------------------------------------------------------------------------------- rewards


def test_reward_functions_are_imported_weighted_and_given_the_data_columns(world: dict[str, str]) -> None:
    functions = load_reward_functions("test_grpo:letter_e, test_grpo:matches_answer", "2, 0.5")
    assert [(f.name, f.weight) for f in functions] == [
        ("test_grpo:letter_e", 2.0),
        ("test_grpo:matches_answer", 0.5),
    ]
    prompts, records = load_prompt_records(world["prompts"])
    assert len(prompts) == 20 and records[1]["answer"] == 1  # the first row is kept
    sources = RewardSources(None, None, functions, _config())
    texts = ["eee 1", "no", "ee 2 e", "2"]
    rows = [records[1], records[1], records[2], records[2]]
    rewards = sources(
        [prompts[1]] * 2 + [prompts[2]] * 2, rows, texts, torch.tensor([True, True, True, False])
    )
    assert rewards.model_score is None
    assert rewards.functions["test_grpo:letter_e"].tolist() == pytest.approx([0.3, 0.0, 0.3, 0.0])
    assert rewards.functions["test_grpo:matches_answer"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert rewards.total.tolist() == pytest.approx([1.1, 0.0, 1.1, 0.5])
    penalised = RewardSources(None, None, functions, _config(missing_eos_penalty=0.25))
    assert (
        penalised([prompts[1]] * 4, rows, texts, torch.tensor([True, True, True, False])).total.tolist()[3]
        == 0.25
    )
    assert call_reward_function(
        load_reward_functions("test_grpo:length_of")[0], ["q"], ["abc"], {}
    ).tolist() == [3.0]
    (verdict,) = load_reward_functions("test_grpo:verdicts")
    assert call_reward_function(verdict, ["q"] * 4, ["a"] * 4, {}).tolist() == [1.0, 0.0, 0.25, 2.0]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "fails_on_question_2",
            r"test_grpo:fails_on_question_2 raised KeyError: 'no grader for this one' on the prompt 'question 2'",
        ),
        (
            "nan_on_question_3",
            r"test_grpo:nan_on_question_3 returned nan, not a finite number, on the prompt 'question 3'",
        ),
        ("too_few", r"test_grpo:too_few returned 1 values for 4 answers"),
        ("words", r"test_grpo:words returned 'high', not a finite number, on the prompt 'question 1'"),
    ],
)
def test_a_failing_reward_function_names_itself_and_the_prompt(name: str, message: str) -> None:
    (fn,) = load_reward_functions(f"test_grpo:{name}")
    prompts = ["question 1", "question 2", "question 3", "question 4"]
    with pytest.raises(RewardFunctionError, match=message):
        call_reward_function(fn, prompts, ["a", "b", "c", "d"], {})


def test_reward_function_paths_are_checked_before_training(world: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GRPOConfig.reward_functions entry 'no_colon'"):
        validate(_config(reward_functions="no_colon"))
    with pytest.raises(ConfigError, match="reward_weights has 2 entries for 1"):
        validate(_config(reward_functions="a.b:c", reward_weights="1,2"))
    with pytest.raises(ConfigError, match="reward_weights entry 'x'"):
        validate(_config(reward_functions="a.b:c", reward_weights="x"))
    with pytest.raises(ValueError, match="reward function no_such_module:f: cannot import no_such_module"):
        load_reward_functions("no_such_module:f")
    with pytest.raises(ValueError, match="test_grpo has no function 'missing'"):
        load_reward_functions("test_grpo:missing")
    with pytest.raises(ValueError, match="no reward: pass a reward model, set reward_functions"):
        _train(world, tmp_path, _config(), reward=None)
    assert not (tmp_path / "policy").exists()


def test_config_refusals_name_the_fields() -> None:
    with pytest.raises(ConfigError, match="GRPOConfig.estimator must be one of grpo, dr_grpo, rloo"):
        validate(_config(estimator="ppo"))
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        validate(_config(num_generations=1))
    with pytest.raises(
        ConfigError, match=r"mini_batch_size \(32\) is larger than the answers of an iteration"
    ) as err:
        validate(_config(mini_batch_size=32))
    assert err.value.fields == ("mini_batch_size", "prompts_per_iteration", "num_generations")
    with pytest.raises(ConfigError, match="kl_penalty must be one of loss, reward"):
        validate(_config(kl_penalty="both"))


# --------------------------------------------------------------------------------------------------- sampling


def test_groups_are_k_answers_to_one_prompt_and_the_reference_is_the_sft_model(world: dict[str, str]) -> None:
    config = _config()
    tok = modeling.load_tokenizer(world["sft"])
    policy, reference = load_policy(world["sft"], config)
    assert reference is None  # with LoRA, the adapter off is the reference
    prompts, _ = load_prompt_records(world["prompts"])
    encoded, _ = encode_prompts(tok, prompts, config.max_prompt_length)
    torch.manual_seed(0)
    rollout = sample_groups(policy, tok, prompts, encoded, [3, 7, 11], config, eos_ids_of(tok, policy), CPU)
    expected = [f"question {i}" for i in (3, 7, 11) for _ in range(4)]
    assert [p[0]["content"] for p in rollout.prompts] == expected
    assert len(set(rollout.texts[:4])) > 1  # K samples, not one answer copied
    score_tokens(rollout, policy, None, tok, config)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)  # a fresh adapter changes nothing
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.3 * torch.randn_like(p))
    score_tokens(rollout, policy, None, tok, config)
    assert not torch.equal(rollout.logprobs, rollout.ref_logprobs)
    sft = modeling.load_causal_lm(world["sft"]).eval()
    n = int(rollout.response_mask[0].sum())
    seq = torch.tensor([rollout.prompt_tokens[0] + rollout.response_tokens[0]])
    with torch.no_grad():  # the reference log-probs are the SFT model's, scored alone
        logits = sft(input_ids=seq).logits[0, len(rollout.prompt_tokens[0]) - 1 : -1]
    alone = torch.log_softmax(logits, -1).gather(-1, seq[0, len(rollout.prompt_tokens[0]) :, None])[:, 0]
    assert torch.allclose(rollout.ref_logprobs[0, :n], alone, atol=1e-5)


# --------------------------------------------------------------------------------------------------- training

METRICS = {
    "reward_first", "reward_last", "reward_gain", "kl_last", "kl_max", "entropy_last", "response_length_last",
    "distinct_answers_last", "iterations", "kl_blowups", "train_seconds", "rollout_seconds",
    "rollout_tokens_per_second", "resumed_from_iteration", "stage_seconds", "peak_memory_mb", "train_tokens",
    "clip_fraction_mean", "zero_std_groups_mean",
}  # fmt: skip


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_each_estimator_raises_the_reward_model_score_at_bounded_kl(
    world: dict[str, str], tmp_path: Path, estimator: str
) -> None:
    config = _config(estimator=estimator, iterations=16, num_checkpoints=2)
    metrics = _train(world, tmp_path, config, snapshot_dir=str(tmp_path / "snapshots"))
    print(estimator, json.dumps({k: round(v, 3) for k, v in metrics.items()}))

    assert set(metrics) == METRICS
    assert metrics["iterations"] == 16 and metrics["kl_blowups"] == 0
    assert metrics["reward_last"] > metrics["reward_first"] + 0.1, metrics
    assert 0 < metrics["kl_max"] < 15  # it moved, and stayed near the SFT model
    assert metrics["distinct_answers_last"] > 0.5  # still K different answers per prompt
    lineage = json.loads((tmp_path / "policy" / "lineage.json").read_text())
    assert lineage["stage"] == estimator and lineage["parent"] == world["sft"] and lineage["adapter"] is True
    assert (
        lineage["parameters"]["kl_penalty"] == "loss"
        and lineage["parameters"]["reward_model"] == world["reward"]
    )
    assert lineage["data"]["data_order"] and "prompts" in lineage["data"]
    # for the reward-vs-KL chart, denser early
    assert [s["step"] for s in read_index(tmp_path / "snapshots")] == [2, 7]
    policy = modeling.load_causal_lm(str(tmp_path / "policy"))  # the adapter merged onto the SFT model
    sft = modeling.load_causal_lm(world["sft"])
    ids = torch.tensor([[1, 5, 9, 20, 33, 40]])
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, sft(input_ids=ids).logits)
    html = (tmp_path / "report.html").read_text()
    title = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO"}[estimator]
    assert f"{title} training" in html and "in the loss (k3 per token)" in html and "Sample answers" in html


def test_reward_functions_alone_train_the_policy(world: dict[str, str], tmp_path: Path) -> None:
    config = _config(reward_functions="test_grpo:counts_word", kl_coef=0.0, iterations=16)
    metrics = _train(world, tmp_path, config, reward=None)
    assert metrics["reward_last"] > metrics["reward_first"] + 0.15, metrics
    lineage = json.loads((tmp_path / "policy" / "lineage.json").read_text())
    assert lineage["parameters"]["reward_model"] is None
    assert lineage["parameters"]["reward_functions"] == "test_grpo:counts_word"
    assert "test_grpo:counts_word x 1.0" in (tmp_path / "report.html").read_text()


def test_the_kl_term_holds_the_policy_near_the_sft_model_in_the_loss_or_the_reward(
    world: dict[str, str], tmp_path: Path
) -> None:
    base = dict(iterations=10, learning_rate=1e-2, estimator="rloo")
    free = _train(world, tmp_path / "free", _config(**base, kl_coef=0.0))
    in_loss = _train(world, tmp_path / "loss", _config(**base, kl_coef=0.5, kl_penalty="loss"))
    in_reward = _train(world, tmp_path / "reward", _config(**base, kl_coef=0.5, kl_penalty="reward"))
    print(
        {
            k: (round(m["kl_max"], 2), round(m["reward_last"], 3))
            for k, m in [("free", free), ("loss", in_loss), ("reward", in_reward)]
        }
    )
    assert in_loss["kl_max"] < free["kl_max"] and in_reward["kl_max"] < free["kl_max"]
    lineage = json.loads((tmp_path / "reward" / "policy" / "lineage.json").read_text())
    assert lineage["parameters"]["kl_penalty"] == "reward"  # the choice is recorded
    assert "as a reward penalty" in (tmp_path / "reward" / "report.html").read_text()


def test_kl_blowup_stops_before_the_update(world: dict[str, str], tmp_path: Path) -> None:
    # Iteration 1 samples from the SFT model itself (KL exactly 0); after its update any KL passes 1e-6.
    metrics = _train(world, tmp_path, _config(iterations=5, learning_rate=1e-2, kl_blowup=1e-6))
    assert metrics["kl_blowups"] == 1 and metrics["iterations"] == 2 and metrics["kl_last"] > 1e-6
    assert "Training stopped at iteration 2" in (tmp_path / "report.html").read_text()


def test_full_fine_tuning_keeps_a_frozen_reference(world: dict[str, str], tmp_path: Path) -> None:
    metrics = _train(world, tmp_path, _config(iterations=3, use_lora=False, learning_rate=1e-3))
    assert metrics["iterations"] == 3 and metrics["kl_max"] > 0
    assert not (tmp_path / "policy" / "adapter_config.json").exists()  # full weights
    modeling.load_causal_lm(str(tmp_path / "policy"))
