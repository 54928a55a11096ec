"""Normalise raw rows into the dataset contracts (docs/contracts.md) and read/write our JSONL artifacts.

Users bring data in several shapes; everything downstream sees exactly one: ``prompt`` as a list of chat
messages ending with a user turn, answers as plain text, a content ``id``, the ``source`` file and row, and every
column we did not consume kept in ``meta`` (nothing silently dropped). Problems confined to one row raise
:class:`RowError` carrying one rejection reason per problem (``missing:<field>``, ``invalid:<field>``), so the
importers can reject the row and go on.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from json.encoder import encode_basestring
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from preftune.data import textio
from preftune.data.readers import DataFormatError, RawRow, _kind, jsonl_rows
from preftune.io import storage

ROLES = ("system", "user", "assistant")
SFT_FIELDS = ("prompt", "completion", "messages")
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected", "margin")


class RowError(DataFormatError):
    """One row cannot be normalised; ``problems`` lists every problem found and ``reasons`` their reasons."""

    def __init__(self, problems: list[DataFormatError]) -> None:
        first = problems[0]
        self.problems = problems
        self.reasons = list(dict.fromkeys(p.reason or "invalid" for p in problems))
        message = "; ".join((f"field {p.field!r}: {p.message}" if p.field else p.message) for p in problems)
        super().__init__(message, file=first.file, row=first.row, reason=self.reasons[0])
        self.field = first.field if len(problems) == 1 else None


# ---------------------------------------------------------------------------------------------- values


def missing_value(file: str, row: int | None, field: str) -> DataFormatError:
    """The problem of a field that is absent or null: reason ``missing:<field>``."""
    return DataFormatError("missing value", file=file, row=row, field=field, reason=f"missing:{field}")


def _content_text(content: Any, file: str, row: int | None, field: str, index: int) -> str:
    """A message's content as text; OpenAI-style lists of text parts are joined with newlines."""
    if isinstance(content, str):
        return content
    if (
        isinstance(content, list)
        and content
        and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        )
    ):
        return "\n".join(p["text"] for p in content)
    raise DataFormatError(
        f"message {index + 1}: content must be text, got {_kind(content)}",
        file=file,
        row=row,
        field=field,
        reason=f"invalid:{field}",
    )


def to_messages(value: Any, file: str, row: int | None, field: str) -> list[dict[str, str]]:
    """Text -> one user message; a list of messages -> validated ``[{"role", "content"}]`` (other keys dropped).

    Each message needs a role in system/user/assistant and text content. Raises DataFormatError with reason
    ``missing:<field>`` for null and ``invalid:<field>`` for anything else. An empty list comes back empty
    (the validation suite rejects it as ``empty:<field>``).
    """
    if value is None:
        raise missing_value(file, row, field)
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if not isinstance(value, list):
        raise DataFormatError(
            f"expected text or chat messages, got {_kind(value)}",
            file=file,
            row=row,
            field=field,
            reason=f"invalid:{field}",
        )
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataFormatError(
                f"expected text or chat messages, got a list containing {_kind(message)}",
                file=file,
                row=row,
                field=field,
                reason=f"invalid:{field}",
            )
        role = message.get("role")
        if role not in ROLES:
            raise DataFormatError(
                f"message {index + 1}: role must be one of {', '.join(ROLES)}, got {role!r}",
                file=file,
                row=row,
                field=field,
                reason=f"invalid:{field}",
            )
        messages.append(
            {"role": role, "content": _content_text(message.get("content"), file, row, field, index)}
        )
    return messages


def completion_text(value: Any, file: str, row: int | None, field: str) -> str:
    """An answer as text: text itself, one assistant message, or a one-message list holding it."""
    if value is None:
        raise missing_value(file, row, field)
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if isinstance(value, list):
        messages = to_messages(value, file, row, field)
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            return messages[0]["content"]
        roles = [m["role"] for m in messages]
        raise DataFormatError(
            f"expected the assistant's answer (text or one assistant message), got messages with roles {roles}",
            file=file,
            row=row,
            field=field,
            reason=f"invalid:{field}",
        )
    raise DataFormatError(
        f"expected text or an assistant message, got {_kind(value)}",
        file=file,
        row=row,
        field=field,
        reason=f"invalid:{field}",
    )


#: A character that shows: not whitespace, not a control character, not a zero-width or format character.
_VISIBLE = re.compile(
    "[^\\s\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufffb]"
)


def visible_length(text: str) -> int:
    """Whitespace-trimmed characters of a text, or 0 when nothing in it shows (only NUL, zero-width spaces,
    direction marks...): such a text is empty."""
    text = text.strip()
    return len(text) if _VISIBLE.search(text) else 0


def text_length(value: str | list[dict[str, str]]) -> int:
    """Characters of real content (:func:`visible_length`; summed over messages), for empty / length rules."""
    if isinstance(value, str):
        return visible_length(value)
    return sum(visible_length(m["content"]) for m in value)


# ---------------------------------------------------------------------------------------------- ids and JSON


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats -> null, dates -> ISO text, bytes -> text (UTF-8) or base64,
    numpy / decimal scalars -> Python numbers, other objects -> their string form."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [jsonable(v) for v in items]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(bytes(value)).decode("ascii")
    if hasattr(value, "item") and callable(value.item):
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):
        return jsonable(value.tolist())
    return str(value)


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of plain JSON data directly (fast path); anything else through :func:`jsonable` first."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, **kwargs)
    except (TypeError, ValueError):
        return json.dumps(jsonable(value), ensure_ascii=False, allow_nan=False, **kwargs)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the same data always gives the same text."""
    return dumps(value, sort_keys=True, separators=(",", ":"))


def record_id(payload: Any) -> str:
    """First 16 hex digits of SHA-1 over ``canonical_json(payload)``: stable across runs and machines.

    SFT rows hash ``{"prompt", "completion"}``; preference pairs hash ``{"prompt", "chosen", "rejected"}``.
    """
    return hashlib.sha1(canonical_json(payload).encode("utf-8")).hexdigest()[:16]


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write rows as JSONL to a file path (a KFP artifact path is a file) or an s3 URI; returns the count.

    Local writes go through a temporary file and a rename, so a reader never sees half an artifact.
    """
    uri = os.fspath(path)
    count = 0
    if storage.is_s3(uri):
        lines = []
        for row in rows:
            lines.append(dumps(row) + "\n")
            count += 1
        storage.write_bytes(uri, "".join(lines).encode("utf-8"))
        return count
    target = storage.local_path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            for row in rows:
                handle.write(dumps(row) + "\n")
                count += 1
        storage.publish_file(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def read_artifact_rows(path_or_dir: str | Path) -> list[RawRow]:
    """Rows of one of our JSONL artifacts, each with its file and line: a file (whatever its name, local or
    s3://), or every ``*.jsonl`` in a directory or prefix, sorted.

    Strict: any bad line raises DataFormatError naming file and line (our own artifacts must be clean).
    """
    uri = os.fspath(path_or_dir)
    files = storage.list_files(uri)
    if storage.is_s3(uri):
        single = files == ["s3://{}/{}".format(*storage.split_s3(uri))]
    else:
        single = storage.local_path(uri).is_file()
    if not single:
        files = [f for f in files if f.endswith(".jsonl") and not PurePosixPath(f).name.startswith(".")]
    rows: list[RawRow] = []
    for file_uri in files:
        try:
            with storage.open_input(file_uri) as stream:
                rows.extend(jsonl_rows(textio.lines(stream), file_uri, "raise"))
        except textio.TextFormatError as exc:
            raise DataFormatError(str(exc), file=file_uri, row=exc.line) from exc
    return rows


def read_jsonl(path_or_dir: str | Path) -> list[dict[str, Any]]:
    """The records of one of our JSONL artifacts (see read_artifact_rows)."""
    return [row.record for row in read_artifact_rows(path_or_dir) if row.record]


# ---------------------------------------------------------------------------------------------- rows


def _meta(record: Mapping[str, Any], consumed: Iterable[str]) -> dict[str, Any]:
    """Every column not consumed; a ``meta`` dict column is merged in (other columns win on clashes)."""
    consumed = set(consumed)
    meta: dict[str, Any] = {}
    if isinstance(record.get("meta"), Mapping):
        meta.update(record["meta"])
        consumed.add("meta")
    meta.update({k: v for k, v in record.items() if k not in consumed})
    return jsonable(meta)


def row_meta(record: Mapping[str, Any]) -> dict[str, Any]:
    """A pairwise row's meta: every column besides the pair's own (prompt, chosen, rejected, margin)."""
    return _meta(record, PREFERENCE_FIELDS)


def _check_prompt(prompt: list[dict[str, str]], file: str, row: int, field: str) -> None:
    """The contract's prompt ends with a user turn (the model answers it)."""
    if prompt and prompt[-1]["role"] != "user":
        raise DataFormatError(
            f"the prompt must end with a user message, but it ends with a {prompt[-1]['role']} message",
            file=file,
            row=row,
            field=field,
            reason=f"invalid:{field}",
        )


def _present(record: Mapping[str, Any], key: str) -> bool:
    return key in record and record[key] is not None


def normalize_sft(raw: RawRow) -> dict[str, Any]:
    """An SFT row -> ``{"id", "prompt", "completion", "meta", "source"}``.

    Accepted: ``{"prompt", "completion"}`` (prompt text or messages; completion text or one assistant message),
    or ``{"messages": [...]}`` whose last message is the assistant's answer and everything before it the prompt.
    ``prompt``/``completion`` win when both shapes are present (``messages`` then goes to meta).
    """
    record = raw.record or {}
    file, row = raw.file, raw.row
    problems: list[DataFormatError] = []
    prompt: list[dict[str, str]] = []
    completion = ""
    if _present(record, "prompt") or _present(record, "completion") or not _present(record, "messages"):
        consumed = ("prompt", "completion")
        for key in consumed:
            if not _present(record, key):
                problems.append(
                    DataFormatError(
                        "missing (expected {prompt, completion} or {messages})",
                        file=file,
                        row=row,
                        field=key,
                        reason=f"missing:{key}",
                    )
                )
        try:
            if _present(record, "prompt"):
                prompt = to_messages(record["prompt"], file, row, "prompt")
                _check_prompt(prompt, file, row, "prompt")
        except DataFormatError as exc:
            problems.append(exc)
        try:
            if _present(record, "completion"):
                completion = completion_text(record["completion"], file, row, "completion")
        except DataFormatError as exc:
            problems.append(exc)
    else:
        consumed = ("messages",)
        try:
            messages = to_messages(record["messages"], file, row, "messages")
            if not messages or messages[-1]["role"] != "assistant":
                last = messages[-1]["role"] if messages else "nothing"
                raise DataFormatError(
                    f"the last message must be the assistant's answer, got {last}",
                    file=file,
                    row=row,
                    field="messages",
                    reason="invalid:messages",
                )
            prompt, completion = messages[:-1], messages[-1]["content"]
            _check_prompt(prompt, file, row, "messages")
        except DataFormatError as exc:
            problems.append(exc)
    if problems:
        raise RowError(problems)
    return {
        "id": record_id({"prompt": prompt, "completion": completion}),
        "prompt": prompt,
        "completion": completion,
        "meta": _meta(record, consumed),
        "source": {"file": file, "row": row},
    }


def _margin(value: Any, file: str, row: int) -> float | None:
    """An optional non-negative finite number (how much better chosen is); text numbers (CSV) are parsed."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    number: float | None = None
    try:
        if (isinstance(value, (int, float)) and not isinstance(value, bool)) or isinstance(value, str):
            number = float(value)
    except (ValueError, OverflowError):
        number = None
    if number is None or not math.isfinite(number) or number < 0:
        big = isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30
        shown = f"an integer of {len(str(abs(value)))} digits" if big else repr(value)[:200]
        raise DataFormatError(
            f"expected a non-negative finite number or null, got {shown}",
            file=file,
            row=row,
            field="margin",
            reason="invalid:margin",
        )
    return number


def _shared_prefix(a: list[dict[str, str]], b: list[dict[str, str]]) -> int:
    """How many leading messages two conversations share, leaving at least one message in each."""
    limit = min(len(a), len(b)) - 1
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def _answer(
    value: Any, prompt: list[dict[str, str]] | None, file: str, row: int, field: str
) -> tuple[str, list[dict[str, str]] | None]:
    """A response as text, given an explicit prompt (or None); returns (text, conversation-or-None).

    When the response is a whole conversation starting with the prompt (TRL style), the prompt is cut off.
    A conversation without an explicit prompt is returned for the caller to extract the shared prefix.
    """
    if value is None:
        raise missing_value(file, row, field)
    if isinstance(value, str):
        return value, None
    conversation = to_messages(value, file, row, field)
    if len(conversation) == 1:
        return completion_text(conversation, file, row, field), None
    if prompt is None:
        return "", conversation
    if conversation[: len(prompt)] == prompt:
        return completion_text(conversation[len(prompt) :], file, row, field), None
    raise DataFormatError(
        "a conversation given as the response must start with the prompt's messages",
        file=file,
        row=row,
        field=field,
        reason=f"invalid:{field}",
    )


def normalize_preference(raw: RawRow) -> dict[str, Any]:
    """A pairwise preference row -> ``{"id", "prompt", "chosen", "rejected", "margin", "meta", "source"}``.

    ``chosen``/``rejected`` are text, one assistant message, or (TRL style) whole conversations ending with the
    assistant's answer; then ``prompt`` may be absent (the shared leading messages become the prompt) or equal to
    that prefix (it is cut off). ``margin`` is optional.
    """
    record = raw.record or {}
    file, row = raw.file, raw.row
    problems: list[DataFormatError] = []
    prompt: list[dict[str, str]] | None = None
    if _present(record, "prompt"):
        try:
            prompt = to_messages(record["prompt"], file, row, "prompt")
        except DataFormatError as exc:
            problems.append(exc)
    answers: dict[str, str] = {}
    conversations: dict[str, list[dict[str, str]]] = {}
    for key in ("chosen", "rejected"):
        try:
            text, conversation = _answer(record.get(key), prompt, file, row, key)
        except DataFormatError as exc:
            problems.append(exc)
            continue
        answers[key] = text
        if conversation is not None:
            conversations[key] = conversation
    if conversations and not problems:
        if len(conversations) == 2:
            chosen, rejected = conversations["chosen"], conversations["rejected"]
            prompt = chosen[: _shared_prefix(chosen, rejected)]
        else:  # one conversation, one plain answer: the conversation's leading messages are the prompt
            prompt = next(iter(conversations.values()))[:-1]
        for key, conversation in conversations.items():
            try:
                answers[key] = completion_text(conversation[len(prompt) :], file, row, key)
            except DataFormatError as exc:
                exc.message = "expected one assistant answer after the shared prompt; " + exc.message
                problems.append(exc)
    if prompt is None and not conversations and not any(p.field == "prompt" for p in problems):
        problems.append(
            DataFormatError(
                "missing (and chosen/rejected are not conversations it could be taken from)",
                file=file,
                row=row,
                field="prompt",
                reason="missing:prompt",
            )
        )
    if prompt is not None and not problems:
        try:
            _check_prompt(prompt, file, row, "prompt")
        except DataFormatError as exc:
            problems.append(exc)
    margin = None
    try:
        margin = _margin(record.get("margin"), file, row)
    except DataFormatError as exc:
        problems.append(exc)
    if problems:
        raise RowError(problems)
    assert prompt is not None
    chosen_text, rejected_text = answers["chosen"], answers["rejected"]
    return {
        "id": record_id({"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}),
        "prompt": prompt,
        "chosen": chosen_text,
        "rejected": rejected_text,
        "margin": margin,
        "meta": _meta(record, PREFERENCE_FIELDS),
        "source": {"file": file, "row": row},
    }


_dumps = dumps  # the older private name


# ---------------------------------------------------------------------------------------------- pair facts


class PairFacts(NamedTuple):
    """What an import keeps of a pair: its output line, its 64-bit id and its reverse's (the first 16 hex
    digits of their SHA-1s as numbers), its prompt's canonical JSON, what the pair suite checks (trimmed lengths;
    ``flags``: 1 chosen and rejected are the same once trimmed, 2 the same as written) and its margin."""

    line: str
    id: int
    reverse: int
    prompt_key: str
    prompt_chars: int
    chosen_chars: int
    rejected_chars: int
    flags: int
    margin: float | None


def pair_facts(pair: Mapping[str, Any], line: str | None = None) -> PairFacts:
    """The facts of a normalised pair (its line is ``dumps(pair)`` unless given)."""
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    return PairFacts(
        dumps(pair) if line is None else line,
        int(pair["id"], 16),
        int(record_id({"prompt": prompt, "chosen": rejected, "rejected": chosen}), 16),
        canonical_json(prompt),
        text_length(prompt),
        visible_length(chosen),
        visible_length(rejected),
        (chosen.strip() == rejected.strip()) + 2 * (chosen == rejected),
        pair.get("margin"),
    )


_CANONICAL = '{"chosen":%s,"prompt":[{"content":%s,"role":"user"}],"rejected":%s}'
_LINE = '{"id": "%s", "prompt": [{"role": "user", "content": %s}], "chosen": %s, "rejected": %s, "margin": %s, "meta": %s, "source": {"file": %s, "row": %d}}'
_SHA1 = hashlib.sha1
_NEW = tuple.__new__


def fast_pair(record: Mapping[str, Any], file_json: str, row: int) -> PairFacts | None:
    """The facts of a pairwise row whose prompt and answers are plain text and whose margin is absent or a plain
    number, built straight from the text -- the same bytes :func:`normalize_preference` and :func:`dumps` would
    give, several times faster (``file_json``: the file's name as a JSON string). None for any other row (the
    general path takes it)."""
    prompt, chosen, rejected = record.get("prompt"), record.get("chosen"), record.get("rejected")
    if type(prompt) is not str or type(chosen) is not str or type(rejected) is not str:
        return None
    margin = record.get("margin")
    if margin is not None:
        if type(margin) is int and -(1 << 53) <= margin <= 1 << 53:
            margin = float(margin)
        if type(margin) is not float or not (margin >= 0 and math.isfinite(margin)):
            return None
    p, c, r = encode_basestring(prompt), encode_basestring(chosen), encode_basestring(rejected)
    pair_id = _SHA1((_CANONICAL % (c, p, r)).encode()).hexdigest()[:16]
    reverse = _SHA1((_CANONICAL % (r, p, c)).encode()).digest()
    meta = dumps(_meta(record, PREFERENCE_FIELDS)) if len(record) - 3 - ("margin" in record) else "{}"
    line = _LINE % (pair_id, p, c, r, "null" if margin is None else repr(margin), meta, file_json, row)
    facts = (
        line,
        int(pair_id, 16),
        int.from_bytes(reverse[:8], "big"),
        f'[{{"content":{p},"role":"user"}}]',
        visible_length(prompt),
        visible_length(chosen),
        visible_length(rejected),
        (chosen.strip() == rejected.strip()) + 2 * (chosen == rejected),
        margin,
    )
    return _NEW(PairFacts, facts)  # type: ignore[no-any-return]


_dumps = dumps  # the older private name
