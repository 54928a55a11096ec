"""The reward of a sampled answer: the reward model's score and/or Python reward functions, weighted.

A reward function is named by its import path, ``package.module:function``, and called once per batch of answers
as ``f(prompts=[...], completions=[...], **columns)``: ``prompts[i]`` is the prompt of answer i as the data gave it
(text or chat messages), ``completions[i]`` the answer's text, and each other column of the prompt rows (a
reference answer, a test case, ...) comes as a list keyword with one entry per answer. It returns one number per
answer; this is TRL's reward-function convention for plain-text data, so functions written for TRL run here too.
A function that raises, returns the wrong count, or returns a value that is not a finite number stops training
with an error naming the function and the prompt: a reward that cannot be computed is not guessed.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.config.grpo import split_list
from preftune.train.ppo.prompts import Messages, prompt_text
from preftune.train.ppo.rollout import score_responses


class RewardFunctionError(ValueError):
    """A reward function failed or returned an unusable value; the message names the function and the prompt."""


@dataclass(frozen=True)
class RewardFunction:
    """A user's reward function, its import path (its name in logs and errors) and its weight."""

    name: str
    function: Callable[..., Sequence[Any]]
    weight: float = 1.0


def load_reward_functions(specs: str, weights: str = "") -> list[RewardFunction]:
    """Import the comma-separated ``package.module:function`` paths of ``specs``, with their ``weights``
    (comma-separated, empty = 1 each). Refuses what cannot be imported or called, naming the entry."""
    names = split_list(specs)
    values = [float(w) for w in split_list(weights)] or [1.0] * len(names)
    if len(values) != len(names):
        raise ValueError(f"reward_weights has {len(values)} entries for {len(names)} reward function(s)")
    functions = []
    for name, weight in zip(names, values, strict=True):
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an import error of the user's module, whatever its kind
            raise ValueError(f"reward function {name}: cannot import {module_name}: {exc}") from exc
        function = getattr(module, attribute, None)
        if not callable(function):
            raise ValueError(f"reward function {name}: {module_name} has no function {attribute!r}")
        functions.append(RewardFunction(name, function, weight))
    return functions


def _call(
    fn: RewardFunction, prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]
) -> Any:
    return fn.function(prompts=prompts, completions=completions, **columns)


def _culprit(
    fn: RewardFunction, prompts: list[Any], completions: list[str], columns: dict[str, list[Any]]
) -> int:
    """The first answer a failing function also fails on alone (0 when it only fails on the whole batch)."""
    for i in range(len(prompts)):
        one = {k: v[i : i + 1] for k, v in columns.items()}
        try:
            _call(fn, prompts[i : i + 1], completions[i : i + 1], one)
        except Exception:  # noqa: BLE001 - looking for the answer that makes the user's function fail
            return i
    return 0


def _number(value: Any) -> float:
    """A reward as a float: numbers (Python, NumPy, 0-d tensors) and booleans (1 / 0); NaN for anything else,
    text included (``float("1.5")`` parses, but a function returning text is a bug to report)."""
    if value is None or isinstance(value, str | bytes):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _where(prompt: Any, completion: str) -> str:
    text = prompt if isinstance(prompt, str) else prompt_text(list(prompt))
    return f"on the prompt {text!r} (answer {completion!r})"


def call_reward_function(
    fn: RewardFunction, prompts: list[Any], completions: list[str], columns: Mapping[str, list[Any]]
) -> torch.Tensor:
    """One float32 reward per answer from ``fn``, or a RewardFunctionError naming it and the prompt."""
    cols = {k: list(v) for k, v in columns.items()}
    try:
        values = list(_call(fn, prompts, completions, cols))
    except Exception as exc:
        i = _culprit(fn, prompts, completions, cols)
        raise RewardFunctionError(
            f"reward function {fn.name} raised {type(exc).__name__}: {exc} {_where(prompts[i], completions[i])}"
        ) from exc
    if len(values) != len(completions):
        raise RewardFunctionError(
            f"reward function {fn.name} returned {len(values)} values for {len(completions)} answers "
            f"{_where(prompts[0], completions[0])} and the rest of its batch"
        )
    out = []
    for i, value in enumerate(values):
        number = _number(value)
        if not math.isfinite(number):
            raise RewardFunctionError(
                f"reward function {fn.name} returned {value!r}, not a finite number, "
                f"{_where(prompts[i], completions[i])}"
            )
        out.append(number)
    return torch.tensor(out, dtype=torch.float32)


@dataclass
class Rewards:
    """The rewards of a batch of answers ``(answers,)``: the weighted total before any KL penalty, the reward
    model's score (after ``score_clip``; None without a reward model) and each function's raw values."""

    total: torch.Tensor
    model_score: torch.Tensor | None = None
    functions: dict[str, torch.Tensor] = field(default_factory=dict)


class RewardSources:
    """What an answer's reward is made of: a frozen reward model (a ``TokenValueModel`` in eval mode, read as
    ``ppo.rollout.score_responses`` reads it) and/or reward functions, with the config's weights and guards
    (``reward_model_weight``, ``score_clip``, ``missing_eos_penalty``, ``forward_batch_size``, ``pack_length``)."""

    def __init__(
        self,
        reward_model: Any | None,
        reward_tokenizer: Any | None,
        functions: list[RewardFunction],
        config: Any,
    ) -> None:
        if reward_model is None and not functions:
            raise ValueError("no reward: give a reward model, reward_functions, or both")
        self.model, self.tokenizer, self.functions, self.config = (
            reward_model,
            reward_tokenizer,
            functions,
            config,
        )

    def __call__(
        self,
        messages: list[Messages],
        records: list[Mapping[str, Any]],
        texts: list[str],
        ended: torch.Tensor,
    ) -> Rewards:
        """Rewards of answers ``texts`` to prompts ``messages`` (chat form, for the reward model), whose data rows
        are ``records`` (for the functions); ``ended`` is True where the answer ended with eos."""
        config, device = self.config, ended.device
        total = torch.zeros(len(texts), dtype=torch.float32, device=device)
        out = Rewards(total)
        if self.model is not None:
            score = score_responses(
                self.model,
                self.tokenizer,
                messages,
                texts,
                config.forward_batch_size,
                device,
                pack_length=config.pack_length,
            ).float()
            if config.score_clip is not None:
                score = score.clamp(-config.score_clip, config.score_clip)
            out.model_score = score
            total += config.reward_model_weight * score
        if self.functions:
            prompts = [r.get("prompt") for r in records]
            keys = sorted({k for r in records for k in r if k != "prompt"})
            columns = {k: [r.get(k) for r in records] for k in keys}
            for fn in self.functions:
                values = call_reward_function(fn, prompts, texts, columns).to(device)
                out.functions[fn.name] = values
                total += fn.weight * values
        if config.missing_eos_penalty:
            total -= config.missing_eos_penalty * (~ended).float()
        return out
