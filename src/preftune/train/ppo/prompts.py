"""PPO's prompts: read once (deduplicated), rendered and truncated once, handed out in a seeded order."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from preftune.data.records import to_messages
from preftune.model.templating import _prompt_keep, render_prompt
from preftune.train.batching import DataError, read_rows

Messages = list[dict[str, str]]


def load_prompts(path: str) -> list[Messages]:
    """Unique prompts (as chat messages) of a JSONL file or directory of rows with a ``prompt`` field.

    The prompt may be text (one user message) or chat messages. In the RLHF pipeline these are the preference
    import's train pairs, where one prompt often has several pairs: duplicates are dropped, first one kept.
    """
    prompts: list[Messages] = []
    seen: set[str] = set()
    for file, row, record in read_rows(path):
        if "prompt" not in record:
            raise DataError(f"{file}: row {row}: field 'prompt': missing")
        try:
            messages = to_messages(record["prompt"], file, row, "prompt")
        except ValueError as exc:
            raise DataError(f"{file}: row {row}: field 'prompt': {exc}") from None
        if not messages or not any(m["content"].strip() for m in messages):
            raise DataError(f"{file}: row {row}: field 'prompt': empty prompt")
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            prompts.append(messages)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def encode_prompts(tokenizer: Any, prompts: list[Messages], max_length: int) -> tuple[list[list[int]], int]:
    """Every prompt rendered with the chat template and cut to its last ``max_length`` tokens (a leading bos
    kept), and how many were cut."""
    encoded, truncated = [], 0
    for messages in prompts:
        ids = list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
        encoded.append(_prompt_keep(ids, max_length, tokenizer.bos_token_id))
        truncated += len(encoded[-1]) < len(ids)
    return encoded, truncated


def prompt_text(messages: Messages) -> str:
    """A prompt as one line of the report."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class PromptCycler:
    """Hands out prompt indices in a seeded random order, reshuffling after each full pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self.order.pop(0))
        return out

    def draw(self, per_process: int, processes: int, rank: int) -> tuple[list[int], list[int]]:
        """One round's prompts for every process, in one seeded order for all, and this process's share."""
        indices = self.take(per_process * processes)
        return indices, indices[rank * per_process : (rank + 1) * per_process]

    def state_dict(self) -> dict[str, list[int]]:
        """The rest of the current pass and the generator's state (a uint8 list), for a checkpoint."""
        return {"order": list(self.order), "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: Mapping[str, list[int]]) -> None:
        self.order = list(state["order"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
