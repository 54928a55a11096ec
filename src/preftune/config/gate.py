"""Settings of the promotion gate; the fields are preftune.eval.gate.decide's thresholds."""

from __future__ import annotations

from dataclasses import dataclass

from preftune.config import shared
from preftune.config.fields import check, param


@dataclass
class GateConfig:
    """The thresholds a candidate must pass to be promoted; a negative threshold turns its check off."""

    min_win_rate_vs_champion: float = param(
        0.5,
        "Lowest acceptable share of prompts where the judge prefers the candidate over the champion (ties count "
        "half); negative = do not check.",
        high=1,
    )
    max_kl: float = shared.max_kl()
    min_diversity_ratio: float = shared.min_diversity_ratio()
    min_judge_confirmation: float = shared.min_judge_confirmation()
    length_controlled: bool = param(
        True,
        "Check the length-controlled win rate against the champion (lc_win_rate_vs_champion), so a candidate "
        "cannot win by answering longer; false checks the raw win rate.",
    )


def validate(config: GateConfig) -> None:
    """Refuse thresholds that are not finite numbers (a NaN threshold would block every candidate)."""
    check(config)
