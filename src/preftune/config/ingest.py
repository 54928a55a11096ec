"""Settings of the ingest step; the fields are preftune.data.ingest.ingest's keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from preftune.config.fields import check, param, refuse


def eval_fraction(unit: str) -> Any:
    return param(0.1, f"Share of {unit} held out for evaluation.", low=0, high=1, high_inclusive=False)


def min_chars(unit: str) -> Any:
    return param(1, f"Shortest accepted {unit}, in characters.", low=0)


def max_chars(unit: str) -> Any:
    return param(8000, f"Longest accepted {unit}, in characters.", low=1)


def expectation_suite_uri() -> Any:
    return param(
        "",
        "Expectation suites to validate with (the expectation_suite output of an earlier run, edited); empty "
        "runs the default suites.",
        accepts="empty, or a local path or s3:// URI of a suite document",
    )


def check_lengths(config: Any) -> None:
    """The length rules data.ingest and data.preferences apply, before anything is read."""
    check(config)
    if config.max_chars < config.min_chars:
        raise refuse(
            config,
            ("max_chars", "min_chars"),
            f"max_chars ({config.max_chars}) must be >= min_chars ({config.min_chars})",
        )


@dataclass
class IngestConfig:
    """How SFT rows are validated and split."""

    eval_fraction: float = eval_fraction("examples")
    seed: int = param(
        0, "Seed of the train/eval split; the same seed and data always give the same split.", low=0
    )
    min_chars: int = min_chars("prompt or completion")
    max_chars: int = max_chars("prompt or completion")
    expectation_suite_uri: str = expectation_suite_uri()


def validate(config: IngestConfig) -> None:
    """Refuse settings the ingest step would refuse, before any data is read."""
    check_lengths(config)
