"""On the bundled tiny model and data: GRPO, RLOO and online DPO raise the reward model's score over the SFT model
at bounded KL, and KTO raises the held-out preference accuracy; each artifact and its snapshots are read by the
evaluate step (preftune.eval.evaluation.evaluate), which measures them against the SFT model on held-out prompts.

One SFT model and one reward model (as the RLHF end-to-end test trains them) serve every method; the methods run
on their own defaults with fewer iterations. Minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from e2e import EXAMPLES

from preftune.config.evaluate import EvalConfig
from preftune.config.reward import RewardConfig
from preftune.config.sft import SFTConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
MAX_KL = 10.0  # the gate's default bound, nats per response
MIN_DIVERSITY = 0.8  # the gate's default distinct-2 ratio to the SFT model


def _contract_rows(name: str, start: int, stop: int, dest: Path) -> str:
    """Rows ``start:stop`` of a bundled file in the contract shape (chat-message prompts); multi-turn rows are left
    out (the ingest step would take them apart; not needed here)."""
    rows = []
    for line in (EXAMPLES / "data" / name).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "messages" in row:
            continue
        prompt = row["prompt"]
        rows.append(
            {**row, "prompt": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt}
        )
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows[start:stop]), encoding="utf-8")
    return str(dest)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from preftune.train.reward import train_reward_model
    from preftune.train.sft import train_sft

    root = tmp_path_factory.mktemp("bundled-new")
    sft_train = _contract_rows("sft.jsonl", 0, 600, root / "sft-train.jsonl")
    sft_eval = _contract_rows("sft.jsonl", 600, 660, root / "sft-eval.jsonl")
    pairs = _contract_rows("preferences.jsonl", 0, 700, root / "pairs-train.jsonl")
    held_out = _contract_rows("preferences.jsonl", 700, 800, root / "pairs-eval.jsonl")
    prompts = root / "eval-prompts.jsonl"
    prompts.write_text(
        "\n".join((EXAMPLES / "data" / "eval_prompts.jsonl").read_text().splitlines()[:16]) + "\n"
    )
    sft, reward = str(root / "sft"), str(root / "reward")
    train_sft(
        str(EXAMPLES / "tiny-llama"),
        sft_train,
        sft_eval,
        sft,
        str(root / "sft.html"),
        SFTConfig(max_steps=60),
    )
    metrics = train_reward_model(
        sft, pairs, held_out, reward, str(root / "reward.html"), RewardConfig(max_steps=60)
    )
    assert metrics["eval_accuracy"] > 0.75  # a judge worth optimising against
    return {
        "root": str(root),
        "sft": sft,
        "reward": reward,
        "pairs": pairs,
        "held_out": held_out,
        "eval_prompts": str(prompts),
    }


def _evaluate(world: dict[str, str], name: str) -> dict[str, float]:
    from preftune.eval.evaluation import evaluate

    root = Path(world["root"])
    return evaluate(
        str(root / name),
        world["sft"],
        world["eval_prompts"],
        world["held_out"],
        str(root / f"{name}-generations.jsonl"),
        str(root / f"{name}-evaluation.html"),
        EvalConfig(max_prompts=16, max_new_tokens=32),
        judge=world["reward"],
        checkpoints=str(root / f"{name}-snapshots"),
    )


def _outputs(world: dict[str, str], name: str) -> dict[str, Any]:
    root = Path(world["root"])
    return {
        "model_dir": str(root / name),
        "report_path": str(root / f"{name}.html"),
        "snapshot_dir": str(root / f"{name}-snapshots"),
    }


def _judged_better_at_bounded_kl(metrics: dict[str, float], evaluation: dict[str, float]) -> None:
    print(json.dumps({k: round(v, 3) for k, v in {**metrics, **evaluation}.items()}))
    assert metrics["kl_blowups"] == 0 and metrics["reward_last"] > metrics["reward_first"]
    # on held-out prompts, against the SFT model, under the reward model: higher reward, mostly preferred
    assert evaluation["judge_reward_candidate"] > evaluation["judge_reward_reference"] + 0.5
    assert evaluation["win_rate_vs_reference"] > 0.6
    assert 0 < evaluation["kl_candidate_reference"] < MAX_KL
    assert evaluation["diversity_ratio_vs_reference"] >= MIN_DIVERSITY
    assert evaluation["frontier_points"] >= 3  # the SFT model, the snapshots and the final policy


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_grpo_and_rloo_raise_the_judge_s_reward_over_the_sft_model(
    world: dict[str, str], estimator: str
) -> None:
    from preftune.train.group_rl import GRPOConfig, train_grpo

    config = GRPOConfig(estimator=estimator, iterations=10, num_checkpoints=2)
    metrics = train_grpo(
        world["sft"], world["reward"], world["pairs"], config=config, **_outputs(world, estimator)
    )
    _judged_better_at_bounded_kl(metrics, _evaluate(world, estimator))


def test_online_dpo_raises_the_judge_s_reward_over_the_sft_model(world: dict[str, str]) -> None:
    from preftune.train.online_dpo import OnlineDPOConfig, train_online_dpo

    config = OnlineDPOConfig(rounds=5, num_checkpoints=2)
    metrics = train_online_dpo(
        world["sft"], world["reward"], world["pairs"], config=config, **_outputs(world, "online_dpo")
    )
    _judged_better_at_bounded_kl(metrics, _evaluate(world, "online_dpo"))


def test_kto_raises_held_out_preference_accuracy(world: dict[str, str]) -> None:
    from preftune.train.kto import KTOConfig, train_kto

    config = KTOConfig(num_checkpoints=2)
    metrics = train_kto(
        world["sft"], world["pairs"], world["held_out"], config=config, **_outputs(world, "kto")
    )
    evaluation = _evaluate(world, "kto")
    print(json.dumps({k: round(v, 3) for k, v in {**metrics, **evaluation}.items()}))
    # the policy itself now prefers the chosen answers of held-out pairs more often than the SFT model did
    assert metrics["eval_logp_accuracy"] > metrics["first_eval_logp_accuracy"]
    # and its implicit reward ranks them: the evaluate step's own measure agrees with the stage's
    assert metrics["eval_reward_accuracy"] > 0.8
    assert evaluation["implicit_reward_accuracy"] > 0.8
    assert evaluation["implicit_reward_margin"] > 0
    assert 0 < evaluation["kl_candidate_reference"] < MAX_KL
    assert evaluation["diversity_ratio_vs_reference"] >= MIN_DIVERSITY
