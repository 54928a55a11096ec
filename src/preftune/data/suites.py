"""The content rules of an import as great-expectations suites, kept as one versioned JSON artifact.

Each import writes the suites it ran as one JSON document (the ``expectation_suite`` artifact; format below) that
a user can edit -- tighten a bound, add an expectation on a computed column -- and pass back as
``expectation_suite_uri``. The suites run on *computed columns*: a few numbers per row (trimmed lengths, duplicate
and contradiction flags; :data:`COLUMNS`), never on the texts, so they stay small at any input size. How they
run is :mod:`checkpoints`. An expectation's ``meta.reason`` is the rejection reason of the rows it finds
unexpected; one without a reason is reported and rejects nothing.

Bounds that follow the step's parameters are written as suite parameters (``{"$PARAMETER": "max_chars"}``) and
filled at run time, so a stored suite keeps following ``min_chars`` / ``max_chars`` unless edited to a literal.

Document format (version 1)::

    {"preftune_expectation_suites": 1, "import": "preferences", "parameters": [...], "columns": {...},
     "suites": {"pairs": <great-expectations suite JSON>, ...}}
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from preftune.io import storage

log = logging.getLogger(__name__)

VERSION = 1

_TEXT = "trimmed characters of {} (0 when it holds only whitespace or invisible characters)"
#: The computed columns each suite may name, and what they hold.
COLUMNS: dict[str, dict[str, str]] = {
    "examples": {
        "prompt_chars": _TEXT.format("the prompt (all messages)"),
        "completion_chars": _TEXT.format("the completion"),
        "is_duplicate": "an earlier row has the same id (the first is kept)",
    },
    "pairs": {
        "prompt_chars": _TEXT.format("the prompt (all messages)"),
        "chosen_chars": _TEXT.format("the chosen answer"),
        "rejected_chars": _TEXT.format("the rejected answer"),
        "pair_chars": "prompt_chars plus the longer answer's",
        "margin": "the pair's margin (NaN when it has none)",
        "identical_pair": "chosen and rejected are the same text once trimmed",
        "is_duplicate": "an earlier pair has the same id (the first is kept)",
        "is_contradiction": "the reverse pair (same prompt, answers swapped) is also present",
        "truncated": "pair_chars is over truncation_chars (never when it is 0)",
    },
    "ranked_rows": {
        "prompt_chars": _TEXT.format("the prompt"),
        "responses_min_chars": "the shortest response's trimmed characters",
        "responses_max_chars": "the longest response's trimmed characters",
        "responses": "how many responses the list holds",
    },
    "rating_rows": {
        "prompt_chars": _TEXT.format("the prompt"),
        "response_min_chars": _TEXT.format("the response"),
        "response_max_chars": _TEXT.format("the response"),
        "score": "the raw score",
        "score_nonfinite": "the score is NaN or infinite",
    },
    "binary_rows": {
        "prompt_chars": _TEXT.format("the prompt"),
        "response_min_chars": _TEXT.format("the response"),
        "response_max_chars": _TEXT.format("the response"),
        "label_up": "1 for an up-vote, 0 for a down-vote",
    },
}
#: Which suites each import runs.
IMPORTS = {"ingest": ("examples",), "preferences": ("ranked_rows", "rating_rows", "binary_rows", "pairs")}
#: Share of pairs that may exceed ``truncation_chars`` before the report warns; label balance bounds.
TRUNCATION_MOSTLY = 0.9
LABEL_BALANCE = 0.1


# ---------------------------------------------------------------------------------------------- defaults


def _expectation(kind: str, reason: str, description: str, failure: str, **kwargs: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "kwargs": kwargs,
        "meta": {"reason": reason, "description": description, "failure": failure},
    }


def text_rules(field: str, min_column: str, max_column: str) -> list[dict[str, Any]]:
    """Length rules for one text field: not empty, at least ``min_chars`` (on ``min_column``, the shortest text
    when a row holds several) and at most ``max_chars`` (on ``max_column``, the longest)."""
    between = "expect_column_values_to_be_between"
    return [
        _expectation(
            between,
            f"empty:{field}",
            f"{field} is not empty",
            f"{field} is empty",
            column=min_column,
            min_value=1,
        ),
        _expectation(
            between,
            f"too_short:{field}",
            f"{field} has at least {{min_value}} characters",
            f"{field} has fewer than {{min_value}} characters",
            column=min_column,
            min_value={"$PARAMETER": "min_chars"},
            row_condition=f"{min_column} > 0",
            condition_parser="pandas",
        ),
        _expectation(
            between,
            f"too_long:{field}",
            f"{field} has at most {{max_value}} characters",
            f"{field} has more than {{max_value}} characters",
            column=max_column,
            max_value={"$PARAMETER": "max_chars"},
        ),
    ]


def flag_rule(
    column: str, reason: str, description: str, failure: str, mostly: float | None = None
) -> dict[str, Any]:
    """A boolean computed column that must be False (on at least ``mostly`` of the rows)."""
    kwargs: dict[str, Any] = {"column": column, "value_set": [False]}
    if mostly is not None:
        kwargs["mostly"] = mostly
    return _expectation("expect_column_values_to_be_in_set", reason, description, failure, **kwargs)


def _default_rules(suite: str) -> list[dict[str, Any]]:
    if suite == "examples":
        return [
            *text_rules("prompt", "prompt_chars", "prompt_chars"),
            *text_rules("completion", "completion_chars", "completion_chars"),
            flag_rule(
                "is_duplicate",
                "duplicate",
                "no row repeats an earlier row's id (the first is kept)",
                "same id as an earlier row",
            ),
        ]
    if suite == "pairs":
        rules = [
            r for f in ("prompt", "chosen", "rejected") for r in text_rules(f, f"{f}_chars", f"{f}_chars")
        ]
        return [
            *rules,
            flag_rule(
                "identical_pair",
                "identical_pair",
                "chosen and rejected differ",
                "chosen and rejected are the same text",
            ),
            flag_rule(
                "is_duplicate",
                "duplicate",
                "no pair repeats an earlier pair (the first is kept)",
                "same pair as an earlier row",
            ),
            flag_rule(
                "is_contradiction",
                "contradiction",
                "no pair is contradicted by its reverse (b over a for the same prompt)",
                "another row prefers the opposite answer for the same prompt",
            ),
            flag_rule(
                "truncated",
                "",
                f"at least {TRUNCATION_MOSTLY:.0%} of pairs fit in "
                "truncation_chars={truncation_chars} (prompt + longer answer)",
                "longer than truncation_chars={truncation_chars}: training would truncate it",
                mostly=TRUNCATION_MOSTLY,
            ),
        ]
    kind = suite.removesuffix("_rows")
    name = "responses" if kind == "ranked" else "response"
    rules = [
        *text_rules("prompt", "prompt_chars", "prompt_chars"),
        *text_rules(name, f"{name}_min_chars", f"{name}_max_chars"),
    ]
    if kind == "rating":
        rules.append(
            flag_rule(
                "score_nonfinite", "nonfinite:score", "scores are finite numbers", "score is NaN or infinite"
            )
        )
    if kind == "binary":
        rules.append(
            _expectation(
                "expect_column_mean_to_be_between",
                "",
                f"label balance: between {LABEL_BALANCE:.0%} and {1 - LABEL_BALANCE:.0%} of rows are up-votes",
                "the labels are extremely unbalanced",
                column="label_up",
                min_value=LABEL_BALANCE,
                max_value=1 - LABEL_BALANCE,
            )
        )
    return rules


def default_document(kind: str) -> dict[str, Any]:
    """The suites an import (``ingest`` or ``preferences``) runs unless given others, as a JSON document."""
    return {
        "preftune_expectation_suites": VERSION,
        "import": kind,
        "parameters": ["min_chars", "max_chars"],
        "columns": {name: COLUMNS[name] for name in IMPORTS[kind]},
        "suites": {name: {"name": name, "expectations": _default_rules(name)} for name in IMPORTS[kind]},
    }


def reasons_of(document: Mapping[str, Any], suite: str) -> tuple[str, ...]:
    """The rejection reasons a suite of the document can give, in its order."""
    rules = document["suites"][suite]["expectations"]
    return tuple(
        dict.fromkeys(r.get("meta", {}).get("reason") for r in rules if r.get("meta", {}).get("reason"))
    )


# ---------------------------------------------------------------------------------------------- the artifact


class SuiteError(ValueError):
    """An expectation-suite document that cannot be used: wrong version or import, or an unknown column."""


def _columns_named(kwargs: Mapping[str, Any]) -> list[str]:
    names = [kwargs[k] for k in ("column", "column_A", "column_B") if isinstance(kwargs.get(k), str)]
    return names + [c for c in kwargs.get("column_list") or [] if isinstance(c, str)]


def check_document(document: Any, kind: str, where: str) -> dict[str, Any]:
    """A document as :func:`default_document` writes it, checked: version, import, suites, column names.
    Suites it leaves out are the defaults."""
    if not isinstance(document, dict) or document.get("preftune_expectation_suites") != VERSION:
        raise SuiteError(f"{where}: not a preftune expectation-suite document of version {VERSION}")
    if document.get("import") != kind:
        raise SuiteError(f"{where}: holds the suites of the {document.get('import')!r} import, not {kind!r}")
    suites = document.get("suites")
    if not isinstance(suites, dict) or set(suites) - set(IMPORTS[kind]):
        raise SuiteError(f"{where}: 'suites' must map some of {', '.join(IMPORTS[kind])} to suites")
    checked = default_document(kind)
    for name, suite in suites.items():
        rules = suite.get("expectations") if isinstance(suite, dict) else None
        if not isinstance(rules, list) or not all(
            isinstance(r, dict) and isinstance(r.get("kwargs", {}), dict) for r in rules
        ):
            raise SuiteError(f"{where}: suite {name!r} needs a list of expectations")
        for index, rule in enumerate(rules, start=1):
            unknown = [c for c in _columns_named(rule.get("kwargs", {})) if c not in COLUMNS[name]]
            if unknown:
                raise SuiteError(
                    f"{where}: suite {name!r}, expectation {index} ({rule.get('type')}) names unknown column(s) "
                    f"{unknown}; the {name} columns are {', '.join(COLUMNS[name])}"
                )
        checked["suites"][name] = {
            "name": name,
            "expectations": rules,
            **({"meta": suite["meta"]} if "meta" in suite else {}),
        }
    return checked


def load_document(uri: str, kind: str) -> dict[str, Any]:
    """The suites of ``expectation_suite_uri`` (local path or s3://), checked; the defaults when ``uri`` is empty."""
    if not uri:
        return default_document(kind)
    try:
        document = json.loads(storage.read_bytes(uri).decode("utf-8"))
    except FileNotFoundError as exc:
        raise SuiteError(f"expectation_suite_uri: no such file: {uri}") from exc
    except (UnicodeDecodeError, ValueError) as exc:
        raise SuiteError(f"expectation_suite_uri {uri}: not a JSON document ({exc})") from exc
    return check_document(document, kind, f"expectation_suite_uri {uri}")


def write_document(path: str, document: Mapping[str, Any]) -> None:
    """Write the suites an import ran, for a user to edit and pass back as ``expectation_suite_uri``."""
    storage.write_bytes(path, (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
