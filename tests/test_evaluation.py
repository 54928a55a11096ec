"""Tests of preftune.eval.evaluation on tiny random Llama models built offline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, make_tokenizer, save_model_dir
from transformers import GenerationConfig, PreTrainedTokenizerFast

from preftune.eval.evaluation import (
    EvalConfig,
    distinct_n,
    evaluate,
    judge_metrics,
)
from preftune.eval.judge import Judge
from preftune.model.sampling import generate_responses

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "the cat sat on the mat and the dog ran after it",
    "a preference model ranks answers; the policy learns from pairs",
    "<|user|> <|assistant|> hello, how are you? fine thanks.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and words: alpha beta gamma delta",
]


def _tokenizer() -> PreTrainedTokenizerFast:
    """No pad token of its own: it pads with eos."""
    return make_tokenizer(
        CORPUS, vocab_size=320, special_tokens=["<s>", "</s>"], pad="</s>", chat_template=CHAT_TEMPLATE
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread avoids OpenMP contention


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A reference model and a perturbed copy of it (the "candidate"), saved as model artifacts."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = _tokenizer()
    reference = make_model(tokenizer)  # initializer_range 0.2: peaked, so a perturbation moves them visibly
    ref_dir = save_model_dir(reference, tokenizer, root / "reference")
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.1 * torch.randn_like(param))
    cand_dir = save_model_dir(reference, tokenizer, root / "candidate")
    return {"reference": ref_dir, "candidate": cand_dir}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    prompts = root / "prompts.jsonl"
    rows = [
        {"prompt": "hello, how are you?"},
        {"prompt": [{"role": "user", "content": "name a number"}]},
        {"prompt": "the cat sat"},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "alpha beta"}]},
        {"prompt": "what does the policy learn?"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs = root / "pairs.jsonl"
    pair_rows = [
        {
            "prompt": [{"role": "user", "content": "say hi"}],
            "chosen": "hello, fine thanks.",
            "rejected": "no.",
        },
        {"prompt": [{"role": "user", "content": "count"}], "chosen": "0 1 2 3", "rejected": "alpha beta"},
        {"prompt": "animal?", "chosen": "the cat", "rejected": "the dog ran after the cat on the mat"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows), encoding="utf-8")
    return {"prompts": str(prompts), "pairs": str(pairs)}


FAST = EvalConfig(max_new_tokens=8, batch_size=2, max_prompts=64)


def _run(
    tmp_path: Path, tiny: dict[str, str], data: dict[str, str], candidate: str, **kw
) -> dict[str, float]:
    config = kw.pop("config", FAST)
    return evaluate(
        tiny[candidate],
        tiny["reference"],
        data["prompts"],
        data["pairs"],
        str(tmp_path / "generations.jsonl"),
        str(tmp_path / "report.html"),
        config,
        **kw,
    )


def test_distinct_n_matches_hand_worked_values() -> None:
    texts = ["a b a b", "a c", ""]
    # unigrams a b a b a c: 3 unique of 6; bigrams (a b)(b a)(a b)(a c): 3 unique of 4; no n-gram spans texts.
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert distinct_n(["x  y\nx"], 1) == pytest.approx(2 / 3)  # any whitespace splits words
    assert distinct_n(["one"], 2) == 0.0
    assert distinct_n([], 1) == 0.0
    with pytest.raises(ValueError):
        distinct_n(["a"], 0)


def test_identical_models_have_zero_kl_and_neutral_rewards(tmp_path: Path, tiny, data) -> None:
    metrics = _run(tmp_path, tiny, data, "reference")
    assert abs(metrics["kl_candidate_reference"]) < 1e-4
    assert abs(metrics["kl_candidate_reference_per_token"]) < 1e-4
    assert metrics["implicit_reward_accuracy"] == 0.0
    assert metrics["implicit_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["chosen_perplexity_candidate"] == pytest.approx(metrics["chosen_perplexity_reference"])
    assert metrics["distinct_1_candidate"] == metrics["distinct_1_reference"]  # same seed, same model
    assert metrics["num_pairs"] == 3.0
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_perturbed_candidate_has_positive_finite_kl(tmp_path: Path, tiny, data) -> None:
    metrics = _run(tmp_path, tiny, data, "candidate")
    assert math.isfinite(metrics["kl_candidate_reference"])
    assert metrics["kl_candidate_reference"] > 0.01
    assert metrics["kl_candidate_reference_per_token"] > 0
    assert metrics["implicit_reward_margin"] != 0.0
    assert 0.0 <= metrics["implicit_reward_accuracy"] <= 1.0
    expected = {
        "num_prompts",
        "kl_candidate_reference",
        "kl_candidate_reference_per_token",
        "distinct_1_candidate",
        "distinct_2_candidate",
        "distinct_1_reference",
        "distinct_2_reference",
        "mean_length_candidate",
        "mean_length_reference",
        "num_pairs",
        "implicit_reward_accuracy",
        "implicit_reward_margin",
        "chosen_perplexity_candidate",
        "chosen_perplexity_reference",
        "diversity_ratio_vs_reference",
        "frontier_points",
        "selection_points",
        "selection_in_bounds",
        "selected_step",
        "selected_final",
    }
    assert set(metrics) == expected
    # no snapshots: the final policy is the candidate, and without a judge there is no frontier to draw
    assert (metrics["selection_points"], metrics["selected_final"], metrics["frontier_points"]) == (1, 1, 0)
    assert metrics["diversity_ratio_vs_reference"] == pytest.approx(
        metrics["distinct_2_candidate"] / metrics["distinct_2_reference"]
    )
    assert all(math.isfinite(v) for v in metrics.values())


def test_generations_file_and_report(tmp_path: Path, tiny, data) -> None:
    metrics = _run(tmp_path, tiny, data, "candidate")
    lines = (tmp_path / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 5 == metrics["num_prompts"]
    assert all(set(row) == {"prompt", "candidate", "reference"} for row in rows)
    assert rows[0]["prompt"] == "hello, how are you?"  # the user's text, not the chat template
    assert rows[1]["prompt"] == "name a number"
    assert rows[3]["prompt"] == "system: be brief\nuser: alpha beta"
    assert "<|assistant|>" not in rows[0]["prompt"]
    assert metrics["mean_length_candidate"] <= FAST.max_new_tokens

    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "<table" in html and "kl_candidate_reference" in html and "implicit_reward_accuracy" in html
    assert (
        html.count("data:image/png;base64,") == 2
    )  # distinct-n and length (no snapshots, no judge: no frontier)
    assert "judge" not in html.split("How the metrics are computed")[0]  # no judge, no judge section


def test_same_seed_gives_same_generations(tmp_path: Path, tiny, data) -> None:
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        out.mkdir()
        config = EvalConfig(max_new_tokens=8, batch_size=2, seed=seed, temperature=1.0, top_p=1.0)
        evaluate(
            tiny["candidate"],
            tiny["reference"],
            data["prompts"],
            None,
            str(out / "g.jsonl"),
            str(out / "r.html"),
            config,
        )
        runs.append((out / "g.jsonl").read_text(encoding="utf-8"))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_max_prompts_caps_and_pairs_are_optional(tmp_path: Path, tiny, data) -> None:
    config = EvalConfig(max_new_tokens=4, batch_size=4, max_prompts=2, temperature=0.0)
    metrics = evaluate(
        tiny["candidate"],
        tiny["reference"],
        data["prompts"],
        None,
        str(tmp_path / "g.jsonl"),
        str(tmp_path / "r.html"),
        config,
    )
    assert metrics["num_prompts"] == 2.0
    assert "implicit_reward_accuracy" not in metrics and "num_pairs" not in metrics
    assert len((tmp_path / "g.jsonl").read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("content", [None, "", '{"prompt": "ok"}\nnot json\n', '{"text": "no prompt"}\n'])
def test_bad_eval_prompts_name_the_file(tmp_path: Path, tiny, content: str | None) -> None:
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="prompts.jsonl"):
        evaluate(
            tiny["candidate"],
            tiny["reference"],
            str(path),
            None,
            str(tmp_path / "g.jsonl"),
            str(tmp_path / "r.html"),
            FAST,
        )


def test_bad_pair_names_row_and_field(tmp_path: Path, tiny, data) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": ""}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 1, field 'rejected'"):
        evaluate(
            tiny["candidate"],
            tiny["reference"],
            data["prompts"],
            str(pairs),
            str(tmp_path / "g.jsonl"),
            str(tmp_path / "r.html"),
            FAST,
        )


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="top_p"):
        EvalConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvalConfig(max_new_tokens=0)


def test_responses_stop_at_the_first_eos() -> None:
    """Tokens after eos (padding of finished rows) are dropped; eos is kept for scoring, not counted in length."""
    tokenizer = _tokenizer()
    eos = tokenizer.eos_token_id
    hello = tokenizer("hello", add_special_tokens=False)["input_ids"]

    class Scripted(torch.nn.Module):
        """Stands in for a model: appends a fixed continuation to every prompt."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.generation_config = GenerationConfig(eos_token_id=eos)

        def generate(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: object
        ) -> torch.Tensor:
            tail = [hello + [eos] * (2 * len(hello)), hello * 3]
            return torch.cat([input_ids, torch.tensor(tail[: len(input_ids)])], dim=1)

    out = generate_responses(
        Scripted(),
        tokenizer,
        ["a", "b c"],
        max_new_tokens=3 * len(hello),
        temperature=0.7,
        top_p=0.9,
        seed=0,
        batch_size=2,
    )
    assert out.response_ids == [hello + [eos], hello + hello + hello]
    assert out.lengths == [len(hello), 3 * len(hello)]
    assert out.texts == ["hello", "hellohellohello"]


def test_prompts_from_a_directory(tmp_path: Path, tiny) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps({"prompt": "second"}) + "\n", encoding="utf-8")
    (folder / "a.jsonl").write_text(json.dumps({"prompt": "first"}) + "\n", encoding="utf-8")
    (folder / "notes.txt").write_text("not data", encoding="utf-8")
    config = EvalConfig(max_new_tokens=2, batch_size=2, temperature=0.0)
    evaluate(
        tiny["reference"],
        tiny["reference"],
        str(folder),
        None,
        str(tmp_path / "g.jsonl"),
        str(tmp_path / "r.html"),
        config,
    )
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["first", "second"]
    assert rows[0]["candidate"] == rows[0]["reference"]  # greedy, same model


# --- the judge (a reward model scoring both models' responses) -------------------------------------------------

LONG = "the cat sat on the mat and the dog ran after it"
SHORT = "no."


@pytest.fixture(scope="module")
def judge(tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A reward model trained briefly (on the reference's backbone) to prefer a long answer to a short one."""
    from preftune.train.reward import RewardConfig, train_reward_model

    root = tmp_path_factory.mktemp("judge")
    rows = [
        {"prompt": [{"role": "user", "content": f"say something {i}"}], "chosen": LONG, "rejected": SHORT}
        for i in range(8)
    ]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = RewardConfig(
        max_steps=6, learning_rate=1e-2, batch_size=4, max_length=64, use_lora=False, eval_steps=0
    )
    metrics = train_reward_model(
        tiny["reference"], str(pairs), str(pairs), str(root / "model"), str(root / "r.html"), config
    )
    assert metrics["eval_accuracy"] == 1.0
    return str(root / "model")


def test_judge_metrics_by_hand() -> None:
    # Prompt 1: candidate wins (1 > 0); 2: tie (0 = 0); 3: reference wins (2 < 3); 4: tie (0.5 = 0.5).
    # Win rate = (1 win + 0.5 * 2 ties) / 4 = 0.5; means: (1 + 0 + 2 + 0.5) / 4 = 0.875 and (0 + 0 + 3 + 0.5) / 4.
    # Equal lengths: the length-controlled win rate is the raw one and length has no effect.
    metrics = judge_metrics([1.0, 0.0, 2.0, 0.5], [0.0, 0.0, 3.0, 0.5], [3] * 4, [3] * 4, name="reference")
    assert metrics == {
        "judge_reward_candidate": pytest.approx(0.875),
        "judge_reward_reference": pytest.approx(0.875),
        "win_rate_vs_reference": pytest.approx(0.5),
        "lc_win_rate_vs_reference": pytest.approx(0.5),
        "length_coefficient_vs_reference": pytest.approx(0.0),
        "judge_ties_vs_reference": 2.0,
    }
    # One prompt, the candidate ahead: win rate 1; behind: 0. The champion gets its own names.
    ahead = judge_metrics([2.0], [1.0], [1], [1], name="champion")
    assert ahead["win_rate_vs_champion"] == ahead["lc_win_rate_vs_champion"] == 1.0
    assert judge_metrics([1.0], [2.0], [1], [1], name="reference")["win_rate_vs_reference"] == 0.0
    with pytest.raises(ValueError, match="no responses"):
        judge_metrics([], [], [], [], name="reference")


def test_judge_scores_what_it_learnt(judge: str) -> None:
    prompts = [[{"role": "user", "content": "say something new"}], "say something else"]
    scorer = Judge(judge, batch_size=2)
    candidate = scorer.score(prompts, [LONG, LONG])
    reference = scorer.score(prompts, [SHORT, LONG])
    assert candidate[0] > reference[0]  # long beats short
    assert candidate[1] == reference[1]  # the same response to the same prompt: an exact tie
    lengths = [len(LONG.split())] * 2, [len(SHORT.split()), len(LONG.split())]
    metrics = judge_metrics(candidate, reference, *lengths, name="reference")
    assert metrics["win_rate_vs_reference"] == 0.75 and metrics["judge_ties_vs_reference"] == 1.0


def test_evaluate_with_a_judge(tmp_path: Path, tiny, data, judge: str) -> None:
    metrics = _run(tmp_path, tiny, data, "candidate", judge=judge)
    judge_keys = {
        "judge_reward_candidate",
        "judge_reward_reference",
        "win_rate_vs_reference",
        "lc_win_rate_vs_reference",
        "judge_ties_vs_reference",
    }
    assert judge_keys <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in judge_keys)
    rows = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(
        set(r) == {"prompt", "candidate", "reference", "candidate_reward", "reference_reward"} for r in rows
    )
    wins = sum(r["candidate_reward"] > r["reference_reward"] for r in rows)
    ties = sum(r["candidate_reward"] == r["reference_reward"] for r in rows)
    assert metrics["win_rate_vs_reference"] == pytest.approx((wins + 0.5 * ties) / len(rows))
    assert metrics["judge_ties_vs_reference"] == ties
    mean = sum(r["candidate_reward"] for r in rows) / len(rows)
    assert metrics["judge_reward_candidate"] == pytest.approx(mean)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Win rates under the judge" in html and "win_rate_vs_reference" in html
    # distinct-n, length, judge outcome, mean reward and the reward-vs-KL chart
    assert html.count("data:image/png;base64,") == 5
    assert "candidate_reward" in html  # the per-prompt rewards are in the generations table


def test_a_model_against_itself_ties_everywhere(tmp_path: Path, tiny, data, judge: str) -> None:
    metrics = _run(tmp_path, tiny, data, "reference", judge=judge)  # same model, same seed, same responses
    assert metrics["judge_ties_vs_reference"] == metrics["num_prompts"] == 5
    assert metrics["win_rate_vs_reference"] == 0.5
    assert metrics["judge_reward_candidate"] == metrics["judge_reward_reference"]


@pytest.mark.parametrize("which", ["causal", "missing"])
def test_judge_must_be_a_reward_model(tmp_path: Path, tiny, data, which: str) -> None:
    ref, error, match = {
        "causal": (tiny["reference"], ValueError, "not a reward model"),
        "missing": (str(tmp_path / "nowhere"), FileNotFoundError, "does not exist"),
    }[which]
    with pytest.raises(error, match=match):
        _run(tmp_path, tiny, data, "candidate", judge=ref)
    assert not (tmp_path / "generations.jsonl").exists()  # it failed before generating anything


# --- champion, training snapshots and the report in a browser ---------------------------------------------------


@pytest.fixture(scope="module")
def snapshots(tiny: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two snapshots on the way from the reference to the candidate (weights interpolated), as training keeps."""
    from transformers import AutoModelForCausalLM

    from preftune.model.modeling import load_tokenizer
    from preftune.train.snapshots import Snapshots

    root = tmp_path_factory.mktemp("snapshots")
    start = AutoModelForCausalLM.from_pretrained(tiny["reference"])
    end = AutoModelForCausalLM.from_pretrained(tiny["candidate"]).state_dict()
    keeper = Snapshots(str(root), total_steps=4, count=2, stage="dpo")
    assert sorted(keeper.steps) == [1, 2]
    base = {k: v.clone() for k, v in start.state_dict().items()}
    for step in sorted(keeper.steps):
        share = step / 4
        start.load_state_dict({k: (1 - share) * base[k] + share * end[k] for k in base})
        keeper.save(
            step, start, load_tokenizer(tiny["reference"]), parent_uri=tiny["reference"], parameters={}
        )
    return str(root)


@pytest.fixture(scope="module")
def full_eval(tiny, data, judge, snapshots, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("full-eval")
    metrics = evaluate(
        tiny["candidate"],
        tiny["reference"],
        data["prompts"],
        data["pairs"],
        str(root / "generations.jsonl"),
        str(root / "report.html"),
        FAST,
        judge=judge,
        champion=tiny["reference"],  # the champion is the reference model: every comparison must agree
        checkpoints=snapshots,
    )
    rows = [json.loads(x) for x in (root / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    return {"metrics": metrics, "rows": rows, "report": root / "report.html", "root": root}


def test_champion_is_compared_like_the_reference(full_eval: dict) -> None:
    metrics, rows = full_eval["metrics"], full_eval["rows"]
    # same weights, same seed, same settings: the champion answers exactly as the reference does
    assert all(r["champion"] == r["reference"] for r in rows)
    for name in ("win_rate_vs", "lc_win_rate_vs", "judge_reward", "judge_ties_vs"):
        assert metrics[f"{name}_champion"] == pytest.approx(metrics[f"{name}_reference"])
    assert metrics["distinct_2_champion"] == metrics["distinct_2_reference"]
    assert set(rows[0]) >= {"candidate_reward", "reference_reward", "champion_reward"}
    wins = sum(r["candidate_reward"] > r["champion_reward"] for r in rows)
    ties = sum(r["candidate_reward"] == r["champion_reward"] for r in rows)
    assert metrics["win_rate_vs_champion"] == pytest.approx((wins + 0.5 * ties) / len(rows))
    assert 0.0 <= metrics["lc_win_rate_vs_champion"] <= 1.0


def test_every_snapshot_is_a_point_of_the_frontier(full_eval: dict) -> None:
    metrics = full_eval["metrics"]
    assert metrics["frontier_points"] == 4  # the reference, two snapshots, the final model
    html = full_eval["report"].read_text(encoding="utf-8")
    for label in ("reference", "step 1", "step 2", "final"):
        assert f"<td>{label}</td>" in html
    assert "Judge reward vs KL to the reference" not in html  # the title is inside the chart image
    assert "Reward vs KL over training" in html


def test_report_renders_in_headless_chromium(full_eval: dict) -> None:
    """The report as a reviewer sees it: every chart decodes, the tables are there, a screenshot is taken."""
    from playwright.sync_api import sync_playwright

    chromium = "/usr/bin/chromium"
    assert Path(chromium).exists(), "Debian's chromium package is needed (make test installs it)"
    shot = full_eval["root"] / "report.png"
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(full_eval["report"].as_uri())
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
            headings = page.locator("h2").all_inner_texts()
            generations = page.locator("h2:has-text('Generations') + table tbody tr").count()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    # distinct-n, length, two judge outcomes (reference, champion), mean reward, reward-vs-KL
    assert len(images) == 6 and all(done and width > 100 for done, width in images)
    assert headings[:2] == ["Win rates under the judge", "Reward vs KL over training"]
    assert generations == len(full_eval["rows"]) == 5
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000  # a full page, not a blank one


def test_held_out_pairs_are_truncated_at_max_length_as_dpo_training_does(tmp_path: Path, tiny, data) -> None:
    """Implicit rewards on held-out pairs are scored on the tokens DPO trained on: cut at the same max_length
    (the pipelines pass the training max_length), not at the model's context length."""
    from preftune.eval.evaluation import _read_pairs
    from preftune.model.modeling import load_causal_lm, load_tokenizer
    from preftune.model.sampling import score_pairs
    from preftune.model.templating import tokenize_pair

    short = EvalConfig(max_new_tokens=4, batch_size=2, max_prompts=2, max_length=10)
    metrics = _run(tmp_path, tiny, data, "candidate", config=short)
    tok = load_tokenizer(tiny["reference"])
    models = [load_causal_lm(tiny[k]) for k in ("candidate", "reference")]
    pairs = _read_pairs(data["pairs"])
    kwargs = {"beta": short.beta, "batch_size": 2}
    cut = score_pairs(*models, tok, pairs, max_length=10, **kwargs)
    whole = score_pairs(*models, tok, pairs, **kwargs)
    assert metrics["implicit_reward_margin"] == pytest.approx(cut["implicit_reward_margin"], abs=1e-6)
    assert cut["implicit_reward_margin"] != pytest.approx(whole["implicit_reward_margin"], abs=1e-4)
    # the same tokens as DPO's own features at that max_length (load_pair_features tokenises with tokenize_pair)
    from preftune.model.sampling import PairScorer

    scorer = PairScorer(models[1], tok, pairs, max_length=10, **kwargs)
    features = [tokenize_pair(tok, messages, chosen, rejected, 10) for messages, chosen, rejected in pairs]
    expected = [(f["prompt_ids"], f[k]) for f in features for k in ("chosen_ids", "rejected_ids")]
    assert scorer.items == expected


def test_selection_picks_a_snapshot_inside_the_bounds_when_the_final_policy_is_outside_them(
    tmp_path: Path, tiny, data, snapshots: str
) -> None:
    """The whole path: every policy of the run measured, the bound put between the first snapshot's KL and the
    final policy's, and the evaluation's candidate (metrics and the ``selected`` copy) is a snapshot inside it."""
    import dataclasses

    from preftune.eval.gate import decide
    from preftune.train.snapshots import read_index

    def run(name: str, config: EvalConfig) -> tuple[dict[str, float], list[dict]]:
        root = tmp_path / name
        metrics = _run(
            root,
            tiny,
            data,
            "candidate",
            config=config,
            checkpoints=snapshots,
            frontier_path=str(root / "frontier.jsonl"),
            selected_path=str(root / "selected"),
        )
        lines = (root / "frontier.jsonl").read_text(encoding="utf-8").splitlines()
        return metrics, [json.loads(x) for x in lines]

    unbounded = dataclasses.replace(FAST, max_kl=-1.0, min_diversity_ratio=-1.0)
    _, points = run("unbounded", unbounded)
    kl = {p["label"]: p["kl"] for p in points}
    assert kl["step 1"] < kl["final"], kl  # a quarter of the way to the candidate drifts less than all of it
    bound = (kl["step 1"] + kl["final"]) / 2
    metrics, points = run("bounded", dataclasses.replace(unbounded, max_kl=bound))

    by_label = {p["label"]: p for p in points}
    assert (
        by_label["final"]["in_bounds"] is False and "kl_candidate_reference" in by_label["final"]["why_not"]
    )
    (chosen,) = [p for p in points if p.get("chosen")]
    assert chosen["label"] in ("step 1", "step 2") and chosen["in_bounds"] and chosen["kl"] <= bound
    assert metrics["selected_final"] == 0 and metrics["selected_step"] == chosen["step"]
    assert metrics["kl_candidate_reference"] == pytest.approx(chosen["kl"])
    assert metrics["selection_points"] == 3 and metrics["selection_in_bounds"] >= 1
    # the selected artifact is the chosen snapshot's weights, and the gate passes it on the bound
    (snap,) = [s for s in read_index(snapshots) if s["step"] == chosen["step"]]
    selected = tmp_path / "bounded" / "selected" / "model.safetensors"
    assert selected.read_bytes() == (Path(snap["path"]) / "model.safetensors").read_bytes()
    decision = decide(metrics, min_win_rate_vs_champion=-1, max_kl=bound, min_diversity_ratio=-1)
    assert decision["promote"] is True
    assert (
        "step"
        in (tmp_path / "bounded" / "report.html").read_text(encoding="utf-8").split("Model selection")[1]
    )
