"""Score responses with a reward model: one scalar per (prompt, response).

A reward model is a one-label ``AutoModelForSequenceClassification`` (see preftune.model.modeling.load_reward_model).
It reads its score at the last token that is not padding: transformers finds that token as the rightmost
position whose id differs from ``model.config.pad_token_id``. So the text a reward model scores is exactly what
it was trained on, and batches are right-padded with that same id:

- the prompt rendered by the chat template up to the assistant turn, then the response, then eos (the same
  tokens as preftune.model.templating.tokenize_example, the same as reward-model and DPO training);
- when the pad id differs from eos (the bundled model), the score is read at the eos closing the response;
  when a tokenizer pads with its eos, at the last response token (training and scoring agree either way).

Used by the reward-model training loop (its held-out metrics), the evaluation judge and PPO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from preftune.model import templating

PromptLike = str | Sequence[Mapping[str, str]]


def _messages(prompt: PromptLike) -> list[dict[str, str]]:
    """A plain-text prompt becomes one user message; chat messages are taken as they are."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def reward_pad_id(model: Any) -> int | None:
    """The id a reward model treats as padding (its ``config.pad_token_id``); None when it has none."""
    pad = getattr(model.config, "pad_token_id", None)
    return pad if isinstance(pad, int) else None


def max_positions(model: Any) -> int:
    """The context length a model was built for (a large bound when its config does not say)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value >= 2 else 1 << 20


def rewards_from_batch(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar reward per row of a right-padded batch (``(rows,)``, the model's dtype, with gradients)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    if logits.shape[-1] != 1:
        raise ValueError(f"a reward model has one output (num_labels=1); this one has {logits.shape[-1]}")
    return logits.squeeze(-1)


@torch.no_grad()
def score_sequences(
    model: Any, sequences: Sequence[Sequence[int]], *, batch_size: int = 16, pad_id: int | None = None
) -> list[float]:
    """Rewards of already tokenised sequences (prompt tokens + response tokens + eos), in input order.

    Rows are right-padded with the id the model pools by (``pad_id``, default ``model.config.pad_token_id``);
    a model without one scores one sequence at a time, so no padding is ever needed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot score an empty sequence")
    pad = pad_id if pad_id is not None else reward_pad_id(model)
    if pad is None:
        batch_size = 1
        pad = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        rows = [list(s) for s in sequences[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, : len(row)] = 1
        rewards = rewards_from_batch(model, input_ids.to(device), attention.to(device))
        out.extend(float(x) for x in rewards.float().cpu())
    model.train(was_training)
    return out


def score_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptLike],
    responses: Sequence[str],
    batch_size: int = 16,
    *,
    max_length: int | None = None,
) -> list[float]:
    """Reward of each response to its prompt under a reward model, in input order.

    Args:
        model: A one-label sequence classifier (``preftune.model.modeling.load_reward_model``).
        tokenizer: Its tokenizer (with a chat template).
        prompts: Plain-text prompts (one user message each) or lists of chat messages.
        responses: One response text per prompt (the assistant's answer, without eos).
        batch_size: Sequences per forward pass.
        max_length: Longest prompt + response in tokens (default: the model's context length); longer ones
            keep the end of the prompt, then the start of the response, as in training.

    Returns:
        One float per (prompt, response).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    limit = max_length or max_positions(model)
    sequences = []
    for prompt, response in zip(prompts, responses, strict=True):
        tokens = templating.tokenize_example(tokenizer, _messages(prompt), response, limit)
        sequences.append(tokens["prompt_ids"] + tokens["completion_ids"])
    return score_sequences(model, sequences, batch_size=batch_size)
