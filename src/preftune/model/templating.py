"""Chat templating and tokenisation of prompt/completion examples.

Every stage that feeds text to a model (SFT, DPO, reward model, PPO, evaluation) must render prompts the same
way, or the policy is trained on one format and sampled with another. This module is that single place.

Tokenisation keeps the prompt and the completion apart. The prompt is the chat template rendered up to the
start of the assistant turn (``add_generation_prompt=True``). The completion is the assistant turn *as the
template renders it*: the conversation is rendered with the answer, the prompt's rendering must be a prefix of
it, and what follows is the completion, kept up to and including the turn's first special token (Gemma's
``<end_of_turn>``, Llama 3's ``<|eot_id|>``, ChatML's ``<|im_end|>``, or eos); a template that ends a turn with
plain text (or with nothing) gets eos after it, so a response can always end. Generation stops at the same
token (:func:`end_of_turn_ids`). Losses are computed on the completion tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    """The tokenizer's eos token id."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos token")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, or eos when it has none (padding is always masked)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The chat template already writes any bos token as text, so no special tokens are added here.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


#: Stands for the answer when finding where a template puts an assistant turn's content.
_PROBE = "PREFTUNE-PROBE-ANSWER-7f3a"


def _template_name(tokenizer: Any) -> str:
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'!r}"


def _render(tokenizer: Any, messages: Messages) -> str:
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    return text if isinstance(text, str) else text[0]


def _after_prompt(tokenizer: Any, messages: Messages, answer: str, prompt: str) -> str:
    """What the template writes after the rendered prompt when the assistant answers ``answer``."""
    full = _render(tokenizer, [*messages, {"role": "assistant", "content": answer}])
    if not full.startswith(prompt):
        raise ValueError(
            f"{_template_name(tokenizer)} renders the prompt differently with an answer after it: the prompt "
            "rendered with add_generation_prompt=True is not a prefix of prompt + answer, so the answer's tokens "
            "cannot be found. Use a template whose generation prompt opens the assistant turn it then renders"
        )
    return full[len(prompt) :]


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for index, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(index))
    return ids


@dataclass(frozen=True)
class TurnFrame:
    """How a template frames an assistant turn after a prompt: the rendered prompt, what it writes before the
    answer's content (often nothing) and after it (the end of turn)."""

    prompt: str
    before: str
    after: str


def turn_frame(tokenizer: Any, messages: Messages) -> TurnFrame:
    """Where the template puts the assistant's answer after ``messages`` (found with a probe answer)."""
    prompt = render_prompt(tokenizer, messages)
    suffix = _after_prompt(tokenizer, messages, _PROBE, prompt)
    at = suffix.find(_PROBE)
    if at < 0:
        raise ValueError(f"{_template_name(tokenizer)} does not write the assistant's answer into its turn")
    return TurnFrame(prompt, suffix[:at], suffix[at + len(_PROBE) :])


def _end_of_turn(tokenizer: Any, after: str) -> tuple[str, list[int]]:
    """The text of the end of turn that is trained on, and the token ids it ends with.

    Up to and including the first special token the template writes after the answer; a template that writes
    none gets its end text (right-stripped) followed by eos.
    """
    ids = _encode(tokenizer, after)
    special = _special_ids(tokenizer)
    for k, token in enumerate(ids):
        if token in special:
            return "", ids[: k + 1]
    return after.rstrip(), [eos_id(tokenizer)]


def completion_ids(
    tokenizer: Any, messages: Messages, completion: str, frame: TurnFrame | None = None
) -> list[int]:
    """The tokens of ``completion`` as the assistant's turn after ``messages``, as the template renders it."""
    frame = frame or turn_frame(tokenizer, messages)
    suffix = _after_prompt(tokenizer, messages, completion, frame.prompt)
    if not (suffix.startswith(frame.before) and suffix.endswith(frame.after)):
        raise ValueError(
            f"{_template_name(tokenizer)} frames this answer's turn differently from others; cannot tell the "
            f"answer from the end of its turn ({completion[:60]!r})"
        )
    body = suffix[: len(suffix) - len(frame.after)]
    text, end = _end_of_turn(tokenizer, frame.after)
    return _encode(tokenizer, body + text) + end


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The token ids an assistant turn ends with under the chat template (what generation stops at besides eos)."""
    frame = turn_frame(tokenizer, [{"role": "user", "content": "?"}])
    return _end_of_turn(tokenizer, frame.after)[1][-1:]


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

    Returns ``prompt_ids`` (the rendered chat prompt), ``completion_ids`` (the assistant turn as the template
    renders it, to its end-of-turn token, see the module docstring) and ``truncated``. When too long, the prompt
    keeps its end (the latest turns; a leading bos is kept) but never drops below half of ``max_length``; then
    the completion is cut at its end, which also drops its end of turn, so the model is not taught to stop
    where the text was merely cut.
    """
    frame = turn_frame(tokenizer, prompt_messages)
    prompt_ids = _encode(tokenizer, frame.prompt)
    answer_ids = completion_ids(tokenizer, prompt_messages, completion, frame)
    keep_prompt, keep_completion = _budget(len(prompt_ids), len(answer_ids), max_length)
    truncated = keep_prompt < len(prompt_ids) or keep_completion < len(answer_ids)
    return {
        "prompt_ids": _prompt_keep(prompt_ids, keep_prompt, tokenizer.bos_token_id),
        "completion_ids": answer_ids[:keep_completion],
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
    frame = turn_frame(tokenizer, prompt_messages)
    prompt_ids = _encode(tokenizer, frame.prompt)
    chosen_ids = completion_ids(tokenizer, prompt_messages, chosen, frame)
    rejected_ids = completion_ids(tokenizer, prompt_messages, rejected, frame)
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
