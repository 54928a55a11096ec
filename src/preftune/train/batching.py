"""From contract JSONL rows to padded training batches.

SFT rows (``prompt`` messages + ``completion``) and preference pairs (``prompt`` + ``chosen`` + ``rejected``)
are tokenised once up front (preftune.model.templating), then collated into right-padded batches. Right padding keeps
every real token at the position it would have alone, so a sequence's log-probability does not depend on the
other sequences in its batch; that is what lets DPO reuse reference log-probabilities computed in another pass.

Masks are built from token positions, never by comparing ids with the pad id: the pad id is often the eos id,
and the eos closing a completion must be trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.data.readers import DataFormatError
from preftune.data.records import read_artifact_rows
from preftune.model.templating import pad_id, tokenize_example, tokenize_pair

IGNORE_INDEX = -100


class DataError(ValueError):
    """A training input row that cannot be used; the message names the file, row and field."""


def read_rows(path: str | Path) -> list[tuple[str, int, dict[str, Any]]]:
    """Read contract JSONL (a file, or every ``*.jsonl`` in a directory or s3 prefix) as ``(file, row, record)``.

    Rows are numbered from 1 (the line number); blank lines are skipped. Anything unreadable raises a DataError
    naming the file and row.
    """
    try:
        rows = read_artifact_rows(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except DataFormatError as err:
        raise DataError(str(err)) from None
    if not rows and Path(path).is_dir():
        raise DataError(f"{path}: directory holds no *.jsonl files")
    return [(row.file, row.row, row.record) for row in rows]


def _check_messages(where: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'prompt': expected a non-empty list of chat messages")
    for i, msg in enumerate(value):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise DataError(
                f"{where}: field 'prompt[{i}]': expected an object with string 'role' and 'content'"
            )
    return value


def _check_text(where: str, record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r}: expected a non-empty string")
    return value


def load_sft_features(path: str | Path, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Read and tokenise SFT examples; each feature has ``id``, ``prompt_ids``, ``completion_ids``, ``truncated``."""
    features = []
    for file, row, record in read_rows(path):
        where = f"{file}: row {row}"
        prompt = _check_messages(where, record.get("prompt"))
        completion = _check_text(where, record, "completion")
        feat = tokenize_example(tokenizer, prompt, completion, max_length)
        feat["id"] = str(record.get("id", f"{Path(file).name}:{row}"))
        features.append(feat)
    if not features:
        raise DataError(f"{path}: no examples")
    return features


def load_pair_features(path: str | Path, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Read and tokenise preference pairs; each feature has ``id``, ``index``, ``prompt_ids``, ``chosen_ids``,
    ``rejected_ids`` and ``truncated`` (``index`` is the pair's position, used to look up reference log-probs)."""
    features = []
    for file, row, record in read_rows(path):
        where = f"{file}: row {row}"
        prompt = _check_messages(where, record.get("prompt"))
        chosen = _check_text(where, record, "chosen")
        rejected = _check_text(where, record, "rejected")
        feat = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length)
        feat["id"] = str(record.get("id", f"{Path(file).name}:{row}"))
        feat["index"] = len(features)
        features.append(feat)
    if not features:
        raise DataError(f"{path}: no preference pairs")
    return features


def _pad(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        completion[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    labels = input_ids.masked_fill(completion == 0, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "labels": labels,
    }


class SFTCollator:
    """Right-pads SFT features into ``input_ids``, ``attention_mask``, ``completion_mask`` and ``labels``
    (``labels`` is -100 exactly on prompt and padding positions)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = pad_id(tokenizer)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = [f["prompt_ids"] + f["completion_ids"] for f in features]
        masks = [[0] * len(f["prompt_ids"]) + [1] * len(f["completion_ids"]) for f in features]
        return _pad(seqs, masks, self.pad)


class PairCollator:
    """Right-pads B preference pairs into one batch of 2B sequences: rows ``[:B]`` are the chosen answers,
    rows ``[B:]`` the rejected ones, so a single forward pass scores both. Adds ``index`` (B,) and, when the
    features carry them, ``ref_chosen_logps`` / ``ref_rejected_logps`` (B,)."""

    def __init__(self, tokenizer: Any) -> None:
        self.pad = pad_id(tokenizer)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for f in features:
                seqs.append(f["prompt_ids"] + f[key])
                masks.append([0] * len(f["prompt_ids"]) + [1] * len(f[key]))
        batch = _pad(seqs, masks, self.pad)
        batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        if all("ref_chosen_logps" in f for f in features):
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features])
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features])
        return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The subset of a batch that goes into the model's forward."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def shifted(batch: dict[str, torch.Tensor], logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Align logits with the tokens they predict: ``(logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:])``."""
    return logits[:, :-1, :], batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]


# ------------------------------------------------------------------------------------ packed, prefix-shared pairs

#: Branch ids of the tokens of a packed document: the shared prompt, then the answers that each see the prompt.
PROMPT, FIRST_ANSWER = 0, 1


def _first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices (first fit, longest first); an item longer than ``capacity`` gets a bin of its own."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return [sorted(b) for b in bins]


def _balanced(lengths: Sequence[int], rows: int, capacity: int) -> list[list[int]] | None:
    """The items spread over ``rows`` bins, each to the least-filled bin so far (longest first); None when a
    bin would exceed ``capacity``.

    A batch tensor is as wide as its fullest row, so first fit's full rows and short last row pad every row but
    one up to the full width (about a quarter of the positions on 16 bundled pairs in rows of 256); with the
    same number of rows, evenly filled, nearly every position holds a token.
    """
    bins: list[list[int]] = [[] for _ in range(rows)]
    loads = [0] * rows
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        b = min(range(rows), key=loads.__getitem__)
        bins[b].append(i)
        loads[b] += lengths[i]
    return [sorted(b) for b in bins] if max(loads) <= capacity else None


#: One part of a packed document: ``(token ids, branch, segment)``. Branch PROMPT is seen by every later part
#: of its document; any other branch only by itself (answers that share a prompt but not each other). Segment
#: ``>= 0`` marks the part's tokens as scored (the caller's sequence number); -1 = context only.
Part = tuple[Sequence[int], int, int]


def _block_mask(group: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The ``(rows, 1, L, L)`` boolean mask of packed rows from each position's document (``group``, -1 =
    padding) and branch: causal within a document, a non-prompt part sees its prompt and itself only."""
    width = group.shape[1]
    same = group.unsqueeze(2) == group.unsqueeze(1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    visible = (branch.unsqueeze(1) == PROMPT) | (branch.unsqueeze(1) == branch.unsqueeze(2))
    mask = same & causal & visible
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no all-masked softmax rows
    return mask.unsqueeze(1)


def pack_documents(docs: Sequence[Sequence[Part]], pad: int, pack_length: int = 0) -> dict[str, torch.Tensor]:
    """Pack documents into rows with no padding inside a row; the shared layout of every packed batch.

    Documents are packed into as few rows of up to ``pack_length`` tokens as first fit needs (a longer one gets a
    row of its own; 0 = one document per row, right-padded to the longest), then spread evenly over those rows
    when that fits (:func:`_balanced`), so the batch is about as wide as its tokens need and not wider. A
    document never sees another: the 4-D boolean ``attention_mask`` ``(rows, 1, L, L)`` (True = may attend)
    is causal within a document, and a non-prompt part sees its document's prompt and
    itself only. ``position_ids`` restart at 0 for each document and, for a non-prompt part, where the prompt
    ends, so every token sees exactly the context and positions it would have alone.

    Returns, besides ``input_ids``, ``position_ids`` and ``attention_mask``, the scored tokens as flat lists:
    ``target_row`` and ``target_src`` (the position whose output predicts the token: the previous one, or the
    prompt's last for a part's first token; a part with no prompt before it is not scored at its first token),
    ``target_ids``, ``target_segment`` and ``target_pos`` (the token's index within its part); ``doc_row`` and
    ``doc_start`` (where each document begins), ``tokens`` (real tokens) and ``shared_prefix`` (answers share a
    prompt). preftune.model.attention turns the boolean mask into what each attention kernel reads.
    """
    lengths = [sum(len(ids) for ids, _, _ in d) for d in docs]
    if pack_length > 0:
        capacity = max(pack_length, max(lengths))
        rows = _first_fit(lengths, capacity)
        rows = _balanced(lengths, len(rows), capacity) or rows
    else:
        rows = [[i] for i in range(len(docs))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    group = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, -1, dtype=torch.long)
    doc_row = [0] * len(docs)
    doc_start = [0] * len(docs)
    # two or more answers after one prompt: only a mask can keep them apart (flash kernels cannot)
    shared = any(sum(1 for ids, br, _ in d if br != PROMPT and len(ids)) > 1 for d in docs)
    t_row: list[int] = []
    t_src: list[int] = []
    t_ids: list[int] = []
    t_seg: list[int] = []
    t_pos: list[int] = []
    for r, row in enumerate(rows):
        at = 0
        for d in row:
            start, prompt_end = at, at
            doc_row[d], doc_start[d] = r, at
            for ids, br, seg in docs[d]:
                k = len(ids)
                if not k:
                    continue
                input_ids[r, at : at + k] = torch.as_tensor(ids, dtype=torch.long)
                group[r, at : at + k] = d
                branch[r, at : at + k] = br
                offset = 0 if br == PROMPT else prompt_end - start
                position_ids[r, at : at + k] = torch.arange(offset, offset + k)
                if br == PROMPT:
                    prompt_end = at + k
                elif seg >= 0:
                    # The part's first token is predicted by the prompt's last token (none: not scored).
                    first = 0 if prompt_end > start else 1
                    srcs = [prompt_end - 1, *range(at, at + k - 1)]
                    t_row.extend([r] * (k - first))
                    t_src.extend(srcs[first:])
                    t_ids.extend(ids[first:])
                    t_seg.extend([seg] * (k - first))
                    t_pos.extend(range(first, k))
                at += k
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_mask": _block_mask(group, branch),
        "target_row": torch.tensor(t_row, dtype=torch.long),
        "target_src": torch.tensor(t_src, dtype=torch.long),
        "target_ids": torch.tensor(t_ids, dtype=torch.long),
        "target_segment": torch.tensor(t_seg, dtype=torch.long),
        "target_pos": torch.tensor(t_pos, dtype=torch.long),
        "doc_row": torch.tensor(doc_row, dtype=torch.long),
        "doc_start": torch.tensor(doc_start, dtype=torch.long),
        "tokens": torch.tensor(int(group.ge(0).sum()), dtype=torch.long),
        "shared_prefix": torch.tensor(shared),
    }


class PackedPairCollator:
    """Packs B preference pairs into as few rows as fit, with no padding inside a row (:func:`pack_documents`).

    Two independent levers, each ablatable:

    - ``prefix_sharing``: a pair becomes one document ``prompt + chosen + rejected``; the rejected tokens attend to
      the prompt but not to the chosen ones, and their position ids restart where the prompt ends, so each answer
      sees exactly the context it would see alone while the prompt is run once instead of twice. Off: the pair is
      two documents, ``prompt + chosen`` and ``prompt + rejected``.
    - ``pack_length``: documents are packed first-fit into rows of up to this many tokens (a longer document gets
      a row of its own); 0 puts one document per row (right-padded to the longest).

    Scored tokens have ``target_segment`` ``i`` for pair i's chosen answer and ``B + i`` for its rejected one.
    Also ``index`` and, when the features carry them, the reference log-probs.
    """

    def __init__(self, tokenizer: Any, *, prefix_sharing: bool = True, pack_length: int = 0) -> None:
        self.pad = pad_id(tokenizer)
        self.prefix_sharing = prefix_sharing
        self.pack_length = pack_length

    def _documents(self, features: Sequence[dict[str, Any]]) -> list[list[Part]]:
        n = len(features)
        docs: list[list[Part]] = []
        for i, f in enumerate(features):
            prompt = list(f["prompt_ids"])
            if self.prefix_sharing:
                docs.append(
                    [(prompt, PROMPT, -1), (list(f["chosen_ids"]), 1, i), (list(f["rejected_ids"]), 2, n + i)]
                )
            else:
                docs.append([(prompt, PROMPT, -1), (list(f["chosen_ids"]), 1, i)])
                docs.append([(prompt, PROMPT, -1), (list(f["rejected_ids"]), 1, n + i)])
        return docs

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = pack_documents(self._documents(features), self.pad, self.pack_length)
        batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        if all("ref_chosen_logps" in f for f in features):
            batch["ref_chosen_logps"] = torch.tensor([f["ref_chosen_logps"] for f in features])
            batch["ref_rejected_logps"] = torch.tensor([f["ref_rejected_logps"] for f in features])
        return batch


class PackedSFTCollator:
    """Packs SFT examples into rows of up to ``pack_length`` tokens, no padding inside a row
    (:func:`pack_documents`): one document ``prompt + completion`` per example, only the completion scored
    (``target_segment`` = the example's place in the batch)."""

    def __init__(self, tokenizer: Any, *, pack_length: int = 256) -> None:
        self.pad = pad_id(tokenizer)
        self.pack_length = pack_length

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        docs = [
            [(list(f["prompt_ids"]), PROMPT, -1), (list(f["completion_ids"]), FIRST_ANSWER, i)]
            for i, f in enumerate(features)
        ]
        return pack_documents(docs, self.pad, self.pack_length)
