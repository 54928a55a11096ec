"""Evaluate a tuned policy against its reference: drift (KL), preference fit, and diversity.

Alignment must not cost the model its generative range. This module measures how far the candidate moved away
from the reference (a KL estimate on the candidate's own samples), how well it ranks held-out preference pairs
(DPO implicit rewards, perplexity of the chosen answers) and whether its outputs stayed diverse (distinct-n,
length), and writes the generations and an HTML report a reviewer can read in the Kubeflow UI.

Definitions (also shown in the report):

- ``kl_candidate_reference``: KL(candidate || reference) per response, estimated as the mean over candidate
  samples of sum_t (log p_cand(y_t | x, y_<t) - log p_ref(y_t | x, y_<t)) over the sampled tokens, eos included.
  Both log-probabilities are the models' raw distributions (temperature 1, no top-p / top-k truncation), and the
  samples are drawn from exactly that candidate distribution (a dedicated sampling pass at temperature 1, top-p
  1, unless the display settings already are those), so the estimate is unbiased for the KL of responses of at
  most ``max_new_tokens`` tokens. It is >= 0 in expectation; a single estimate can be slightly negative when the
  models are (nearly) identical and is reported as is.
- ``kl_candidate_reference_per_token``: the same log-ratios summed over all samples, divided by the number of
  scored tokens.
- ``distinct_n_*``: unique n-grams / total n-grams over all responses of one model, n-grams taken inside each
  response on whitespace-separated words (so the score does not depend on the tokenizer).
- ``mean_length_*``: mean number of generated model tokens per response, eos not counted.
- On preference pairs: the implicit reward of a response is beta * (log pi_cand - log pi_ref) of its tokens
  given the prompt (DPO's reward); ``implicit_reward_accuracy`` is the share of pairs whose chosen reward is
  strictly higher, ``implicit_reward_margin`` the mean reward difference chosen - rejected, and
  ``chosen_perplexity_*`` is exp(total NLL / total tokens) of the chosen responses (completion tokens + eos).
- ``diversity_ratio_vs_reference``: ``distinct_2_candidate / distinct_2_reference`` (absent when the reference
  has no bigrams): below 1 the candidate repeats itself more than the model it started from.
- With a judge (a reward model): each displayed response is scored by it (prompt rendered with the judge's own
  chat template, response, eos; preftune.model.scoring.score_texts). ``judge_reward_<model>`` is the mean reward of
  a model's responses; ``win_rate_vs_<model>`` (reference, champion) is the share of prompts where the
  candidate's reward is higher, a tie counting half; ``lc_win_rate_vs_<model>`` is the length-controlled win
  rate (preftune.eval.winrate: the win probability at equal response length in words, from a logistic model of the
  outcome on the length difference) with ``length_coefficient_vs_<model>`` the fitted effect of length;
  ``judge_ties_vs_<model>`` counts prompts whose rewards are equal (identical responses are scored once, so they
  always tie). Each generations row then also carries ``<model>_reward``.
- With a champion (the registry's current model): it answers the same prompts with the same settings;
  ``distinct_*_champion`` and ``mean_length_champion`` describe it, and with a judge the candidate is compared
  with it as above.
- With training snapshots: ``frontier_points`` counts the points of the reward-vs-KL chart (preftune.eval.frontier).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from preftune.config.evaluate import EvalConfig
from preftune.data.readers import RawRow
from preftune.data.records import completion_text, read_artifact_rows, to_messages, write_jsonl
from preftune.eval.frontier import FrontierProbe, frontier_chart, frontier_rows, raw_sampling
from preftune.eval.judge import Judge, check_reward_model
from preftune.eval.winrate import length_controlled_win_rate, win_rate
from preftune.model import templating
from preftune.model.modeling import load_causal_lm, load_tokenizer, read_lineage, resolve
from preftune.model.precision import resolve_precision
from preftune.model.sampling import Generations, PairScorer, eos_ids_of, estimate_kl, generate_responses
from preftune.model.templating import render_prompt
from preftune.report import html as reports
from preftune.train.snapshots import read_index

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------------------------------- diversity


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts, on whitespace words; 0.0 when there are none.

    N-grams are taken inside each text (never across two), so the score measures repetition within and between
    responses; splitting on whitespace keeps it comparable across tokenizers.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


# -------------------------------------------------------------------------------------------------------- data


def _read_rows(path: str, what: str) -> list[RawRow]:
    """Rows of a JSONL file, or of every *.jsonl in a directory (local or s3), each with its file and line."""
    try:
        rows = read_artifact_rows(path)
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    if not rows:
        raise ValueError(f"{what} {path!r} is empty: no rows to evaluate")
    return rows


def _prompt_messages(row: RawRow, what: str) -> Messages:
    """A row's prompt as chat messages (plain text becomes one user message), checked to say something."""
    record = row.record or {}
    where = f"{what} {row.file}, line {row.row}, field 'prompt'"
    if "prompt" not in record:
        raise ValueError(f"{where}: missing")
    messages = to_messages(record["prompt"], row.file, row.row, "prompt")
    if not messages or not any(m["content"].strip() for m in messages):
        raise ValueError(f"{where}: empty prompt")
    return messages


def _answer(row: RawRow, name: str) -> str:
    record = row.record or {}
    text = completion_text(record.get(name), row.file, row.row, name)
    if not text.strip():
        raise ValueError(f"eval pairs {row.file}, line {row.row}, field {name!r}: empty answer")
    return text


def _prompt_text(messages: Messages) -> str:
    """The prompt as a person reads it: the user's text, or role-labelled turns for a conversation."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# ---------------------------------------------------------------------------------------------------- the judge


def words(text: str) -> int:
    """Length of a response in whitespace words: comparable across models with different tokenizers."""
    return len(text.split())


def judge_metrics(
    candidate: Sequence[float],
    other: Sequence[float],
    candidate_lengths: Sequence[float],
    other_lengths: Sequence[float],
    *,
    name: str,
) -> dict[str, float]:
    """The candidate against ``name`` (reference, champion) under the judge: mean rewards, raw and
    length-controlled win rates (ties count half) and the tie count."""
    if not candidate:
        raise ValueError("judge: no responses to compare")
    lc = length_controlled_win_rate(candidate, other, candidate_lengths, other_lengths)
    return {
        "judge_reward_candidate": sum(candidate) / len(candidate),
        f"judge_reward_{name}": sum(other) / len(other),
        f"win_rate_vs_{name}": win_rate(candidate, other),
        f"lc_win_rate_vs_{name}": lc.win_rate,
        f"length_coefficient_vs_{name}": lc.length_coefficient,
        f"judge_ties_vs_{name}": float(sum(c == o for c, o in zip(candidate, other, strict=True))),
    }


# ------------------------------------------------------------------------------------------------------ report


_METHODS = """<ul>
<li><b>kl_candidate_reference</b>: KL(candidate || reference) per response, the mean over candidate samples of the
sum over sampled tokens (eos included) of log p_cand - log p_ref, both under the models' raw distributions
(temperature 1, no truncation). The samples for this estimate are drawn at temperature 1 and top-p 1, so it is
unbiased; it can be slightly negative when the models are nearly identical.
<b>kl_candidate_reference_per_token</b> divides the same total by the number of sampled tokens.</li>
<li><b>distinct_1 / distinct_2</b>: unique / total word n-grams (whitespace split) over all responses of one model;
<b>diversity_ratio_vs_reference</b> = distinct_2 of the candidate / distinct_2 of the reference.</li>
<li><b>mean_length</b>: generated model tokens per response, eos not counted.</li>
<li><b>implicit_reward_*</b> (held-out pairs): reward = beta * (log pi_cand - log pi_ref) of a response given its
prompt; accuracy = share of pairs where the chosen reward is strictly higher; margin = mean chosen - rejected.</li>
<li><b>chosen_perplexity_*</b>: exp(mean NLL per token) of the chosen responses (completion tokens and eos).</li>
<li><b>judge_*</b> (with a judge reward model): mean reward of each model's displayed responses;
<b>win_rate_vs_X</b> = share of prompts where the candidate's reward beats model X's (the reference, the
champion), a tie counting half; <b>lc_win_rate_vs_X</b> = the length-controlled win rate: a logistic model of
the per-prompt outcome on the difference in response length (words), read at equal length, so an answer does not
win by being longer; <b>length_coefficient_vs_X</b> = how strongly length moved the outcome (per standard deviation
of the length difference; positive = longer wins); <b>judge_ties_vs_X</b> = prompts with equal rewards (identical
responses always tie).</li>
<li><b>Reward vs KL</b>: each training snapshot, the final candidate and the reference, measured on the same
prompts from temperature-1 samples: KL to the reference on the x axis, the judge's mean reward (or, without a
judge, the held-out implicit-reward accuracy) on the y axis: the frontier view of the DPO paper.</li>
</ul>"""


def _win_rate_rows(metrics: Mapping[str, float], opponents: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "against": who,
            "win rate": metrics[f"win_rate_vs_{who}"],
            "length-controlled win rate": metrics[f"lc_win_rate_vs_{who}"],
            "length coefficient": metrics[f"length_coefficient_vs_{who}"],
            "ties": metrics[f"judge_ties_vs_{who}"],
            "judge reward, candidate": metrics["judge_reward_candidate"],
            "judge reward, other": metrics[f"judge_reward_{who}"],
        }
        for who in opponents
        if f"win_rate_vs_{who}" in metrics
    ]


@dataclass(frozen=True)
class _Names:
    """The models an evaluation compares, by reference (the judge and the champion resolved)."""

    candidate: str
    reference: str
    judge: str | None = None
    champion: str | None = None

    def models(self) -> list[str]:
        """Who answers the prompts: the candidate, the reference and, when there is one, the champion."""
        return ["candidate", "reference"] + (["champion"] if self.champion else [])


def _win_rate_section(
    metrics: Mapping[str, float], rows: Sequence[Mapping[str, Any]], names: _Names
) -> list[tuple[str, str]]:
    if names.judge is not None:
        return [("Win rates under the judge", _judge_section(metrics, rows, names.judge, names.models()[1:]))]
    if names.champion:
        return [
            (
                "Win rates",
                "<p class='bad'>No judge reward model was given, so the candidate could not be compared with "
                "the champion or the reference by reward.</p>",
            )
        ]
    return []


def _frontier_section(points: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    if not points:
        return ("Reward vs KL over training", "<p><em>No training snapshots were given.</em></p>")
    return ("Reward vs KL over training", frontier_chart(points) + reports.table(frontier_rows(points)))


def _diversity_charts(metrics: Mapping[str, float], models: Sequence[str]) -> str:
    distinct = {
        f"{name} {who}": metrics[f"{name.replace('-', '_')}_{who}"]
        for name in ("distinct-1", "distinct-2")
        for who in models
    }
    lengths = {who: metrics[f"mean_length_{who}"] for who in models}
    charts = reports.bar_chart(distinct, "Distinct n-grams (higher = more diverse)", "unique / total")
    return charts + reports.bar_chart(lengths, "Mean response length", "tokens")


def _report(
    metrics: Mapping[str, float],
    rows: Sequence[Mapping[str, Any]],
    points: Sequence[Mapping[str, Any]],
    names: _Names,
    config: EvalConfig,
) -> str:
    models = names.models()
    charts = _diversity_charts(metrics, models)
    columns = ["prompt", *models]
    if names.judge is not None:
        columns += [f"{who}_reward" for who in models]
    sections = [
        *_win_rate_section(metrics, rows, names),
        _frontier_section(points),
        ("Metrics", reports.key_values(dict(metrics))),
        ("Diversity and length", charts),
        ("How the metrics are computed", _METHODS),
        ("Settings", reports.key_values(asdict(config))),
        ("Generations (same prompts, same seed)", reports.table(rows, columns)),
    ]
    intro = f"Candidate {names.candidate} compared with reference {names.reference}" + (
        f" and champion {names.champion}." if names.champion else "."
    )
    return reports.page("preftune evaluation", sections, intro=intro)


def _judge_section(
    metrics: Mapping[str, float], rows: Sequence[Mapping[str, Any]], judge: str, opponents: Sequence[str]
) -> str:
    n = len(rows)
    text = (
        f"<p>Judge <code>{reports.escape(judge)}</code> scored every model's response to each of {n} prompts "
        "(ties count half).</p>"
    )
    charts = ""
    for who in opponents:
        wins = sum(r["candidate_reward"] > r[f"{who}_reward"] for r in rows)
        ties = int(metrics[f"judge_ties_vs_{who}"])
        outcome = {"candidate wins": wins / n, "ties": ties / n, f"{who} wins": (n - wins - ties) / n}
        charts += reports.bar_chart(outcome, f"Per-prompt outcome against the {who}", "share of prompts")
    means = {who: metrics[f"judge_reward_{who}"] for who in ("candidate", *opponents)}
    charts += reports.bar_chart(means, "Mean judge reward", "reward")
    return text + reports.table(_win_rate_rows(metrics, opponents)) + charts


# ------------------------------------------------------------------------------------------------------ driver


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(ref: str, config: EvalConfig) -> Any:
    """A causal LM on this machine's device, in eval mode, its weights in the compute dtype of the precision."""
    dtype = resolve_precision(config.precision).compute_dtype
    model = load_causal_lm(ref, dtype=dtype, attn_implementation=config.attn_implementation)
    return model.to(_device()).eval()


def _read_prompts(path: str, limit: int) -> list[Messages]:
    return [_prompt_messages(row, "eval prompts") for row in _read_rows(path, "eval prompts")[:limit]]


def _read_pairs(path: str) -> list[tuple[Messages, str, str]]:
    return [
        (_prompt_messages(row, "eval pairs"), _answer(row, "chosen"), _answer(row, "rejected"))
        for row in _read_rows(path, "eval pairs")
    ]


@dataclass
class _Inputs:
    """What the models are evaluated on: read and checked before any model is loaded, so bad input fails fast."""

    prompts: list[Messages]
    pairs: list[tuple[Messages, str, str]] | None
    snapshots: list[dict[str, Any]]


def _read_inputs(eval_prompts: str, eval_pairs: str | None, checkpoints: str | None, limit: int) -> _Inputs:
    prompts = _read_prompts(eval_prompts, limit)
    pairs = _read_pairs(eval_pairs) if eval_pairs else None
    return _Inputs(prompts, pairs, read_index(checkpoints) if checkpoints else [])


def _resolve_names(candidate: str, reference: str, judge: str | None, champion: str | None) -> _Names:
    """A missing judge, or one that is no reward model, fails now rather than after generating."""
    if judge is not None:
        judge = resolve(judge)
        check_reward_model(judge)
    if champion:
        champion = resolve(champion)
    return _Names(candidate, reference, judge, champion)


@dataclass
class _Session:
    """What every generation and measurement of one evaluation shares: the candidate and the reference (on one
    device, with their one tokenizer), the prompts rendered for them, and the display sampling settings."""

    cand_model: Any
    ref_model: Any
    tokenizer: Any
    prompts: list[Messages]
    rendered: list[str]
    sampling: dict[str, Any]
    config: EvalConfig

    def generate(self, model: Any, desc: str, sampling: Mapping[str, Any] | None = None) -> Generations:
        """A model's responses to the prompts (with the display settings unless ``sampling`` is given)."""
        settings = self.sampling if sampling is None else sampling
        return generate_responses(model, self.tokenizer, self.rendered, desc=desc, **settings)


def _open_session(names: _Names, prompts: list[Messages], config: EvalConfig) -> _Session:
    """Load both models after checking that they share a tokenizer with a chat template."""
    tokenizer = load_tokenizer(names.candidate)
    if tokenizer.get_vocab() != load_tokenizer(names.reference).get_vocab():
        raise ValueError(
            f"candidate {names.candidate} and reference {names.reference} use different tokenizers: "
            "KL and implicit rewards compare token probabilities, so they must share one"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {names.candidate} has no chat template: prompts could not be rendered"
        )
    cand_model = _load_model(names.candidate, config)
    ref_model = _load_model(names.reference, config)
    sampling = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "eos_ids": eos_ids_of(tokenizer, cand_model, ref_model),
    }
    rendered = [render_prompt(tokenizer, messages) for messages in prompts]
    return _Session(cand_model, ref_model, tokenizer, prompts, rendered, sampling, config)


def _champion_responses(
    champion: str, prompts: Sequence[Messages], sampling: Mapping[str, Any], config: EvalConfig
) -> Generations:
    """The champion's answers under the same sampling settings, with its own tokenizer and chat template."""
    tokenizer = load_tokenizer(champion)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of champion {champion} has no chat template")
    model = _load_model(champion, config)
    rendered = [render_prompt(tokenizer, messages) for messages in prompts]
    settings = {k: v for k, v in sampling.items() if k != "eos_ids"}
    generations = generate_responses(model, tokenizer, rendered, desc="generate: champion", **settings)
    del model
    return generations


@dataclass
class _Responses:
    """Each model's displayed responses, and the temperature-1 candidate samples the KL is estimated on."""

    candidate: Generations
    reference: Generations
    champion: Generations | None
    kl_samples: Generations

    def texts(self) -> dict[str, list[str]]:
        texts = {"candidate": self.candidate.texts, "reference": self.reference.texts}
        if self.champion is not None:
            texts["champion"] = self.champion.texts
        return texts


def _generate(session: _Session, champion: str | None, config: EvalConfig) -> _Responses:
    """Every model answers the same prompts with the same settings and seed."""
    candidate = session.generate(session.cand_model, "generate: candidate")
    reference = session.generate(session.ref_model, "generate: reference")
    champ = _champion_responses(champion, session.prompts, session.sampling, config) if champion else None
    if config.temperature == 1.0 and config.top_p == 1.0:
        kl_samples = candidate  # the display samples already come from the raw distribution
    else:
        raw = raw_sampling(session.sampling)
        kl_samples = session.generate(session.cand_model, "kl: sample candidate", raw)
    return _Responses(candidate, reference, champ, kl_samples)


def _diversity(texts: Sequence[str], lengths: Sequence[int], who: str) -> dict[str, float]:
    return {
        f"distinct_1_{who}": distinct_n(texts, 1),
        f"distinct_2_{who}": distinct_n(texts, 2),
        f"mean_length_{who}": sum(lengths) / len(lengths),
    }


def _drift_and_diversity(session: _Session, responses: _Responses, batch_size: int) -> dict[str, float]:
    """KL of the candidate to the reference, and each model's distinct-n and response length."""
    kl, kl_token = estimate_kl(
        session.cand_model,
        session.ref_model,
        responses.kl_samples,
        batch_size=batch_size,
        pad_id=templating.pad_id(session.tokenizer),
    )
    metrics: dict[str, float] = {
        "num_prompts": float(len(session.prompts)),
        "kl_candidate_reference": float(kl),
        "kl_candidate_reference_per_token": float(kl_token),
        **_diversity(responses.candidate.texts, responses.candidate.lengths, "candidate"),
        **_diversity(responses.reference.texts, responses.reference.lengths, "reference"),
    }
    if responses.champion is not None:
        metrics.update(_diversity(responses.champion.texts, responses.champion.lengths, "champion"))
    if metrics["distinct_2_reference"] > 0:
        metrics["diversity_ratio_vs_reference"] = (
            metrics["distinct_2_candidate"] / metrics["distinct_2_reference"]
        )
    return metrics


def _generation_rows(prompts: Sequence[Messages], texts: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """One row per prompt: the prompt as a person reads it and each model's response."""
    return [
        {"prompt": _prompt_text(m), **{who: texts[who][i] for who in texts}} for i, m in enumerate(prompts)
    ]


def _judge_responses(
    judge: Judge, prompts: Sequence[Messages], texts: Mapping[str, list[str]], rows: list[dict[str, Any]]
) -> dict[str, float]:
    """The judge's verdict on the candidate against every other model; each row gets each model's reward."""
    rewards = {who: judge.score(prompts, texts[who]) for who in texts}
    lengths = {who: [words(t) for t in texts[who]] for who in texts}
    metrics: dict[str, float] = {}
    for who in texts:
        if who != "candidate":
            metrics.update(
                judge_metrics(
                    rewards["candidate"], rewards[who], lengths["candidate"], lengths[who], name=who
                )
            )
    for i, row in enumerate(rows):
        for who in texts:
            row[f"{who}_reward"] = rewards[who][i]
    return metrics


@dataclass
class _Scorers:
    """What scores the candidate beyond drift and diversity (each set once the evaluation gets to it): a judge's
    reward, and the held-out implicit-reward accuracy; on the frontier's y axis, the judge wins."""

    judge: Judge | None
    pairs: PairScorer | None


def _final_step(candidate: str, snapshots: Sequence[Mapping[str, Any]]) -> float:
    """The candidate's training step count from its lineage, else one past the last snapshot."""
    trained = read_lineage(candidate).get("metrics", {})
    final_step = trained.get("steps") or trained.get("iterations")
    if not isinstance(final_step, (int, float)):
        final_step = max((s["step"] for s in snapshots), default=0) + 1
    return final_step


def _frontier_points(
    session: _Session,
    scorers: _Scorers,
    snapshots: Sequence[Mapping[str, Any]],
    candidate: str,
    kl_samples: Generations,
    metrics: Mapping[str, float],
) -> list[dict[str, Any]]:
    """Reference, each snapshot, then the final candidate, on the same prompts and seed."""
    if scorers.judge is None and scorers.pairs is None:
        return []
    probe = FrontierProbe(
        session.ref_model,
        session.tokenizer,
        session.prompts,
        session.rendered,
        session.sampling,
        judge=scorers.judge,
        # with a judge the chart plots reward, so the snapshots' implicit-reward accuracy is not worth a pass
        pairs=scorers.pairs if scorers.judge is None else None,
    )
    points = []
    if (
        scorers.judge is not None
    ):  # the reference's implicit rewards are 0 by definition: only a judge can place it
        points.append(probe.point(session.ref_model, label="reference", step=0, is_reference=True))
    for snap in snapshots:
        model = _load_model(snap["path"], session.config)
        points.append(probe.point(model, label=f"step {snap['step']}", step=snap["step"]))
        del model
    known = {
        "kl": metrics["kl_candidate_reference"],
        "kl_per_token": metrics["kl_candidate_reference_per_token"],
        **{k: metrics[k] for k in ("implicit_reward_accuracy",) if k in metrics},
    }
    step = _final_step(candidate, snapshots)
    points.append(probe.point(session.cand_model, label="final", step=step, samples=kl_samples, known=known))
    return points


def evaluate(
    candidate: str,
    reference: str,
    eval_prompts: str,
    eval_pairs: str | None,
    generations_path: str,
    report_path: str,
    config: EvalConfig,
    *,
    judge: str | None = None,
    champion: str | None = None,
    checkpoints: str | None = None,
    frontier_path: str | None = None,
) -> dict[str, float]:
    """Compare a candidate model with its reference (and the champion); write generations and an HTML report.

    Args:
        candidate: Model reference of the tuned policy (directory, s3:// URI or hub id; adapters are merged).
        reference: Model reference it is compared with (the SFT model for DPO and PPO).
        eval_prompts: JSONL file or directory of held-out rows with a ``prompt`` (text or chat messages).
        eval_pairs: Optional JSONL of held-out preference pairs (``prompt``, ``chosen``, ``rejected``).
        generations_path: Where to write ``{"prompt", "candidate", "reference"}`` rows, one per prompt (with a
            champion also ``champion``; with a judge each model's ``<model>_reward``).
        report_path: Where to write the HTML report.
        config: Sampling and scoring settings.
        judge: Optional reward model reference (a reward-model artifact, e.g. from the reward_model step): scores
            every model's responses; adds the ``judge_*``, ``win_rate_vs_*`` and ``lc_win_rate_vs_*`` metrics.
        champion: Optional model reference of the current champion (the registry's): it answers the same
            prompts with the same settings; with a judge, ``win_rate_vs_champion`` and
            ``lc_win_rate_vs_champion`` compare the candidate with it.
        checkpoints: Optional snapshot directory of the training step (preftune.train.snapshots): each snapshot
            becomes a point of the reward-vs-KL chart.
        frontier_path: Where to write the reward-vs-KL points as JSONL (``label``, ``step``, ``kl``, ``reward``
            or ``implicit_reward_accuracy``, ...), for comparisons across runs and methods.

    Returns:
        Flat metrics: see the module docstring for each name's definition.
    """
    inputs = _read_inputs(eval_prompts, eval_pairs, checkpoints, config.max_prompts)
    names = _resolve_names(candidate, reference, judge, champion)
    session = _open_session(names, inputs.prompts, config)
    responses = _generate(session, names.champion, config)
    metrics = _drift_and_diversity(session, responses, config.batch_size)
    scorers = _Scorers(judge=None, pairs=None)
    if inputs.pairs:
        scorers.pairs = PairScorer(
            session.ref_model,
            session.tokenizer,
            inputs.pairs,
            beta=config.beta,
            batch_size=config.batch_size,
            max_length=config.max_length,
        )
        metrics.update(scorers.pairs.score(session.cand_model))
    texts = responses.texts()
    rows = _generation_rows(inputs.prompts, texts)
    if names.judge is not None:
        scorers.judge = Judge(
            names.judge,
            batch_size=config.batch_size,
            device=_device(),
            max_length=config.max_length,
            dtype=resolve_precision(config.precision).compute_dtype,
            attn_implementation=config.attn_implementation,
        )
        metrics.update(_judge_responses(scorers.judge, inputs.prompts, texts, rows))
    points = _frontier_points(session, scorers, inputs.snapshots, candidate, responses.kl_samples, metrics)
    metrics["frontier_points"] = float(len(points))
    write_jsonl(generations_path, rows)
    if frontier_path:
        write_jsonl(frontier_path, points)
    reports.write(report_path, _report(metrics, rows, points, names, config))
    log.info("evaluation: %s", json.dumps(metrics))
    return metrics
