"""Tests of preftune.train.reward and preftune.scoring on tiny random Llamas built offline (seconds on CPU)."""

import json
import math
from pathlib import Path

import pytest
import tiny_models
from tiny_models import BAD, GOOD, make_policy_dir, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune import modeling
from preftune.scoring import score_sequences, score_texts
from preftune.train.batching import DataError
from preftune.train.reward import (
    RewardConfig,
    bucket_rows,
    margin_bucket,
    margin_thresholds,
    train_reward_model,
)

METRICS = {
    "eval_accuracy", "first_eval_accuracy", "eval_mean_margin", "eval_loss", "first_eval_loss", "train_loss",
    "eval_chosen_reward", "eval_rejected_reward", "eval_reward_mean", "eval_reward_std", "steps",
    "train_pairs", "eval_pairs", "train_seconds", "resumed_from_step",
    "stage_seconds", "peak_memory_mb", "train_tokens",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread avoids OpenMP contention


def pair_rows(n: int) -> list[dict]:
    """The shared pairs, with margins (one missing) and per-answer scores for the regression objective."""
    margins = [None, 1.0, 2.0, 3.0]
    return [
        {
            **row,
            "margin": margins[i % 4],
            "scores": {"chosen": 1.0 + 0.1 * (i % 3), "rejected": -1.0 - 0.1 * (i % 2)},
        }
        for i, row in enumerate(tiny_models.pair_rows(n))
    ]


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> str:
    # A random model stands in for the SFT model: the reward model only needs its backbone and tokenizer.
    return make_policy_dir(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "train.jsonl", pair_rows(16))


def _config(**overrides) -> RewardConfig:
    values = dict(
        epochs=3,
        learning_rate=1e-2,
        batch_size=4,
        max_length=48,
        logging_steps=1,
        eval_steps=2,
        eval_batch_size=5,
    )
    values.update(overrides)
    return RewardConfig(**values)


@pytest.fixture(scope="module")
def trained(sft: str, pairs: str, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, tuple[Path, dict]]:
    """A LoRA and a full reward model trained once on the same pairs (eval = train pairs)."""
    out = {}
    for use_lora in (True, False):
        root = tmp_path_factory.mktemp(f"reward-lora-{use_lora}")
        metrics = train_reward_model(
            sft, pairs, pairs, str(root / "model"), str(root / "report.html"), _config(use_lora=use_lora)
        )
        out[use_lora] = (root, metrics)
    return out


def _score_eval_pairs(model, tokenizer) -> tuple[list[float], list[float]]:  # noqa: ANN001
    rows = pair_rows(16)
    prompts = [r["prompt"] for r in rows]
    chosen = score_texts(model, tokenizer, prompts, [r["chosen"] for r in rows], batch_size=5, max_length=48)
    rejected = score_texts(
        model, tokenizer, prompts, [r["rejected"] for r in rows], batch_size=3, max_length=48
    )
    return chosen, rejected


@pytest.mark.parametrize("use_lora", [True, False])
def test_training_raises_pair_accuracy(trained, sft: str, use_lora: bool) -> None:
    root, metrics = trained[use_lora]
    buckets = {f"eval_accuracy_margin_{b}" for b in ("none", "low", "mid", "high")}
    assert set(metrics) == METRICS | buckets
    assert metrics["steps"] == 12  # 16 pairs / batch 4 = 4 steps x 3 epochs
    assert metrics["train_pairs"] == 16 == metrics["eval_pairs"]
    assert metrics["first_eval_accuracy"] < 0.9  # a random head does not know the preference
    assert metrics["eval_accuracy"] == 1.0  # eval = train pairs: it has learnt them
    assert metrics["eval_loss"] < metrics["first_eval_loss"]
    assert metrics["eval_mean_margin"] > 0
    assert metrics["eval_chosen_reward"] > metrics["eval_rejected_reward"]
    assert all(math.isfinite(v) for v in metrics.values())

    model_dir = root / "model"
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["stage"] == "reward" and lineage["parent"] == sft and lineage["adapter"] is use_lora
    assert lineage["parameters"]["objective"] == "pairwise"
    assert lineage["parameters"]["pad_token_id"] == 0  # "<pad>", not eos
    assert (model_dir / "adapter_config.json").is_file() is use_lora
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))
    html = (root / "report.html").read_text()
    assert "Reward model training" in html and "Accuracy by margin bucket" in html
    assert "accuracy before" in html and html.count("data:image/png;base64,") >= 4


@pytest.mark.parametrize("use_lora", [True, False])
def test_saved_reward_model_scores_exactly_as_in_training(trained, use_lora: bool) -> None:
    """Loaded again, the model gives the eval rewards the training loop measured (same tokens, same pooling)."""
    root, metrics = trained[use_lora]
    model_dir = str(root / "model")
    model = modeling.load_reward_model(model_dir).eval()
    tokenizer = modeling.load_tokenizer(model_dir)
    chosen, rejected = _score_eval_pairs(model, tokenizer)
    assert sum(chosen) / len(chosen) == pytest.approx(metrics["eval_chosen_reward"], abs=1e-4)
    assert sum(rejected) / len(rejected) == pytest.approx(metrics["eval_rejected_reward"], abs=1e-4)
    assert all(c > r for c, r in zip(chosen, rejected, strict=True))


def test_full_reward_model_loads_with_plain_transformers(trained) -> None:
    model_dir = str(trained[False][0] / "model")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 1
    good, bad = score_texts(model, tokenizer, ["a new question", "a new question"], [GOOD[1], BAD[2]])
    assert good > bad
    ours = score_texts(modeling.load_reward_model(model_dir), tokenizer, ["a new question"], [GOOD[1]])
    assert ours[0] == pytest.approx(good, abs=1e-5)


def test_lora_reward_model_loads_with_plain_transformers_and_peft(trained, sft: str) -> None:
    from peft import PeftModel

    model_dir = str(trained[True][0] / "model")
    base = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    model = PeftModel.from_pretrained(base, model_dir).eval()  # the trained score head comes with the adapter
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    good, bad = score_texts(model, tokenizer, ["a new question"] * 2, [GOOD[2], BAD[0]])
    assert good > bad
    merged = modeling.load_reward_model(model_dir)
    assert score_texts(merged, tokenizer, ["a new question"] * 2, [GOOD[2], BAD[0]]) == pytest.approx(
        [good, bad], abs=1e-5
    )


def test_scores_do_not_depend_on_batch_padding(trained) -> None:
    model_dir = str(trained[False][0] / "model")
    model = modeling.load_reward_model(model_dir)
    tokenizer = modeling.load_tokenizer(model_dir)
    prompts = ["q", "a much longer question about the sky"]
    texts = [GOOD[0], BAD[1]]
    batched = score_texts(model, tokenizer, prompts, texts, batch_size=2)
    alone = [
        score_texts(model, tokenizer, [p], [t], batch_size=1)[0] for p, t in zip(prompts, texts, strict=True)
    ]
    assert batched == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_texts(model, tokenizer, prompts, texts[:1])
    with pytest.raises(ValueError, match="empty sequence"):
        score_sequences(model, [[]])


def test_tokenizer_that_pads_with_eos(tmp_path: Path, pairs: str) -> None:
    """No pad token: padding is eos, the score is read at the last response token, and loading agrees."""
    sft = make_policy_dir(tmp_path / "sft", pad=None)
    out = tmp_path / "model"
    metrics = train_reward_model(
        sft, pairs, pairs, str(out), str(tmp_path / "r.html"), _config(use_lora=False, max_steps=2)
    )
    model = modeling.load_reward_model(str(out))
    tokenizer = modeling.load_tokenizer(str(out))
    assert model.config.pad_token_id == tokenizer.eos_token_id
    chosen, _ = _score_eval_pairs(model, tokenizer)
    assert sum(chosen) / len(chosen) == pytest.approx(metrics["eval_chosen_reward"], abs=1e-4)


def test_regression_objective_fits_the_scores(sft: str, pairs: str, tmp_path: Path) -> None:
    metrics = train_reward_model(
        sft, pairs, pairs, str(tmp_path / "m"), str(tmp_path / "r.html"), _config(objective="regression")
    )
    assert metrics["eval_loss"] < 0.5 * metrics["first_eval_loss"]
    assert metrics["eval_accuracy"] == 1.0
    # chosen scores average 1.1, rejected -1.05: the rewards move towards them.
    assert metrics["eval_chosen_reward"] > 0 > metrics["eval_rejected_reward"]
    lineage = json.loads((tmp_path / "m" / "lineage.json").read_text())
    assert lineage["parameters"]["objective"] == "regression"


def test_margin_enters_the_loss(sft: str, pairs: str, tmp_path: Path) -> None:
    def first_loss(**kw) -> float:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        config = _config(max_steps=1, use_lora=False, **kw)
        return train_reward_model(sft, pairs, pairs, str(out), str(out) + ".html", config)["first_eval_loss"]

    # Same seed, same initial head: before training the rewards are identical; only the margin differs.
    with_margin, without = first_loss(use_margin=True), first_loss(use_margin=False)
    assert with_margin > without + 0.1  # 3 of 4 pairs must win by 1, 2 or 3 more
    assert first_loss(use_margin=True, margin_scale=0.0) == pytest.approx(without, abs=1e-6)


def test_margin_buckets_by_hand() -> None:
    # Finite margins sorted: [1, 1, 2, 3] (n = 4; the NaN pair has none). Linear-interpolation quantiles sit
    # at positions q * (n - 1): 1/3 * 3 = 1 -> 1.0 and 2/3 * 3 = 2 -> 2.0. So low: m <= 1, mid: 1 < m <= 2.
    margins = [1.0, 2.0, 3.0, math.nan, 1.0]
    q1, q2 = margin_thresholds(margins)
    assert (q1, q2) == pytest.approx((1.0, 2.0))
    assert [margin_bucket(m, (q1, q2)) for m in margins] == ["low", "mid", "high", "none", "low"]
    assert margin_thresholds([math.nan]) is None and margin_bucket(2.0, None) == "none"
    chosen = [1.0, 0.0, 5.0, 2.0, -1.0]
    rejected = [0.0, 1.0, 1.0, 2.0, 0.0]  # wins: yes, no, yes, tie (no), no
    rows = {r["bucket"]: r for r in bucket_rows(margins, chosen, rejected, (q1, q2))}
    assert rows["low"]["pairs"] == 2 and rows["low"]["accuracy"] == 0.5  # pairs 0 and 4
    assert rows["low"]["mean_margin"] == pytest.approx((1.0 - 1.0) / 2)
    assert rows["mid"]["accuracy"] == 0.0 and rows["high"]["accuracy"] == 1.0
    assert rows["none"]["accuracy"] == 0.0  # a tie is not a win
    assert bucket_rows([math.nan], [1.0], [0.0], None)[0]["bucket"] == "none"


def _bad_pairs(tmp_path: Path, row: dict) -> str:
    return write_jsonl(tmp_path / "bad.jsonl", [pair_rows(1)[0], row])


@pytest.mark.parametrize(
    ("change", "objective", "match"),
    [
        ({"margin": -1}, "pairwise", r"bad.jsonl: row 2: field 'margin'"),
        ({"margin": "big"}, "pairwise", r"bad.jsonl: row 2: field 'margin'"),
        ({"scores": None}, "regression", r"bad.jsonl: row 2: field 'scores'.*objective='pairwise'"),
        ({"scores": {"chosen": 1.0}}, "regression", r"bad.jsonl: row 2: field 'scores'"),
        ({"rejected": ""}, "pairwise", r"bad.jsonl: row 2: field 'rejected'"),
    ],
)
def test_bad_pairs_name_file_row_and_field(
    sft: str, tmp_path: Path, change: dict, objective: str, match: str
) -> None:
    row = {**pair_rows(2)[1], **change}
    bad = _bad_pairs(tmp_path, row)
    with pytest.raises(DataError, match=match):
        train_reward_model(
            sft, bad, bad, str(tmp_path / "m"), str(tmp_path / "r.html"), _config(objective=objective)
        )


def test_pairs_without_scores_train_pairwise(sft: str, tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "scores"} for r in pair_rows(4)]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    metrics = train_reward_model(
        sft, plain, plain, str(tmp_path / "m"), str(tmp_path / "r.html"), _config(max_steps=1)
    )
    assert metrics["steps"] == 1


def test_config_rejects_nonsense(sft: str, pairs: str, tmp_path: Path) -> None:
    for bad, match in (({"objective": "ranking"}, "objective"), ({"margin_scale": -1.0}, "margin_scale")):
        with pytest.raises(ValueError, match=match):
            train_reward_model(
                sft, pairs, pairs, str(tmp_path / "m"), str(tmp_path / "r.html"), _config(**bad)
            )


# --- the KFP components, run for real through kfp.local -------------------------------------------------------


@pytest.mark.slow
def test_reward_component_and_evaluate_judge_run_locally(sft: str, pairs: str, tmp_path: Path) -> None:
    """reward_model inside a pipeline, its model fed to evaluate as the optional judge input (~30 s: each task
    is a fresh Python process). Without a judge, evaluate runs in tests/test_components_local.py."""
    from kfp import dsl, local

    from preftune.components.evaluate.component import evaluate
    from preftune.components.reward_model.component import reward_model

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "question 1"}, {"prompt": "question 2"}])

    @dsl.pipeline(name="reward-and-judge")
    def pipeline(sft_uri: str, pairs_uri: str, prompts_uri: str):  # noqa: ANN202 - KFP reads the annotations
        model = dsl.importer(artifact_uri=sft_uri, artifact_class=dsl.Model, reimport=False)
        data = dsl.importer(artifact_uri=pairs_uri, artifact_class=dsl.Dataset, reimport=False)
        reward = reward_model(
            sft_model=model.output,
            train_pairs=data.output,
            eval_pairs=data.output,
            max_steps=2,
            batch_size=4,
            max_length=48,
            use_lora=True,
        )
        evaluate(
            candidate=model.output,
            reference=model.output,
            eval_prompts=prompts_uri,
            eval_pairs=data.output,
            judge=reward.outputs["model"],
            max_prompts=2,
            max_new_tokens=4,
        )

    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    pipeline(sft_uri=sft, pairs_uri=pairs, prompts_uri=prompts)
    root = tmp_path / "root"
    [model_dir] = [p.parent for p in root.rglob("lineage.json")]
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["stage"] == "reward" and lineage["adapter"] is True
    [generations] = [p for p in root.rglob("generations") if p.is_file()]
    rows = [json.loads(x) for x in generations.read_text().splitlines()]
    assert len(rows) == 2 and {"candidate_reward", "reference_reward"} <= set(rows[0])
    # Candidate and reference are one model with one seed: same responses, so every prompt is a tie.
    assert all(r["candidate_reward"] == r["reference_reward"] for r in rows)
