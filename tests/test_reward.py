"""Tests of preftune.train.reward and preftune.model.scoring on tiny random Llamas built offline (seconds on CPU)."""

import json
import math
from pathlib import Path

import pytest
import tiny_models
import torch
from tiny_models import BAD, GOOD, make_policy_dir, write_jsonl
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from preftune.model import modeling
from preftune.model.scoring import score_sequences, score_texts
from preftune.train.batching import DataError
from preftune.train.reward import (
    PackedRewardCollator,
    RewardCollator,
    RewardConfig,
    bucket_rows,
    load_reward_features,
    make_collator,
    margin_bucket,
    margin_thresholds,
    pair_losses,
    pair_rewards,
    score_position,
    train_reward_model,
)

METRICS = {
    "eval_accuracy", "first_eval_accuracy", "eval_mean_margin", "eval_loss", "first_eval_loss", "train_loss",
    "eval_chosen_reward", "eval_rejected_reward", "eval_reward_mean", "eval_reward_std", "steps",
    "train_pairs", "eval_pairs", "train_seconds", "resumed_from_step",
    "stage_seconds", "peak_memory_mb", "train_tokens", "best_step", "stopped_early",
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
    # evaluated every 2 steps; the loss keeps falling at accuracy 1.0, so the best is late and nothing stops
    assert metrics["best_step"] in (2, 4, 6, 8, 10, 12) and metrics["best_step"] > 2
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
    for bad, match in (
        ({"objective": "ranking"}, "objective"),
        ({"margin_scale": -1.0}, "margin_scale"),
        ({"pack_length": -1}, "pack_length"),
    ):
        with pytest.raises(ValueError, match=match):
            train_reward_model(
                sft, pairs, pairs, str(tmp_path / "m"), str(tmp_path / "r.html"), _config(**bad)
            )


# --- packed, prefix-shared pairs -------------------------------------------------------------------------------

#: (prefix_sharing, pack_length): the default; one pair per row; two documents per pair, packed; rows shorter
#: than a pair (each pair then gets a row of its own).
LEVERS = [(True, 256), (True, 0), (False, 256), (True, 16)]


def _scoring_model(sft: str, use_lora: bool):  # noqa: ANN202
    """The reward model as training starts (a random score head), LoRA's zero-initialised B moved by seeded noise
    so that the adapter changes the hidden states too."""
    model = modeling.prepare_reward_model(sft, use_lora=use_lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def _pool_pad(model) -> int:  # noqa: ANN001
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).config.pad_token_id


def _rewards_losses_grads(model, batch, config: RewardConfig):  # noqa: ANN001, ANN202
    model.zero_grad()
    chosen, rejected = pair_rewards(model, batch)
    losses = pair_losses(config, chosen, rejected, batch)
    losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return torch.cat([chosen, rejected]).detach(), losses.detach(), grads


@pytest.mark.parametrize("use_lora", [True, False])
@pytest.mark.parametrize(("prefix_sharing", "pack_length"), LEVERS)
def test_packed_rewards_equal_one_sequence_per_row(
    sft: str, pairs: str, use_lora: bool, prefix_sharing: bool, pack_length: int
) -> None:
    """Packed / prefix-shared batches give the 2B padded rows' rewards, losses (both objectives) and gradients."""
    model = _scoring_model(sft, use_lora)
    tokenizer = modeling.load_tokenizer(sft)
    features = load_reward_features(pairs, tokenizer, 48, need_scores=True)
    pool = _pool_pad(model)
    padded = RewardCollator(tokenizer, pool)(features)
    packed = PackedRewardCollator(tokenizer, pool, prefix_sharing=prefix_sharing, pack_length=pack_length)(
        features
    )
    if pack_length == 256:
        assert packed["input_ids"].shape[0] < len(features)  # several pairs share a row
    for objective in ("pairwise", "regression"):
        config = RewardConfig(objective=objective)
        want_rewards, want_losses, want_grads = _rewards_losses_grads(model, padded, config)
        rewards, losses, grads = _rewards_losses_grads(model, packed, config)
        assert torch.allclose(rewards, want_rewards, atol=1e-5, rtol=0)
        assert want_rewards.std() > 0.1  # not a trivial agreement on a constant
        assert torch.allclose(losses, want_losses, atol=1e-5, rtol=0)
        for name, grad in want_grads.items():
            assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), name
    # The prompt runs once per pair: the batch holds the prompt, both answers and nothing else.
    once = sum(len(f["prompt_ids"]) * (1 if prefix_sharing else 2) for f in features)
    answers = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    assert int(packed["tokens"]) == once + answers


@pytest.mark.parametrize("pad", ["<pad>", None])
def test_packed_rewards_are_read_where_the_saved_model_scores(
    tmp_path: Path, pairs: str, pad: str | None
) -> None:
    """Training reads each answer's score at the token preftune.model.scoring reads when it scores that text alone: the
    closing eos, or the last response token when the tokenizer pads with eos."""
    sft = make_policy_dir(tmp_path / "sft", pad=pad)
    model = _scoring_model(sft, use_lora=False)
    tokenizer = modeling.load_tokenizer(sft)
    pool = _pool_pad(model)
    assert (pool == tokenizer.eos_token_id) is (pad is None)
    features = load_reward_features(pairs, tokenizer, 48, need_scores=False)
    batch = make_collator(tokenizer, RewardConfig(), pool)(features)
    with torch.no_grad():
        chosen, rejected = pair_rewards(model, batch)
    texts = [f["prompt_ids"] + f[k] for k in ("chosen_ids", "rejected_ids") for f in features]
    alone = score_sequences(model, texts, batch_size=1)
    assert torch.cat([chosen, rejected]).tolist() == pytest.approx(alone, abs=1e-5)
    eos_at = [len(t) - 1 for t in texts]
    assert [score_position(t, pool) for t in texts] == (eos_at if pad else [k - 1 for k in eos_at])


def test_a_read_inside_the_prompt_stays_there(sft: str) -> None:
    """An answer made only of pad ids is pooled at the prompt's last token (as transformers pools it); with the
    prompt shared, the rejected answer's read must not be shifted past the chosen tokens."""
    model = _scoring_model(sft, use_lora=False)
    tokenizer = modeling.load_tokenizer(sft)
    pool, eos = _pool_pad(model), tokenizer.eos_token_id
    prompt = tokenizer("question 1", add_special_tokens=False)["input_ids"]
    answer = tokenizer("no.", add_special_tokens=False)["input_ids"]
    features = [
        {
            "index": 0,
            "prompt_ids": prompt,
            "chosen_ids": answer + [eos],
            "rejected_ids": [pool],
            "margin": 1.0,
        },
        {
            "index": 1,
            "prompt_ids": prompt,
            "chosen_ids": [pool, pool],
            "rejected_ids": answer + [eos],
            "margin": 0.0,
        },
    ]
    assert score_position(prompt + [pool], pool) == len(prompt) - 1
    with torch.no_grad():
        want = torch.cat(pair_rewards(model, RewardCollator(tokenizer, pool)(features)))
        for prefix_sharing in (True, False):
            collator = PackedRewardCollator(tokenizer, pool, prefix_sharing=prefix_sharing)
            got = torch.cat(pair_rewards(model, collator(features)))
            assert torch.allclose(got, want, atol=1e-5, rtol=0), prefix_sharing
    # pair 1's chosen and pair 0's rejected are both read at the prompt's last token
    assert float(want[2]) == pytest.approx(float(want[1]), abs=1e-6)


def test_packed_rows_are_filled_evenly() -> None:
    """As many rows as first fit needs, but evenly filled: the batch is as wide as its tokens need, not as wide
    as pack_length, and every document still sees only itself, from position 0."""
    from preftune.train.batching import PROMPT, pack_documents

    lengths = [40] * 5 + [10] * 6  # first fit into 100: rows of 100, 100 and 60 tokens -> 300 positions
    docs = [[(list(range(1, n + 1)), PROMPT, -1)] for n in lengths]
    batch = pack_documents(docs, 0, 100)
    rows, width = batch["input_ids"].shape
    assert rows == 3 and width == 90  # 5 documents of 40 in 3 rows: one row holds two, so 90 is the least
    assert int(batch["tokens"]) == sum(lengths)
    for d, n in enumerate(lengths):
        row, start = int(batch["doc_row"][d]), int(batch["doc_start"][d])
        assert batch["input_ids"][row, start : start + n].tolist() == list(range(1, n + 1))
        assert batch["position_ids"][row, start : start + n].tolist() == list(range(n))
        mask = batch["attention_mask"][row, 0]
        block = mask[start : start + n, start : start + n]
        assert torch.equal(block, torch.ones(n, n, dtype=torch.bool).tril())
        assert int(mask[start : start + n].sum()) == n * (n + 1) // 2  # nothing outside its own document


def test_packed_training_follows_the_padded_trajectory(sft: str, pairs: str, tmp_path: Path) -> None:
    """The whole loop with the levers on trains the same model as with 2B padded rows, on fewer tokens."""
    runs = {}
    for name, levers in {"packed": {}, "padded": {"prefix_sharing": False, "pack_length": 0}}.items():
        out = tmp_path / name
        config = _config(epochs=1, **levers)
        runs[name] = train_reward_model(sft, pairs, pairs, str(out), str(out) + ".html", config)
    packed, padded = runs["packed"], runs["padded"]
    for key in ("first_eval_loss", "eval_loss", "train_loss", "eval_mean_margin", "eval_reward_std"):
        assert packed[key] == pytest.approx(padded[key], abs=1e-4), key
    assert packed["train_loss"] < packed["first_eval_loss"]  # it did train
    tokenizer = modeling.load_tokenizer(sft)
    features = load_reward_features(pairs, tokenizer, 48, need_scores=False)
    prompts = sum(len(f["prompt_ids"]) for f in features)
    answers = sum(len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    assert packed["train_tokens"] == prompts + answers  # each prompt once
    assert padded["train_tokens"] == 2 * prompts + answers


def test_a_rerun_resumes_packed_training_from_its_newest_checkpoint(
    sft: str, pairs: str, tmp_path: Path
) -> None:
    """A retried run (same config, same checkpoint_uri) continues from the newest checkpoint to the same model."""
    config = _config(checkpoint_uri=str(tmp_path / "checkpoints"), checkpoint_every=5)  # 12 steps: 5 and 10
    whole = train_reward_model(sft, pairs, pairs, str(tmp_path / "a"), str(tmp_path / "a.html"), config)
    retried = train_reward_model(sft, pairs, pairs, str(tmp_path / "b"), str(tmp_path / "b.html"), config)
    assert whole["resumed_from_step"] == 0 and retried["resumed_from_step"] == 10
    for key in ("steps", "eval_loss", "train_loss", "eval_mean_margin", "eval_accuracy", "first_eval_loss"):
        assert retried[key] == pytest.approx(whole[key], abs=1e-6), key
    a = json.loads((tmp_path / "a" / "lineage.json").read_text())["data"]["data_order"]
    b = json.loads((tmp_path / "b" / "lineage.json").read_text())["data"]["data_order"]
    assert a == b  # the same batches, in the same order


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
