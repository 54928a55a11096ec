"""Sample responses from a policy and measure token log-probabilities under policies.

The primitives evaluation, the reward-vs-KL frontier, PPO and feedback collection share: seeded, explicitly
configured sampling (so two models given the same prompts differ only by their weights), completion
log-probabilities under a model's raw distribution, the KL estimate built on them, and DPO's implicit rewards
on preference pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from preftune.config.generation import GenerationOptions
from preftune.model import templating
from preftune.model.generation import GenerationBackend, SamplingSettings
from preftune.model.generation.transformers_backend import (  # noqa: F401 - the sampling API, re-exported
    NEUTRAL,
    TransformersBackend,
    generate,
    generation_config,
)
from preftune.model.losses import sequence_logprobs
from preftune.model.modeling import set_seed
from preftune.model.templating import tokenize_pair

Messages = list[dict[str, str]]


@dataclass
class Generations:
    """Responses of one model to a list of prompts, as token ids (for scoring) and text (for display)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated tokens up to and including the first eos
    texts: list[str]
    lengths: list[int]  # generated tokens, eos not counted


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The chat template writes its own special tokens (bos), so the tokenizer must not add them again.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------- generation


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def eos_ids_of(tokenizer: PreTrainedTokenizerBase, *models: PreTrainedModel) -> list[int]:
    """Every token that ends a response: the tokenizer's eos, the chat template's end of turn (which training
    teaches; preftune.model.templating) and each model's generation eos."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        candidates += templating.end_of_turn_ids(tokenizer)
    candidates += [getattr(m.generation_config, "eos_token_id", None) for m in models]
    for value in candidates:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("the tokenizer has no eos token: responses could not end")
    return ids


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
    eos_ids: list[int] | None = None,
    desc: str = "generate",
    backend: GenerationBackend | None = None,
    options: GenerationOptions | None = None,
) -> Generations:
    """Sample one response per rendered prompt: left-padded batches, KV cache, stop at eos.

    The seed is set right before the first batch, so two models given the same prompts and settings draw the
    same random numbers and their differences come from the models alone. ``backend`` samples (default: the
    transformers backend on ``model`` with ``options``, :mod:`preftune.config.generation`'s defaults when None).
    """
    eos_ids = eos_ids or eos_ids_of(tokenizer, model)
    settings = SamplingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_ids=tuple(eos_ids),
        pad_id=templating.pad_id(tokenizer),
        batch_size=batch_size,
    )
    backend = backend or TransformersBackend(model, options or GenerationOptions())
    backend.sync(model)
    encoded = [_encode(tokenizer, prompt) for prompt in prompts]
    out = Generations(prompt_ids=encoded, response_ids=[], texts=[], lengths=[])
    set_seed(seed)
    with tqdm(total=len(encoded), desc=desc, unit="prompt") as progress:
        samples = backend.generate(encoded, settings)
        progress.update(len(encoded))
    for row, ended in zip(samples.tokens, samples.ended, strict=True):
        body = row[:-1] if ended else row
        out.response_ids.append(row)
        out.lengths.append(len(body))
        out.texts.append(tokenizer.decode(body, skip_special_tokens=True).strip())
    return out


# ------------------------------------------------------------------------------------------------------ scoring


def max_positions(model: PreTrainedModel) -> int:
    """The context length a model was built for (a large bound when its config does not say)."""
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value >= 2 else 1 << 20


@torch.no_grad()
def completion_logprobs(
    model: PreTrainedModel,
    items: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "score",
) -> list[float]:
    """Summed log-probability of each completion given its prompt, under the model's raw distribution.

    Temperature 1, no truncation: these are the probabilities the KL estimate and DPO's implicit rewards are
    defined on. Batches are right-padded, so position ids need no correction.
    """
    device = next(model.parameters()).device
    model.eval()
    sums: list[float] = []
    for batch in tqdm(list(_batches(len(items), batch_size)), desc=desc, unit="batch"):
        rows = [items[i] for i in batch]
        width = max(len(p) + len(c) for p, c in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        completion = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (p, c) in enumerate(rows):
            input_ids[j, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
            attention[j, : len(p) + len(c)] = 1
            completion[j, len(p) : len(p) + len(c)] = 1
        input_ids, attention, completion = input_ids.to(device), attention.to(device), completion.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention).logits
        # position t predicts token t + 1: shift once, score only the completion's tokens.
        sums += sequence_logprobs(logits[:, :-1], input_ids[:, 1:], completion[:, 1:]).cpu().tolist()
    return sums


def estimate_kl(
    candidate: PreTrainedModel,
    reference: PreTrainedModel,
    samples: Generations,
    *,
    batch_size: int,
    pad_id: int,
) -> tuple[float, float]:
    """KL(candidate || reference) per response and per token, from candidate samples drawn at temperature 1.

    The samples must come from the candidate's raw distribution for the estimate to be unbiased.
    """
    items = list(zip(samples.prompt_ids, samples.response_ids, strict=True))
    items = [(p, r) for p, r in items if r]
    if not items:
        return 0.0, 0.0
    cand = completion_logprobs(candidate, items, batch_size=batch_size, pad_id=pad_id, desc="kl: candidate")
    ref = completion_logprobs(reference, items, batch_size=batch_size, pad_id=pad_id, desc="kl: reference")
    total = sum(a - b for a, b in zip(cand, ref, strict=True))
    tokens = sum(len(r) for _, r in items)
    return total / len(items), total / tokens


class PairScorer:
    """DPO implicit-reward accuracy and margin, and chosen-response perplexity, on (prompt, chosen, rejected).

    The reference's log-probabilities are computed once, so scoring many policies against the same reference
    (a final model and its training snapshots) costs one pass per policy. Responses are scored as completion
    tokens as the chat template renders the assistant turn, after the prompt it renders, with the same
    tokenisation and truncation as DPO training (``max_length``: DPO's; None = the reference's context length),
    so the implicit rewards match its own.
    """

    def __init__(
        self,
        reference: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[Messages, str, str]],
        *,
        beta: float,
        batch_size: int,
        max_length: int | None = None,
    ) -> None:
        if not pairs:
            raise ValueError("no preference pairs to score")
        limit = max_length or max_positions(reference)
        self.items: list[tuple[list[int], list[int]]] = []
        for messages, chosen, rejected in pairs:
            tokens = tokenize_pair(tokenizer, messages, chosen, rejected, limit)
            self.items.append((tokens["prompt_ids"], tokens["chosen_ids"]))
            self.items.append((tokens["prompt_ids"], tokens["rejected_ids"]))
        self.beta, self.batch_size = beta, batch_size
        self.pad_id = templating.pad_id(tokenizer)
        self.reference_logps = completion_logprobs(
            reference, self.items, batch_size=batch_size, pad_id=self.pad_id, desc="pairs: reference"
        )

    def _perplexity(self, logps: list[float]) -> float:
        chosen_tokens = sum(len(c) for _, c in self.items[0::2])
        nll = -sum(logps[0::2]) / max(chosen_tokens, 1)
        return math.exp(min(nll, 700.0))  # capped so the metric stays a finite float

    def score(self, candidate: PreTrainedModel) -> dict[str, float]:
        cand = completion_logprobs(
            candidate, self.items, batch_size=self.batch_size, pad_id=self.pad_id, desc="pairs: candidate"
        )
        rewards = [self.beta * (a - b) for a, b in zip(cand, self.reference_logps, strict=True)]
        margins = [rewards[i] - rewards[i + 1] for i in range(0, len(rewards), 2)]
        return {
            "num_pairs": float(len(margins)),
            "implicit_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
            "implicit_reward_margin": sum(margins) / len(margins),
            "chosen_perplexity_candidate": self._perplexity(cand),
            "chosen_perplexity_reference": self._perplexity(self.reference_logps),
        }


def score_pairs(
    candidate: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Messages, str, str]],
    *,
    beta: float,
    batch_size: int,
    max_length: int | None = None,
) -> dict[str, float]:
    """One policy's implicit-reward metrics on held-out pairs (see PairScorer)."""
    scorer = PairScorer(reference, tokenizer, pairs, beta=beta, batch_size=batch_size, max_length=max_length)
    return scorer.score(candidate)
