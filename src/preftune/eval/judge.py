"""A reward model used as a judge: scores responses of several policies to the same prompts.

Evaluation compares a candidate with its reference, with the registry's champion and with its own training
snapshots, all under one judge. The judge is loaded once and each distinct (prompt, response) is scored once,
so identical answers always tie and a judge shared by many comparisons costs one pass over distinct texts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.model.modeling import load_reward_model, load_tokenizer, resolve
from preftune.model.scoring import score_texts

Messages = list[dict[str, str]]


def check_reward_model(ref: str) -> None:
    """Refuse a local model that is not a reward model: a causal LM would load with a random, meaningless head."""
    path = Path(resolve(ref))
    if not path.is_dir():
        return  # a hub id: transformers checks what it loads
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        task = json.loads(adapter.read_text(encoding="utf-8")).get("task_type")
        if task != "SEQ_CLS":
            raise ValueError(f"judge {ref}: a {task or 'untyped'} adapter, not a reward model (SEQ_CLS)")
        return
    config = path / "config.json"
    architectures = (
        json.loads(config.read_text(encoding="utf-8")).get("architectures") if config.is_file() else None
    )
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures or []):
        raise ValueError(
            f"judge {ref}: {', '.join(architectures or ['unknown architecture'])} is not a reward model; "
            "give a reward-model artifact (a sequence classifier with one output)"
        )


class Judge:
    """A reward model that scores (prompt, response) pairs, each distinct pair once.

    It reads text with its own tokenizer and chat template, so it need not share the policies' tokenizer, and
    truncates as reward-model training does at ``max_length`` (None: its context length).
    """

    def __init__(
        self,
        ref: str,
        *,
        batch_size: int = 16,
        device: torch.device | None = None,
        max_length: int | None = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
    ) -> None:
        self.ref = resolve(ref)
        check_reward_model(self.ref)
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = load_tokenizer(self.ref)
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_reward_model(self.ref, dtype=dtype, attn_implementation=attn_implementation)
        self.model: Any = model.to(device).eval()
        self._cache: dict[tuple[str, str], float] = {}

    def score(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        """The judge's reward for each response to its prompt, in input order."""
        if len(prompts) != len(responses):
            raise ValueError(f"judge: {len(prompts)} prompts but {len(responses)} responses")
        keys = [(json.dumps(p, sort_keys=True), r) for p, r in zip(prompts, responses, strict=True)]
        todo: dict[tuple[str, str], int] = {}
        for i, key in enumerate(keys):
            if key not in self._cache and key not in todo:
                todo[key] = i
        if todo:
            rewards = score_texts(
                self.model,
                self.tokenizer,
                [prompts[i] for i in todo.values()],
                [responses[i] for i in todo.values()],
                batch_size=self.batch_size,
                max_length=self.max_length,
            )
            self._cache.update(zip(todo, rewards, strict=True))
        return [self._cache[key] for key in keys]

    def close(self) -> None:
        """Free the model (evaluation loads policies after the judge is done with)."""
        self.model = None
