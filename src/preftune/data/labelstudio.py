"""Label Studio JSON exports of pairwise-comparison projects -> preference pairs, one per annotation.

Label Studio's "JSON" export is an array of tasks ``{"id", "data": {...}, "annotations": [...]}``; an annotation
of a ``<Pairwise name=... toName="a,b"/>`` project holds a result ``{"type": "pairwise", "to_name": "a,b",
"value": {"selected": "left" | "right"}}`` (left = the first object named in ``toName``). Each annotation is one
input row: a task with no annotation counts as one row, rejected as ``unannotated``. Other results of the same
annotation (a TextArea comment, Choices, a Rating) travel with the pair in ``meta`` under their ``from_name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from preftune.data import records
from preftune.data.readers import DataFormatError, RawRow

#: Task data keys tried for the prompt, in order.
PROMPT_KEYS = ("prompt", "question", "instruction", "query", "input", "context")
#: (left, right) task data keys tried for the two answers when the result's ``to_name`` does not name data keys.
ANSWER_KEYS = (
    ("answer1", "answer2"),
    ("answer_a", "answer_b"),
    ("response1", "response2"),
    ("response_a", "response_b"),
    ("completion_a", "completion_b"),
    ("text1", "text2"),
    ("left", "right"),
)
ANNOTATION_META = ("id", "completed_by", "created_at", "updated_at", "lead_time", "ground_truth")


@dataclass
class Annotation:
    """One annotation of a task, as an accounted input row: its pair, or why it gives none."""

    file: str
    row: int
    annotation: int | None
    record: dict[str, Any]
    pair: dict[str, Any] | None = None
    error: DataFormatError | None = None


def _fail(
    raw: RawRow, index: int | None, message: str, reason: str, field: str | None = None
) -> DataFormatError:
    """A located error; the annotation's 1-based index within its task is part of the message."""
    suffix = f" (annotation {index})" if index is not None else ""
    return DataFormatError(message + suffix, file=raw.file, row=raw.row, field=field, reason=reason)


def _answer_keys(data: Mapping[str, Any], to_name: Any) -> tuple[str, str] | None:
    """The data keys of the left and right answers: ``to_name``'s names when they are data keys, else known pairs."""
    if isinstance(to_name, str):
        names = [n.strip() for n in to_name.split(",")]
        if len(names) == 2 and all(n in data for n in names):
            return names[0], names[1]
    for left, right in ANSWER_KEYS:
        if left in data and right in data:
            return left, right
    return None


def expand(raw: RawRow) -> list[Annotation]:
    """One :class:`Annotation` per annotation of the task (one rejected row for a task without any)."""
    task = raw.record or {}
    data = task.get("data")
    annotations = task.get("annotations")
    base = {"id": task.get("id"), "data": data}
    if not isinstance(data, Mapping):
        error = _fail(raw, None, "expected the task's data object", "invalid:data", "data")
        return [Annotation(raw.file, raw.row, None, dict(task), error=error)]
    if not isinstance(annotations, list) or not annotations:
        reason = "unannotated" if annotations in (None, []) else "invalid:annotations"
        message = "the task has no annotations" if reason == "unannotated" else "annotations must be a list"
        error = _fail(raw, None, message, reason, "annotations")
        return [Annotation(raw.file, raw.row, None, dict(task), error=error)]
    out = []
    for index, annotation in enumerate(annotations, start=1):
        record = {**base, "annotation": annotation}
        try:
            pair = _pair(raw, index, task, data, annotation)
            out.append(Annotation(raw.file, raw.row, index, record, pair=pair))
        except DataFormatError as exc:
            out.append(Annotation(raw.file, raw.row, index, record, error=exc))
    return out


def _pair(
    raw: RawRow, index: int, task: Mapping[str, Any], data: Mapping[str, Any], annotation: Any
) -> dict[str, Any]:
    if not isinstance(annotation, Mapping):
        raise _fail(raw, index, "expected an annotation object", "invalid:annotations", "annotations")
    if annotation.get("was_cancelled"):
        raise _fail(raw, index, "the annotator skipped this task", "skipped")
    results = annotation.get("result")
    results = results if isinstance(results, list) else []
    choice = next((r for r in results if isinstance(r, Mapping) and r.get("type") == "pairwise"), None)
    if choice is None:
        raise _fail(raw, index, "the annotation has no pairwise choice", "no_choice")
    value = choice.get("value")
    selected = value.get("selected") if isinstance(value, Mapping) else None
    if selected not in ("left", "right"):
        raise _fail(
            raw,
            index,
            f"pairwise value.selected must be 'left' or 'right', got {selected!r}",
            "invalid:selected",
            "selected",
        )
    keys = _answer_keys(data, choice.get("to_name"))
    prompt_key = next((k for k in PROMPT_KEYS if k in data), None)
    if keys is None or prompt_key is None:
        raise _fail(
            raw,
            index,
            f"cannot find the prompt and the two answers in the task data (keys {sorted(data)}); expected a prompt "
            f"key ({', '.join(PROMPT_KEYS)}) and the Pairwise tag's toName data keys or one of "
            f"{', '.join('/'.join(p) for p in ANSWER_KEYS)}",
            "invalid:data",
            "data",
        )
    left, right = keys
    chosen_key, rejected_key = (left, right) if selected == "left" else (right, left)
    record = {"prompt": data[prompt_key], "chosen": data[chosen_key], "rejected": data[rejected_key]}
    try:
        pair = records.normalize_preference(RawRow(raw.file, raw.row, record))
    except records.RowError as exc:
        exc.message += f" (annotation {index})"
        raise
    meta: dict[str, Any] = {k: v for k, v in data.items() if k not in (prompt_key, left, right)}
    meta["task_id"] = task.get("id")
    for key in ANNOTATION_META:
        if key in annotation:
            meta["annotator" if key == "completed_by" else f"annotation_{key}" if key == "id" else key] = (
                annotation[key]
            )
    meta["selected"] = selected
    for result in results:
        if result is not choice and isinstance(result, Mapping):
            meta[str(result.get("from_name") or result.get("type") or "result")] = result.get("value")
    pair["meta"] = records.jsonable(meta)
    pair["source"] = {"file": raw.file, "row": raw.row, "annotation": index}
    return pair
