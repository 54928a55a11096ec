"""The prompts of a sampling stage with their data rows: PPO's unique prompts, plus each one's other columns (a
reference answer, a test case, ...) for the reward functions."""

from __future__ import annotations

import json
from typing import Any

from preftune.data.records import to_messages
from preftune.train.batching import read_rows
from preftune.train.ppo.prompts import Messages, load_prompts


def _key(messages: Messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def load_prompt_records(path: str) -> tuple[list[Messages], list[dict[str, Any]]]:
    """The unique prompts of ``path`` as chat messages (validated and deduplicated by ``ppo.load_prompts``, first
    row kept) and, for each, the first data row that gave it."""
    prompts = load_prompts(path)
    first: dict[str, dict[str, Any]] = {}
    for file, row, record in read_rows(path):
        first.setdefault(_key(to_messages(record["prompt"], file, row, "prompt")), record)
    return prompts, [first[_key(messages)] for messages in prompts]
