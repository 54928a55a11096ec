"""The feedback formats teams collect, recognised and normalised row by row (pairing happens in :mod:`pairing`).

``pairwise``    ``prompt, chosen, rejected, margin?``            one row -> one pair
``ranked``      ``prompt, responses[K>=2], ranks[K]`` (1 = best) one row -> pairs between rank levels
``rating``      ``prompt, response, score, rater?``              rows of one prompt -> pairs by score gap
``binary``      ``prompt, response, label`` (up / down)          rows of one prompt -> up x down pairs
``labelstudio`` Label Studio JSON export of a Pairwise project   one annotation -> one pair

``auto`` looks at each file's columns: the format whose own columns appear in the most rows wins, ties going to
the order above (Label Studio first). Texts may be plain text or chat messages, as in :mod:`records`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from preftune.config.preference_import import FORMAT_CHOICES
from preftune.data import records
from preftune.data.readers import DataFormatError, RawRow, _kind

FORMATS = tuple(f for f in FORMAT_CHOICES if f != "auto")
#: Columns that only a given format has; ``auto`` counts the rows holding any of them.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "labelstudio": ("annotations",),
    "pairwise": ("chosen", "rejected"),
    "ranked": ("responses", "ranks"),
    "rating": ("score",),
    "binary": ("label",),
}
RANKED_FIELDS = ("prompt", "responses", "ranks")
RATING_FIELDS = ("prompt", "response", "score", "rater")
BINARY_FIELDS = ("prompt", "response", "label")

UP_LABELS = frozenset({"true", "1", "+1", "up", "thumbs_up", "thumbsup", "thumbs-up", "yes", "good", "like"})
DOWN_LABELS = frozenset(
    {"false", "0", "-1", "down", "thumbs_down", "thumbsdown", "thumbs-down", "no", "bad", "dislike"}
)


def check_format(fmt: str) -> str:
    """A valid ``format`` parameter, lower-cased; ValueError naming the choices otherwise."""
    value = (fmt or "auto").strip().lower()
    if value not in ("auto", *FORMATS):
        raise ValueError(f"format must be one of auto, {', '.join(FORMATS)}; got {fmt!r}")
    return value


def detect(rows: Sequence[RawRow], file: str) -> str:
    """The format of one file's readable rows (see the module docstring); DataFormatError when none fits."""
    counts = dict.fromkeys(SIGNATURES, 0)
    for raw in rows:
        if raw.record is None:
            continue
        for fmt, keys in SIGNATURES.items():
            if any(k in raw.record for k in keys):
                counts[fmt] += 1
    best = max(counts.values(), default=0)
    if best == 0:
        columns = sorted({k for raw in rows if raw.record for k in raw.record})[:20]
        raise DataFormatError(
            "cannot tell the feedback format: no row has the columns of any format (pairwise: chosen/rejected; "
            "ranked: responses/ranks; rating: response/score; binary: response/label; Label Studio: "
            f"data/annotations); columns seen: {columns or 'none'}. Name the format with the format parameter",
            file=file,
        )
    return next(fmt for fmt, count in counts.items() if count == best)


# ---------------------------------------------------------------------------------------------- values


def _json_list(value: Any) -> Any:
    """A CSV cell holding a JSON list (responses, ranks) becomes that list; anything else is unchanged."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays from parquet
        return value.tolist()
    return value


def number(value: Any, file: str, row: int, name: str) -> float:
    """A number (text numbers from CSV are parsed); may be non-finite -- the suite rejects those by rule."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise records.missing_value(file, row, name)
    if isinstance(value, bool):
        raise DataFormatError(
            "expected a number, got bool", file=file, row=row, field=name, reason=f"invalid:{name}"
        )
    try:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        if hasattr(value, "item"):
            return float(value.item())
    except OverflowError:
        raise DataFormatError(
            f"a number too large for a float ({len(str(abs(value)))} digits)"
            if isinstance(value, int)
            else "a number too large for a float",
            file=file,
            row=row,
            field=name,
            reason=f"invalid:{name}",
        ) from None
    except (TypeError, ValueError):
        pass
    raise DataFormatError(
        f"expected a number, got {value!r}"
        if isinstance(value, str)
        else f"expected a number, got {_kind(value)}",
        file=file,
        row=row,
        field=name,
        reason=f"invalid:{name}",
    )


def label(value: Any, file: str, row: int) -> bool:
    """Binary feedback as True (up) / False (down): booleans, 1/0/-1, or words such as up/down, thumbs_up."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise records.missing_value(file, row, "label")
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, 0, -1):
        return value == 1
    if isinstance(value, str):
        word = value.strip().lower().replace(" ", "_")
        if word in UP_LABELS:
            return True
        if word in DOWN_LABELS:
            return False
    raise DataFormatError(
        f"expected true/false, 1/0, up/down or thumbs_up/thumbs_down, got {value!r}",
        file=file,
        row=row,
        field="label",
        reason="invalid:label",
    )


def _rater(value: Any) -> str | None:
    """A rater id as text (None when absent or blank): ids may be numbers in one file and text in another."""
    if value is None or isinstance(value, (dict, list)):
        return None if value is None else records.canonical_json(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    text = str(value).strip()
    return text or None


def _prompt_and_answer(
    record: Mapping[str, Any], file: str, row: int, key: str, problems: list[DataFormatError]
) -> tuple[list[dict[str, str]], str]:
    """The prompt and one answer; the answer may be a whole conversation (then the prompt may be omitted)."""
    prompt: list[dict[str, str]] | None = None
    if records._present(record, "prompt"):
        try:
            prompt = records.to_messages(record["prompt"], file, row, "prompt")
        except DataFormatError as exc:
            problems.append(exc)
    answer = ""
    try:
        answer, conversation = records._answer(record.get(key), prompt, file, row, key)
        if conversation is not None:  # no prompt column: everything before the answer is the prompt
            prompt = conversation[:-1]
            answer = records.completion_text(conversation[-1:], file, row, key)
    except DataFormatError as exc:
        problems.append(exc)
    if prompt is None and not any(p.field in ("prompt", key) for p in problems):
        problems.append(records.missing_value(file, row, "prompt"))
    if prompt:
        try:
            records._check_prompt(prompt, file, row, "prompt")
        except DataFormatError as exc:
            problems.append(exc)
    return prompt or [], answer


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class Observation:
    """One rating or binary row: a response to a prompt and how good it was (``value``: score, or 1.0 / 0.0)."""

    unit: int
    prompt: list[dict[str, str]]
    response: str
    value: float
    rater: str | None
    meta: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class RankedList:
    """One ranked row: K responses to a prompt and their ranks (lower is better, equal ranks are ties)."""

    unit: int
    prompt: list[dict[str, str]]
    responses: list[str]
    ranks: list[float]
    meta: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)


def _ranked_prompt(
    record: Mapping[str, Any], file: str, row: int, problems: list[DataFormatError]
) -> list[dict[str, str]]:
    try:
        prompt = records.to_messages(record.get("prompt"), file, row, "prompt")
        records._check_prompt(prompt, file, row, "prompt")
    except DataFormatError as exc:
        problems.append(exc)
        return []
    return prompt


def _ranked_responses(value: Any, file: str, row: int, problems: list[DataFormatError]) -> list[str]:
    """At least two responses, each a text or an answer message."""
    if value is None:
        problems.append(records.missing_value(file, row, "responses"))
        return []
    if not isinstance(value, list) or len(value) < 2:
        got = f"{len(value)} response(s)" if isinstance(value, list) else _kind(value)
        problems.append(
            DataFormatError(
                f"expected a list of at least 2 responses, got {got}",
                file=file,
                row=row,
                field="responses",
                reason="invalid:responses",
            )
        )
        return []
    responses: list[str] = []
    for i, item in enumerate(value):
        try:
            responses.append(records.completion_text(item, file, row, "responses"))
        except DataFormatError as exc:
            exc.message = f"response {i + 1}: {exc.message}"
            exc.reason = "invalid:responses"
            problems.append(exc)
            break  # the responses before the bad one are kept: the ranks are counted against them
    return responses


def _ranks(value: Any, file: str, row: int, responses: int, problems: list[DataFormatError]) -> list[float]:
    """One finite rank per response (``responses``: how many were read; 0 = not checked)."""
    if value is None:
        problems.append(records.missing_value(file, row, "ranks"))
        return []
    if not isinstance(value, list):
        problems.append(
            DataFormatError(
                f"expected a list of ranks, got {_kind(value)}",
                file=file,
                row=row,
                field="ranks",
                reason="invalid:ranks",
            )
        )
        return []
    try:
        ranks = [number(v, file, row, "ranks") for v in value]
        if not all(math.isfinite(r) for r in ranks):
            raise DataFormatError("ranks must be finite numbers", file=file, row=row, field="ranks")
        if responses and len(ranks) != responses:
            raise DataFormatError(
                f"{len(ranks)} ranks for {responses} responses", file=file, row=row, field="ranks"
            )
    except DataFormatError as exc:
        exc.reason = "invalid:ranks"
        problems.append(exc)
        return []
    return ranks


def normalize_ranked(raw: RawRow, unit: int) -> RankedList:
    """A ranked-list row; raises RowError listing every problem (``missing:``/``invalid:`` reasons)."""
    record = raw.record or {}
    file, row = raw.file, raw.row
    problems: list[DataFormatError] = []
    prompt = _ranked_prompt(record, file, row, problems)
    responses = _ranked_responses(_json_list(record.get("responses")), file, row, problems)
    ranks = _ranks(_json_list(record.get("ranks")), file, row, len(responses), problems)
    if problems:
        raise records.RowError(problems)
    return RankedList(
        unit, prompt, responses, ranks, records._meta(record, RANKED_FIELDS), {"file": file, "row": row}
    )


def normalize_observation(raw: RawRow, unit: int, fmt: str) -> Observation:
    """A rating (``score``, optional ``rater``) or binary (``label``) row; raises RowError on problems.

    The observation's ``meta`` keeps the row's extra columns plus its raw ``score``/``rater`` or ``label``, so
    the pairs made from it carry what the annotator actually said.
    """
    record = raw.record or {}
    file, row = raw.file, raw.row
    problems: list[DataFormatError] = []
    prompt, response = _prompt_and_answer(record, file, row, "response", problems)
    value = 0.0
    rater: str | None = None
    try:
        if fmt == "rating":
            value = number(record.get("score"), file, row, "score")
            rater = _rater(record.get("rater"))
        else:
            value = 1.0 if label(record.get("label"), file, row) else 0.0
    except DataFormatError as exc:
        problems.append(exc)
    if problems:
        raise records.RowError(problems)
    consumed = RATING_FIELDS if fmt == "rating" else BINARY_FIELDS
    meta = records._meta(record, consumed)
    kept = ("score", "rater") if fmt == "rating" else ("label",)
    meta.update({k: records.jsonable(record[k]) for k in kept if records._present(record, k)})
    return Observation(unit, prompt, response, value, rater, meta, {"file": file, "row": row})
