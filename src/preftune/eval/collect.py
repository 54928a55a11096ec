"""Feedback collection: sample K responses per prompt from a model and write a batch for human raters.

RLHF is iterative: the current policy answers fresh prompts, people judge the answers, and the judgements train
the next reward model / policy. This module writes one labeling batch under ``<out_uri>/<batch_id>/`` in three
shapes, so raters can use whichever tool the team has, and every shape comes back through the preference import
unchanged in form (``docs/promotion.md``):

- ``ranked.jsonl``: one row per prompt ``{prompt, responses, ranks: null, batch_id, item_id}``; raters fill
  ``ranks`` (1 = best, ties allowed) -> format ``ranked``;
- ``ratings.jsonl``: one row per response ``{prompt, response, score: null, rater: null, batch_id, item_id,
  response_id}``; raters fill ``score`` and ``rater`` -> format ``rating``;
- ``labelstudio_tasks.json`` + ``labelstudio_config.xml``: a Label Studio import (one pairwise task per pair of
  distinct response texts, left/right order shuffled against position bias) and the labeling config it expects; the
  project's JSON export -> format ``labelstudio``;
- ``manifest.json``: what produced the batch (model, prompts, sampling settings, counts, files).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from preftune.data import readers, records
from preftune.io import storage

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
_BATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,127}$")

#: The Label Studio labeling config matching ``labelstudio_tasks.json`` (the "Pairwise comparison" template on
#: the task keys written here; ``prompt_text`` is the prompt as a person reads it).
LABEL_CONFIG = """<View>
  <Header value="Which answer is better?"/>
  <Text name="prompt" value="$prompt_text"/>
  <Pairwise name="pw" toName="answer1,answer2"/>
  <Text name="answer1" value="$answer1"/>
  <Text name="answer2" value="$answer2"/>
  <TextArea name="comment" toName="prompt" placeholder="Why? (optional)"/>
</View>
"""


def default_batch_id() -> str:
    """A batch id that sorts by time: ``20260101T020000Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _check(k: int, batch_id: str, max_new_tokens: int, temperature: float, top_p: float) -> None:
    if k < 2:
        raise ValueError(f"k must be >= 2 (raters compare responses), got {k}")
    if not _BATCH_ID.match(batch_id):
        raise ValueError(f"invalid batch_id {batch_id!r}: use letters, digits, '.', '_', '=', '-'")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature <= 0:
        raise ValueError(
            f"temperature must be > 0: K greedy samples would all be the same, got {temperature}"
        )
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def read_prompts(uri: str, max_prompts: int = 0) -> list[Messages]:
    """Prompts from rows with a ``prompt`` (text or chat messages); duplicates are collected once."""
    prompts: list[Messages] = []
    seen: set[str] = set()
    for row in readers.read_rows(uri, on_error="raise"):
        record = row.record or {}
        if "prompt" not in record:
            raise ValueError(f"prompts {row.file}, row {row.row}: missing field 'prompt'")
        messages = records.to_messages(record["prompt"], row.file, row.row, "prompt")
        if not any(m["content"].strip() for m in messages):
            raise ValueError(f"prompts {row.file}, row {row.row}, field 'prompt': empty prompt")
        key = records.canonical_json(messages)
        if key in seen:
            continue
        seen.add(key)
        prompts.append(messages)
        if max_prompts and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise ValueError(f"prompts {uri!r}: no rows")
    return prompts


def prompt_text(messages: Messages) -> str:
    """The prompt as a person reads it: the user's text, or role-labelled turns for a conversation."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _prompt_value(messages: Messages) -> str | Messages:
    """Plain text for a single user turn (readable in any tool), else the messages (lossless)."""
    return messages[0]["content"] if len(messages) == 1 and messages[0]["role"] == "user" else messages


def build_batch(
    prompts: Sequence[Messages], responses: Sequence[Sequence[str]], batch_id: str, *, seed: int = 0
) -> dict[str, Any]:
    """The batch's rows and tasks from prompts and their K responses each (no model involved: testable alone)."""
    rng = random.Random(f"{seed}:{batch_id}")
    ranked, ratings, tasks = [], [], []
    for messages, answers in zip(prompts, responses, strict=True):
        prompt = _prompt_value(messages)
        item_id = records.record_id({"batch_id": batch_id, "prompt": messages})
        ids = [f"{item_id}-{j}" for j in range(len(answers))]
        ranked.append(
            {
                "prompt": prompt,
                "responses": list(answers),
                "ranks": None,
                "batch_id": batch_id,
                "item_id": item_id,
            }
        )
        ratings += [
            {
                "prompt": prompt,
                "response": answer,
                "score": None,
                "rater": None,
                "batch_id": batch_id,
                "item_id": item_id,
                "response_id": rid,
            }
            for answer, rid in zip(answers, ids, strict=True)
        ]
        asked: set[tuple[str, str]] = set()
        for a, b in itertools.combinations(range(len(answers)), 2):
            texts = tuple(sorted((answers[a].strip(), answers[b].strip())))
            if texts[0] == texts[1] or texts in asked:
                continue  # identical answers, or the same two texts already asked: nothing new to compare
            asked.add(texts)
            left, right = (a, b) if rng.random() < 0.5 else (b, a)
            tasks.append(
                {
                    "data": {
                        "prompt": prompt,
                        "prompt_text": prompt_text(messages),
                        "answer1": answers[left],
                        "answer2": answers[right],
                        "answer1_id": ids[left],
                        "answer2_id": ids[right],
                        "batch_id": batch_id,
                        "item_id": item_id,
                    }
                }
            )
    return {"ranked": ranked, "ratings": ratings, "labelstudio_tasks": tasks}


def _jsonl(rows: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def write_batch(out_uri: str, batch_id: str, batch: dict[str, Any], manifest: dict[str, Any]) -> str:
    """Write the batch files under ``<out_uri>/<batch_id>/`` (manifest last, so a batch with a manifest is
    whole); returns the batch URI."""
    root = f"{str(out_uri).rstrip('/')}/{batch_id}"
    files = {
        "ranked.jsonl": _jsonl(batch["ranked"]),
        "ratings.jsonl": _jsonl(batch["ratings"]),
        "labelstudio_tasks.json": json.dumps(
            batch["labelstudio_tasks"], ensure_ascii=False, indent=1
        ).encode(),
        "labelstudio_config.xml": LABEL_CONFIG.encode("utf-8"),
    }
    for name, data in files.items():
        storage.write_bytes(f"{root}/{name}", data)
    manifest = dict(manifest, files=sorted([*files, "manifest.json"]))
    storage.write_bytes(f"{root}/manifest.json", json.dumps(manifest, indent=2, default=str).encode("utf-8"))
    return root


def sample_responses(
    model: str,
    prompts: Sequence[Messages],
    *,
    k: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
) -> list[list[str]]:
    """K sampled responses per prompt: each prompt repeated K times in left-padded, seeded batches."""
    import torch

    from preftune.model.modeling import load_causal_lm, load_tokenizer
    from preftune.model.sampling import generate_responses
    from preftune.model.templating import render_prompt

    tokenizer = load_tokenizer(model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = load_causal_lm(model).to(device).eval()
    rendered = [render_prompt(tokenizer, messages) for messages in prompts for _ in range(k)]
    generations = generate_responses(
        policy,
        tokenizer,
        rendered,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
        desc="collect: sample",
    )
    texts = generations.texts
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def collect(
    model: str,
    prompts: str,
    out_uri: str,
    *,
    k: int = 4,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
    batch_id: str = "",
    max_prompts: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Sample ``k`` responses per prompt from ``model`` and write a labeling batch; returns its manifest
    (``uri`` is the batch folder). ``max_prompts`` 0 takes every prompt."""
    batch_id = batch_id or default_batch_id()
    _check(k, batch_id, max_new_tokens, temperature, top_p)
    messages = read_prompts(prompts, max_prompts)
    responses = sample_responses(
        model,
        messages,
        k=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        batch_size=batch_size,
    )
    batch = build_batch(messages, responses, batch_id, seed=seed)
    manifest = {
        "batch_id": batch_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "prompts": prompts,
        "sampling": {
            "k": k,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
        },
        "num_prompts": len(messages),
        "num_responses": sum(len(r) for r in responses),
        "num_labelstudio_tasks": len(batch["labelstudio_tasks"]),
        "num_empty_responses": sum(1 for r in responses for text in r if not text.strip()),
    }
    manifest["uri"] = write_batch(out_uri, batch_id, batch, manifest)
    log.info("collect: wrote %s", json.dumps(manifest))
    return manifest
