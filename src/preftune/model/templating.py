"""Chat templating and tokenisation of prompt/completion examples.

Every stage that feeds text to a model (SFT, DPO, reward model, PPO, evaluation) must render prompts the same
way, or the policy is trained on one format and sampled with another. This module is that single place.

Tokenisation keeps the prompt and the completion apart: the prompt is the chat template rendered up to the
start of the assistant turn (``add_generation_prompt=True``), the completion is the assistant text followed by
the tokenizer's eos token (which, for chat tokenizers, ends an assistant turn). Losses are computed on the
completion tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Messages = Sequence[Mapping[str, str]]


def render_prompt(tokenizer: Any, messages: Messages) -> str:
    """Render chat messages as the text a model continues to write the assistant's answer.

    Uses the tokenizer's chat template with ``add_generation_prompt=True``, so the returned text ends exactly
    where the assistant's reply begins. Raises a ValueError when the tokenizer has no chat template, because
    silently falling back to another format would train and sample the model in different formats.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "set one (tokenizer.chat_template) before training or generating"
        )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):  # some tokenizer versions return a list for batched input
        text = text[0]
    return text


def eos_id(tokenizer: Any) -> int:
    """The id that ends an assistant turn (the tokenizer's eos token)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos token")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, or eos when it has none (padding is always masked)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template already writes any bos token as text, so no special tokens are added here.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_keep(prompt_ids: list[int], keep: int, bos: int | None) -> list[int]:
    """The last ``keep`` prompt tokens, keeping a leading bos token so the model still sees a sequence start."""
    if keep >= len(prompt_ids):
        return prompt_ids
    if keep <= 0:
        return []
    if bos is not None and prompt_ids and prompt_ids[0] == bos and keep >= 2:
        return [bos] + prompt_ids[len(prompt_ids) - keep + 1 :]
    return prompt_ids[len(prompt_ids) - keep :]


def _budget(prompt_len: int, completion_len: int, max_length: int) -> tuple[int, int]:
    """How many prompt and completion tokens fit in ``max_length``.

    The prompt gives way first (down to half the budget: its end, the latest turns, matters most), then the
    completion is cut at its end.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if prompt_len + completion_len <= max_length:
        return prompt_len, completion_len
    prompt_keep = min(prompt_len, max(max_length - completion_len, max_length // 2))
    return prompt_keep, min(completion_len, max_length - prompt_keep)


def tokenize_example(
    tokenizer: Any, prompt_messages: Messages, completion: str, max_length: int
) -> dict[str, Any]:
    """Tokenise one prompt + completion for training, truncated to ``max_length`` tokens in all.

    Returns ``prompt_ids`` (the rendered chat prompt), ``completion_ids`` (the completion followed by eos) and
    ``truncated``. When too long, the prompt keeps its end (the latest turns; a leading bos is kept) but never
    drops below half of ``max_length``; then the completion is cut at its end, which also drops its eos, so the
    model is not taught to stop where the text was merely cut.
    """
    prompt_ids = _encode(tokenizer, render_prompt(tokenizer, prompt_messages))
    completion_ids = _encode(tokenizer, completion) + [eos_id(tokenizer)]
    keep_prompt, keep_completion = _budget(len(prompt_ids), len(completion_ids), max_length)
    truncated = keep_prompt < len(prompt_ids) or keep_completion < len(completion_ids)
    return {
        "prompt_ids": _prompt_keep(prompt_ids, keep_prompt, tokenizer.bos_token_id),
        "completion_ids": completion_ids[:keep_completion],
        "truncated": truncated,
    }


def tokenize_pair(
    tokenizer: Any, prompt_messages: Messages, chosen: str, rejected: str, max_length: int
) -> dict[str, Any]:
    """Tokenise a preference pair so that chosen and rejected share exactly the same prompt tokens.

    DPO and the reward model compare two answers to one prompt; truncating the prompt differently for each
    would compare answers to different contexts. The prompt budget is set by the longer completion; each
    completion is then cut to fit. Returns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, ``truncated``.
    """
    prompt_ids = _encode(tokenizer, render_prompt(tokenizer, prompt_messages))
    eos = eos_id(tokenizer)
    chosen_ids = _encode(tokenizer, chosen) + [eos]
    rejected_ids = _encode(tokenizer, rejected) + [eos]
    longest = max(len(chosen_ids), len(rejected_ids))
    keep_prompt, _ = _budget(len(prompt_ids), longest, max_length)
    room = max_length - keep_prompt
    truncated = keep_prompt < len(prompt_ids) or longest > room
    return {
        "prompt_ids": _prompt_keep(prompt_ids, keep_prompt, tokenizer.bos_token_id),
        "chosen_ids": chosen_ids[:room],
        "rejected_ids": rejected_ids[:room],
        "truncated": truncated,
    }
