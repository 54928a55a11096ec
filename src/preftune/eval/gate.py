"""The promotion gate: a candidate becomes champion only when it beats the champion, stayed near its reference
and kept its output diversity.

Each check reads one metric of the evaluate step:

- ``win_rate_vs_champion`` >= ``min_win_rate_vs_champion`` -- the judge prefers the candidate over the current
  champion (or ``lc_win_rate_vs_champion``, the length-controlled win rate, with ``length_controlled``, so a
  candidate does not win by answering longer). Before the first promotion there is no champion and the check
  passes ("no champion yet");
- ``kl_candidate_reference`` <= ``max_kl`` -- KL(candidate || reference) per response, in nats: alignment must not
  drift far from the SFT model (reward hacking, degenerate text);
- ``distinct_2_candidate / distinct_2_reference`` >= ``min_diversity_ratio`` -- the candidate's share of unique
  bigrams relative to the reference's: a collapse of diversity is blocked even when the judge likes the outputs;
- ``heldout_reward_gain / judge_reward_gain`` >= ``min_judge_confirmation`` -- the reward-hacking guard. With a
  held-out judge (a reward model trained on preferences the training reward model never saw, or one the user
  gives) the evaluation reports each judge's gain of the candidate over the reference in its own standard
  deviations. A policy optimised against the training reward model can learn its blind spots: its gain there
  rises while an independent judge stays flat. The check refuses a candidate whose training-judge gain the
  held-out judge does not confirm. It applies only when both gains are reported and the training judge's is at
  least ``MATERIAL_GAIN`` (a smaller gain is nothing to confirm).

A required metric that is missing or not a finite number fails its check with the reason, so a broken evaluation
never promotes. A negative threshold turns its check off (reported as "disabled"), for pipelines without a
judge, for example.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

WIN_RATE = "win_rate_vs_champion"
LC_WIN_RATE = "lc_win_rate_vs_champion"
KL = "kl_candidate_reference"
DISTINCT_CANDIDATE = "distinct_2_candidate"
DISTINCT_REFERENCE = "distinct_2_reference"
NO_CHAMPION = "no champion yet"
JUDGE_GAIN = "judge_reward_gain"
HELDOUT_GAIN = "heldout_reward_gain"
#: The training judge's standardised gain below which there is nothing for the held-out judge to confirm.
MATERIAL_GAIN = 0.1


def _number(metrics: Mapping[str, Any], name: str) -> tuple[float | None, str | None]:
    """The metric as a finite float, or (None, why not)."""
    if name not in metrics or metrics[name] is None:
        return None, f"missing metric {name}"
    value = metrics[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None, f"metric {name} is not a number: {metrics[name]!r}"
    if not math.isfinite(float(value)):
        return None, f"metric {name} is not finite: {value}"
    return float(value), None


def _check(name: str, value: float | None, threshold: float, passed: bool, reason: str) -> dict[str, Any]:
    return {"name": name, "value": value, "threshold": threshold, "passed": passed, "reason": reason}


def _win_rate(
    metrics: Mapping[str, Any], threshold: float, has_champion: bool | None, name: str = WIN_RATE
) -> dict[str, Any]:
    if threshold < 0:
        return _check(name, None, threshold, True, f"{name}: disabled")
    if name not in metrics and not has_champion:
        return _check(name, None, threshold, True, f"{name}: {NO_CHAMPION}")
    value, problem = _number(metrics, name)
    if value is None:
        why = (
            " (a champion exists, so the evaluation must compare with it: give it a judge)"
            if has_champion
            else ""
        )
        return _check(name, None, threshold, False, f"{name}: {problem}{why}")
    passed = value >= threshold
    return _check(
        name,
        value,
        threshold,
        passed,
        f"{name} {value:.4g} {'>=' if passed else '<'} {threshold:.4g}",
    )


def _kl(metrics: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    if threshold < 0:
        return _check(KL, None, threshold, True, f"{KL}: disabled")
    value, problem = _number(metrics, KL)
    if value is None:
        return _check(KL, None, threshold, False, f"{KL}: {problem}")
    passed = value <= threshold
    return _check(KL, value, threshold, passed, f"{KL} {value:.4g} {'<=' if passed else '>'} {threshold:.4g}")


def _diversity(metrics: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    name = "diversity_ratio"
    if threshold < 0:
        return _check(name, None, threshold, True, f"{name}: disabled")
    candidate, problem = _number(metrics, DISTINCT_CANDIDATE)
    reference, problem_ref = _number(metrics, DISTINCT_REFERENCE)
    if candidate is None or reference is None:
        return _check(name, None, threshold, False, f"{name}: {problem or problem_ref}")
    if reference <= 0:
        # the reference repeats itself completely: no ratio, and the candidate cannot be less diverse
        return _check(name, None, threshold, True, f"{name}: reference has no distinct bigrams, not compared")
    ratio = candidate / reference
    passed = ratio >= threshold
    return _check(
        name,
        ratio,
        threshold,
        passed,
        f"{name} {ratio:.4g} ({DISTINCT_CANDIDATE} {candidate:.4g} / {DISTINCT_REFERENCE} {reference:.4g}) "
        f"{'>=' if passed else '<'} {threshold:.4g}",
    )


def _confirmation(metrics: Mapping[str, Any], threshold: float) -> dict[str, Any]:
    name = "judge_confirmation"
    if threshold < 0:
        return _check(name, None, threshold, True, f"{name}: disabled")
    if HELDOUT_GAIN not in metrics or JUDGE_GAIN not in metrics:
        return _check(name, None, threshold, True, f"{name}: no held-out judge, not checked")
    gain, problem = _number(metrics, JUDGE_GAIN)
    heldout, problem_heldout = _number(metrics, HELDOUT_GAIN)
    if gain is None or heldout is None:
        return _check(name, None, threshold, False, f"{name}: {problem or problem_heldout}")
    if gain < MATERIAL_GAIN:
        return _check(
            name, None, threshold, True, f"{name}: the judge's gain {gain:.3g} sd is nothing to confirm"
        )
    ratio = heldout / gain
    passed = ratio >= threshold
    return _check(
        name,
        ratio,
        threshold,
        passed,
        f"{name} {ratio:.4g} (held-out judge gain {heldout:.3g} sd / judge gain {gain:.3g} sd) "
        f"{'>=' if passed else '<'} {threshold:.4g}" + ("" if passed else ": possible reward hacking"),
    )


def decide(
    metrics: Mapping[str, Any],
    *,
    min_win_rate_vs_champion: float,
    max_kl: float,
    min_diversity_ratio: float,
    min_judge_confirmation: float = -1.0,
    has_champion: bool | None = None,
    length_controlled: bool = True,
) -> dict[str, Any]:
    """The gate's decision: ``{"promote", "reasons", "checks": [{name, value, threshold, passed, reason}]}``.

    ``has_champion``: True makes the win rate against the champion required (a champion exists, so the
    evaluation must have compared with it); None or False let its absence mean "no champion yet".
    ``min_judge_confirmation`` defaults to off for callers that check drift and diversity only.
    ``length_controlled`` checks ``lc_win_rate_vs_champion`` instead of the raw ``win_rate_vs_champion``.
    """
    checks = [
        _win_rate(
            metrics,
            float(min_win_rate_vs_champion),
            has_champion,
            LC_WIN_RATE if length_controlled else WIN_RATE,
        ),
        _kl(metrics, float(max_kl)),
        _diversity(metrics, float(min_diversity_ratio)),
        _confirmation(metrics, float(min_judge_confirmation)),
    ]
    return {
        "promote": all(c["passed"] for c in checks),
        "reasons": [c["reason"] for c in checks],
        "checks": checks,
    }


def render_report(decision: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """The gate's HTML report: the verdict, each check against its threshold, and every metric it saw."""
    from preftune.report import html as reports

    verdict = "PROMOTE" if decision["promote"] else "DO NOT PROMOTE"
    rows = [{k: c[k] for k in ("name", "value", "threshold", "passed", "reason")} for c in decision["checks"]]
    return reports.page(
        f"Promotion gate: {verdict}",
        [
            ("Checks", reports.table(rows)),
            ("Evaluation metrics", reports.key_values(dict(sorted(metrics.items())))),
        ],
        intro=f"{candidate_sentence(metrics)} It is promoted only when every check passes.",
    )


def candidate_sentence(metrics: Mapping[str, Any]) -> str:
    """Which policy of the run the evaluation handed to the gate (preftune.eval.selection), in words."""
    if "selected_step" not in metrics:
        return "The candidate is the training step's final policy."
    considered = int(metrics.get("selection_points", 0))
    inside = int(metrics.get("selection_in_bounds", 0))
    which = (
        "the final policy"
        if metrics.get("selected_final")
        else f"the training snapshot of step {int(metrics['selected_step'])}"
    )
    return (
        f"The candidate is {which}: the evaluation chose it from {considered} policies of the run "
        f"({inside} inside the bounds on KL and diversity) by its held-out score; its report says why."
    )


def run_gate(
    metrics: Mapping[str, Any],
    report_path: str,
    *,
    min_win_rate_vs_champion: float,
    max_kl: float,
    min_diversity_ratio: float,
    min_judge_confirmation: float = -1.0,
    champion_uri: str = "",
    length_controlled: bool = False,
) -> dict[str, Any]:
    """Decide, write the HTML report, and return the decision with the metrics it was taken on (which the
    promote step records in the registry). A non-empty ``champion_uri`` makes the champion comparison required."""
    from preftune.report import html as reports

    decision = decide(
        metrics,
        min_win_rate_vs_champion=min_win_rate_vs_champion,
        max_kl=max_kl,
        min_diversity_ratio=min_diversity_ratio,
        min_judge_confirmation=min_judge_confirmation,
        has_champion=True if champion_uri else None,
        length_controlled=length_controlled,
    )
    decision["champion_uri"] = champion_uri
    decision["metrics"] = {k: v for k, v in metrics.items()}
    reports.write(report_path, render_report(decision, metrics))
    return decision
