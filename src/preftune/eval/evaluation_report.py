"""The evaluate step's HTML report: which policy was chosen and why, win rates, the reward-vs-KL frontier, the
metrics, diversity charts, how each number is computed, and the generations side by side.

Every reward on the page is a judge's reward of responses sampled at the evaluation's display settings (named
next to each table and chart), so the reference's reward is one number wherever it appears; the KL is always
estimated on temperature-1 samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from preftune.config.evaluate import EvalConfig
from preftune.eval.frontier import frontier_chart, frontier_rows
from preftune.report import html as reports

METHODS = """<ul>
<li><b>kl_candidate_reference</b>: KL(candidate || reference) per response, the mean over candidate samples of the
sum over sampled tokens (eos included) of log p_cand - log p_ref, both under the models' raw distributions
(temperature 1, no truncation). The samples for this estimate are drawn at temperature 1 and top-p 1, so it is
unbiased; it can be slightly negative when the models are nearly identical.
<b>kl_candidate_reference_per_token</b> divides the same total by the number of sampled tokens.</li>
<li><b>distinct_1 / distinct_2</b>: unique / total word n-grams (whitespace split) over all responses of one model;
<b>diversity_ratio_vs_reference</b> = distinct_2 of the candidate / distinct_2 of the reference.</li>
<li><b>mean_length</b>: generated model tokens per response, eos not counted.</li>
<li><b>implicit_reward_*</b> (held-out pairs; DPO-family policies only): reward = beta * (log pi_cand - log
pi_ref) of a response given its prompt; accuracy = share of pairs where the chosen reward is strictly higher;
margin = mean chosen - rejected.</li>
<li><b>chosen_perplexity_*</b>: exp(mean NLL per token) of the chosen responses (completion tokens and eos).</li>
<li><b>judge_*</b> (with a judge reward model): mean reward of each model's displayed responses;
<b>win_rate_vs_X</b> = share of prompts where the candidate's reward beats model X's (the reference, the
champion), a tie counting half; <b>lc_win_rate_vs_X</b> = the length-controlled win rate: a logistic model of
the per-prompt outcome on the difference in response length (words), read at equal length, so an answer does not
win by being longer; <b>length_coefficient_vs_X</b> = how strongly length moved the outcome (per standard deviation
of the length difference; positive = longer wins); <b>judge_ties_vs_X</b> = prompts with equal rewards (identical
responses always tie).</li>
<li><b>heldout_*</b> (with a held-out judge: a reward model trained on preferences the training reward model never
saw): the same for that judge. <b>judge_reward_gain</b> and <b>heldout_reward_gain</b> = each judge's (mean
candidate reward - mean reference reward) / the standard deviation of all their rewards; the gate's
<b>judge_confirmation</b> = heldout_reward_gain / judge_reward_gain (the reward-hacking guard).</li>
<li><b>Reward vs KL</b>: each training snapshot, the final policy and the reference, each measured exactly as the
candidate is (its displayed responses for reward and diversity, temperature-1 samples for KL): the frontier view
of the DPO paper. The y axis is the held-out judge's reward, else the judge's, else (no judge) the held-out
implicit-reward accuracy.</li>
<li><b>Model selection</b>: the candidate is the best of those points (by the frontier's y value) that pass the
gate's checks on KL, diversity and held-out confirmation; the final policy when none does.</li>
</ul>"""


@dataclass(frozen=True)
class Names:
    """The models an evaluation compares, by reference (the judges and the champion resolved)."""

    candidate: str
    reference: str
    judge: str | None = None
    heldout_judge: str | None = None
    champion: str | None = None

    def models(self) -> list[str]:
        """Who answers the prompts: the candidate, the reference and, when there is one, the champion."""
        return ["candidate", "reference"] + (["champion"] if self.champion else [])


@dataclass
class Page:
    """What the report shows: the metrics, one row per prompt, the frontier points, why the candidate was
    chosen, the models, the settings."""

    metrics: Mapping[str, float]
    rows: Sequence[Mapping[str, Any]]
    points: Sequence[Mapping[str, Any]]
    reason: str
    names: Names
    config: EvalConfig


def sampling_note(config: EvalConfig) -> str:
    return (
        f"responses sampled at temperature {config.temperature:g}, top-p {config.top_p:g}, seed {config.seed} "
        f"(the same for every model), at most {config.max_new_tokens} new tokens"
    )


def _win_rate_rows(
    metrics: Mapping[str, float], opponents: Sequence[str], prefix: str
) -> list[dict[str, Any]]:
    reward = "judge_reward" if prefix == "" else "heldout_reward"
    return [
        {
            "against": who,
            "win rate": metrics[f"{prefix}win_rate_vs_{who}"],
            "length-controlled win rate": metrics.get(f"{prefix}lc_win_rate_vs_{who}"),
            "ties": metrics[f"{prefix}judge_ties_vs_{who}"],
            "reward, candidate": metrics[f"{reward}_candidate"],
            "reward, other": metrics[f"{reward}_{who}"],
        }
        for who in opponents
        if f"{prefix}win_rate_vs_{who}" in metrics
    ]


def _judge_section(page: Page) -> str:
    metrics, rows, names = page.metrics, page.rows, page.names
    n, opponents = len(rows), names.models()[1:]
    text = (
        f"<p>Judge <code>{reports.escape(names.judge or '')}</code> scored every model's response to each of {n} "
        f"prompts ({sampling_note(page.config)}; ties count half).</p>"
    )
    charts = ""
    for who in opponents:
        wins = sum(r["candidate_reward"] > r[f"{who}_reward"] for r in rows)
        ties = int(metrics[f"judge_ties_vs_{who}"])
        outcome = {"candidate wins": wins / n, "ties": ties / n, f"{who} wins": (n - wins - ties) / n}
        charts += reports.bar_chart(outcome, f"Per-prompt outcome against the {who}", "share of prompts")
    means = {who: metrics[f"judge_reward_{who}"] for who in ("candidate", *opponents)}
    charts += reports.bar_chart(means, "Mean judge reward", "reward")
    held = _win_rate_rows(metrics, ["reference"], "heldout_")
    if held:
        text += (
            f"<p>Held-out judge <code>{reports.escape(names.heldout_judge or '')}</code> (trained on preferences the "
            "training reward model never saw) on the same responses:</p>" + reports.table(held)
        )
    return reports.table(_win_rate_rows(metrics, opponents, "")) + text + charts


def _win_rate_section(page: Page) -> list[tuple[str, str]]:
    if page.names.judge is not None:
        return [("Win rates under the judge", _judge_section(page))]
    if page.names.champion:
        return [
            (
                "Win rates",
                "<p class='bad'>No judge reward model was given, so the candidate could not be compared with "
                "the champion or the reference by reward.</p>",
            )
        ]
    return []


def _selection_section(page: Page) -> tuple[str, str]:
    intro = f"<p>{reports.escape(page.reason)}</p>"
    return ("Model selection", intro)


def _frontier_section(page: Page) -> tuple[str, str]:
    title = "Reward vs KL over training"
    if len(page.points) < 2:
        return (title, "<p><em>No training snapshots were given.</em></p>")
    note = (
        f"<p>Rewards and diversity: {sampling_note(page.config)}. KL: temperature-1 samples. Every point was "
        "checked against the gate's bounds (<code>in_bounds</code>, and <code>why_not</code> when it failed).</p>"
    )
    sampling = {"temperature": page.config.temperature, "top_p": page.config.top_p}
    return (title, note + frontier_chart(page.points, sampling) + reports.table(frontier_rows(page.points)))


def _diversity_charts(metrics: Mapping[str, float], models: Sequence[str]) -> str:
    distinct = {
        f"{name} {who}": metrics[f"{name.replace('-', '_')}_{who}"]
        for name in ("distinct-1", "distinct-2")
        for who in models
    }
    lengths = {who: metrics[f"mean_length_{who}"] for who in models}
    charts = reports.bar_chart(distinct, "Distinct n-grams (higher = more diverse)", "unique / total")
    return charts + reports.bar_chart(lengths, "Mean response length", "tokens")


def render(page: Page) -> str:
    """The whole report page."""
    names, models = page.names, page.names.models()
    columns = ["prompt", *models]
    if names.judge is not None:
        columns += [f"{who}_reward" for who in models]
    if names.heldout_judge is not None:
        columns += [f"{who}_heldout_reward" for who in models[:2]]
    sections = [
        *_win_rate_section(page),
        _frontier_section(page),
        _selection_section(page),
        ("Metrics", reports.key_values(dict(page.metrics))),
        ("Diversity and length", _diversity_charts(page.metrics, models)),
        ("How the metrics are computed", METHODS),
        ("Settings", reports.key_values(asdict(page.config))),
        (f"Generations ({sampling_note(page.config)})", reports.table(page.rows, columns)),
    ]
    intro = f"Candidate {names.candidate} compared with reference {names.reference}" + (
        f" and champion {names.champion}. " if names.champion else ". "
    )
    return reports.page("preftune evaluation", sections, intro=intro + page.reason)
