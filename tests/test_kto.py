"""KTO (preftune.train.kto) on tiny random Llamas built offline: the unpaired row contract and pairs, the batch's
mismatched pairs for the reference point, the first step's exact loss, and held-out preference accuracy rising."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import BAD, GOOD, make_policy_dir, pair_rows, write_jsonl

from preftune.config.fields import ConfigError
from preftune.config.kto import KTOConfig, validate
from preftune.model import modeling
from preftune.model.templating import tokenize_example
from preftune.train.batching import DataError
from preftune.train.kto import KTOCollator, load_kto_features, train_kto
from preftune.train.snapshots import read_index

pytestmark = pytest.mark.usefixtures("one_thread")


def unpaired_rows(n: int, *, desirable_every: int = 2) -> list[dict]:
    """Thumbs-up / thumbs-down rows: a GOOD answer marked desirable, a BAD one undesirable, on distinct prompts."""
    rows = []
    for i in range(n):
        good = i % desirable_every == 0
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"question {i}"}],
                "completion": GOOD[i % 3] if good else BAD[i % 3],
                "label": good,
            }
        )
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kto")
    return {
        "sft": make_policy_dir(root / "sft"),
        "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired_rows(64)),
        "pairs": write_jsonl(root / "pairs.jsonl", pair_rows(32)),
        "eval_pairs": write_jsonl(root / "eval.jsonl", pair_rows(44)[32:]),
    }


def _config(**overrides: Any) -> KTOConfig:
    values: dict[str, Any] = dict(
        epochs=2,
        batch_size=8,
        learning_rate=5e-3,
        max_length=48,
        eval_steps=0,
        logging_steps=1,
        warmup_ratio=0.0,
    )
    values.update(overrides)
    return KTOConfig(**values)


def test_rows_are_unpaired_examples_or_pairs_split_in_two(world: dict[str, str], tmp_path: Path) -> None:
    tok = modeling.load_tokenizer(world["sft"])
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "question 1", "completion": "yes.", "label": True},
            {"prompt": [{"role": "user", "content": "question 2"}], "chosen": GOOD[0], "rejected": BAD[0]},
            {"prompt": "question 3", "completion": "no.", "label": False},
        ],
    )
    features = load_kto_features(mixed, tok, 48)
    assert [(f["label"], f["pair"], f["index"]) for f in features] == [
        (True, -1, 0),
        (True, 0, 1),
        (False, 0, 2),
        (False, -1, 3),
    ]
    expected = tokenize_example(tok, [{"role": "user", "content": "question 1"}], "yes.", 48)
    assert features[0]["prompt_ids"] == expected["prompt_ids"]
    assert features[0]["completion_ids"] == expected["completion_ids"]  # the answer + eos
    assert features[1]["prompt_ids"] == features[2]["prompt_ids"]  # a pair's halves share their prompt


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"prompt": "q", "completion": "a", "label": "yes"},
            r"row 2: field 'label': expected true \(desirable\) or false",
        ),
        (
            {"prompt": "q", "completion": "", "label": True},
            r"row 2: field 'completion': expected a non-empty string",
        ),
        ({"prompt": "q", "chosen": "a"}, r"row 2: field 'rejected': expected a non-empty string"),
        ({"prompt": "q", "answer": "a"}, r"row 2: expected a 'completion' with a 'label'"),
        ({"completion": "a", "label": True}, r"row 2: field 'prompt'"),
    ],
)
def test_bad_rows_name_the_file_row_and_field(
    world: dict[str, str], tmp_path: Path, row: dict, message: str
) -> None:
    tok = modeling.load_tokenizer(world["sft"])
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "completion": "a", "label": True}, row])
    with pytest.raises(DataError, match=r"bad.jsonl: " + message):
        load_kto_features(path, tok, 48)


def test_each_prompt_meets_the_previous_example_s_answer_for_the_reference_point(
    world: dict[str, str],
) -> None:
    tok = modeling.load_tokenizer(world["sft"])
    features = load_kto_features(world["unpaired"], tok, 48)[:4]
    batch = KTOCollator(tok, pack_length=0)(features)  # one document per row: easy to read back
    assert batch["label"].tolist() == [True, False, True, False]
    for i, f in enumerate(features):
        row = batch["input_ids"][i].tolist()
        prompt, own, other = f["prompt_ids"], f["completion_ids"], features[(i - 1) % 4]["completion_ids"]
        assert row[: len(prompt) + len(own) + len(other)] == prompt + own + other
    # scored: segment i is example i's own answer, segment 4 + i its mismatched one (prompt i, answer i - 1)
    own_tokens = batch["target_ids"][batch["target_segment"] == 0].tolist()
    other_tokens = batch["target_ids"][batch["target_segment"] == 4].tolist()
    assert own_tokens == features[0]["completion_ids"] and other_tokens == features[3]["completion_ids"]


def test_config_refusals() -> None:
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        validate(_config(batch_size=1))
    with pytest.raises(ConfigError, match="both 0"):
        validate(_config(desirable_weight=0.0, undesirable_weight=0.0))


METRICS = {
    "first_step_loss", "train_loss", "eval_loss", "eval_kl", "eval_desirable_reward", "eval_undesirable_reward",
    "eval_reward_margin", "eval_reward_accuracy", "eval_logp_accuracy", "first_eval_logp_accuracy", "steps",
    "train_examples", "desirable_examples", "undesirable_examples", "train_seconds", "resumed_from_step",
    "stage_seconds", "peak_memory_mb", "train_tokens",
}  # fmt: skip


def test_kto_on_unpaired_feedback_raises_held_out_preference_accuracy(
    world: dict[str, str], tmp_path: Path
) -> None:
    out, report = tmp_path / "kto", tmp_path / "kto.html"
    metrics = train_kto(
        world["sft"], world["unpaired"], world["eval_pairs"], str(out), str(report), _config(num_checkpoints=2),
        snapshot_dir=str(tmp_path / "snapshots"),
    )  # fmt: skip
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))

    assert set(metrics) == METRICS
    assert metrics["desirable_examples"] == metrics["undesirable_examples"] == 32
    # step 0: the policy is the reference, every reward and z0 are 0, each loss is half its weight (1)
    assert metrics["first_step_loss"] == pytest.approx(0.5, abs=1e-6)
    # the random SFT model prefers the short BAD answers by likelihood; KTO reverses that on held-out pairs
    assert metrics["first_eval_logp_accuracy"] < 0.5
    assert metrics["eval_logp_accuracy"] > metrics["first_eval_logp_accuracy"] + 0.4
    assert metrics["eval_reward_accuracy"] >= 0.9 and metrics["eval_reward_margin"] > 0
    assert metrics["eval_desirable_reward"] > 0 > metrics["eval_undesirable_reward"]
    assert metrics["eval_kl"] >= 0 and metrics["train_loss"] < metrics["first_step_loss"]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["stage"] == "kto" and lineage["adapter"] is True and lineage["data"]["data_order"]
    assert lineage["parameters"]["desirable_weight"] == 1.0
    assert len(read_index(tmp_path / "snapshots")) == 2
    html = report.read_text()
    assert "KTO training" in html and "Reference point" in html and "held-out preference accuracy" in html


def test_kto_trains_on_today_s_pairs_and_warns_about_unbalanced_weights(
    world: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = train_kto(
        world["sft"], world["pairs"], world["eval_pairs"], str(tmp_path / "m"), str(tmp_path / "r.html"),
        _config(epochs=1, desirable_weight=2.0),
    )  # fmt: skip
    assert metrics["desirable_examples"] == metrics["undesirable_examples"] == 32
    # step 0: half of each example's weight, 2 x 0.5 desirable, 1 x 0.5 undesirable, over the first batch of 8
    desirable = metrics["first_step_loss"] * 16 - 8
    assert desirable == pytest.approx(round(desirable), abs=1e-5) and 0 < round(desirable) < 8
    assert metrics["eval_reward_accuracy"] > 0.5
    assert "outside the KTO paper's advised [1, 4/3]" in caplog.text
    assert "consider desirable_weight 1.00 to 1.33" in (tmp_path / "r.html").read_text()


def test_data_with_one_kind_only_is_refused(world: dict[str, str], tmp_path: Path) -> None:
    only_good = write_jsonl(tmp_path / "good.jsonl", unpaired_rows(8, desirable_every=1))
    with pytest.raises(DataError, match="no undesirable one"):
        train_kto(
            world["sft"], only_good, world["eval_pairs"], str(tmp_path / "m"), str(tmp_path / "r"), _config()
        )


def test_full_fine_tuning_keeps_a_frozen_reference(world: dict[str, str], tmp_path: Path) -> None:
    metrics = train_kto(
        world["sft"], world["unpaired"], world["eval_pairs"], str(tmp_path / "m"), str(tmp_path / "r.html"),
        _config(epochs=1, max_steps=3, use_lora=False, learning_rate=1e-3),
    )  # fmt: skip
    assert metrics["first_step_loss"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["steps"] == 3 and metrics["eval_kl"] >= 0
    modeling.load_causal_lm(str(tmp_path / "m"))
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
