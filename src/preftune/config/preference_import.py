"""Settings of the preference import; the fields are preftune.data.preferences.import_preferences's keyword
arguments."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from preftune.config.fields import param, refuse
from preftune.config.ingest import check_lengths, eval_fraction, expectation_suite_uri, max_chars, min_chars

#: Every feedback format the import reads (data.formats.FORMATS), and auto.
FORMAT_CHOICES = ("auto", "pairwise", "ranked", "rating", "binary", "labelstudio")
#: How ranked lists become pairs (data.pairing.RANKED_MODES).
RANKED_PAIRS_CHOICES = ("all", "adjacent")


@dataclass
class PreferenceImportConfig:
    """How collected feedback becomes validated pairs."""

    format: str = param(
        "auto",
        "Feedback format: auto (recognised per file), pairwise, ranked, rating, binary or labelstudio.",
        choices=FORMAT_CHOICES,
    )
    ranked_pairs: str = param(
        "all",
        "Ranked lists: all (every better response over every worse one) or adjacent (consecutive rank levels "
        "only).",
        choices=RANKED_PAIRS_CHOICES,
    )
    min_score_gap: float = param(
        0.5, "Ratings: smallest difference of normalised (z-score) ratings that makes a pair.", low=0
    )
    max_pairs_per_prompt: int = param(
        16,
        "Most pairs made per prompt from ranked lists, ratings and binary feedback (0 = no cap), chosen by seed.",
        low=0,
    )
    since: str = param(
        "",
        "Only read date=YYYY-MM-DD partitions on or after this day; empty reads everything.",
        accepts="empty, or a date as YYYY-MM-DD",
    )
    max_rejected_fraction: float = param(
        0.5,
        "Fail the step, after writing its outputs, when a larger share of input rows is rejected (rows that made "
        "no pair but went to the unpaired set for KTO do not count).",
        low=0,
        high=1,
    )
    truncation_chars: int = param(
        4096,
        "Report the share of pairs whose prompt plus answer exceed this many characters (0 = off).",
        low=0,
    )
    eval_fraction: float = eval_fraction("prompts")
    seed: int = param(0, "Seed of the train/eval split and of pair capping.", low=0)
    min_chars: int = min_chars("prompt or response")
    max_chars: int = max_chars("prompt or response")
    expectation_suite_uri: str = expectation_suite_uri()


def validate(config: PreferenceImportConfig) -> None:
    """Refuse settings the import would refuse, before any data is read."""
    check_lengths(config)
    text = config.since.strip()
    try:
        if text and not (re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) and date.fromisoformat(text)):
            raise ValueError
    except ValueError:
        raise refuse(
            config,
            "since",
            f"since must be a date as YYYY-MM-DD (or empty for all data), got {config.since!r}",
        ) from None
