"""Evaluate a tuned policy against its reference: drift (KL), preference fit, and diversity.

Alignment must not cost the model its generative range. This module measures how far the candidate moved away
from the reference (a KL estimate on the candidate's own samples), how well it ranks held-out preference pairs
(DPO implicit rewards, perplexity of the chosen answers) and whether its outputs stayed diverse (distinct-n,
length), and writes the generations and an HTML report a reviewer can read in the Kubeflow UI.

Definitions (also shown in the report):

- ``kl_candidate_reference``: KL(candidate || reference) per response, estimated as the mean over candidate
  samples of sum_t (log p_cand(y_t | x, y_<t) - log p_ref(y_t | x, y_<t)) over the sampled tokens, eos included.
  Both log-probabilities are the models' raw distributions (temperature 1, no top-p / top-k truncation), and the
  samples are drawn from exactly that candidate distribution (a dedicated sampling pass at temperature 1, top-p
  1, unless the display settings already are those), so the estimate is unbiased for the KL of responses of at
  most ``max_new_tokens`` tokens. It is >= 0 in expectation; a single estimate can be slightly negative when the
  models are (nearly) identical and is reported as is.
- ``kl_candidate_reference_per_token``: the same log-ratios summed over all samples, divided by the number of
  scored tokens.
- ``distinct_n_*``: unique n-grams / total n-grams over all responses of one model, n-grams taken inside each
  response on whitespace-separated words (so the score does not depend on the tokenizer).
- ``mean_length_*``: mean number of generated model tokens per response, eos not counted.
- On preference pairs: the implicit reward of a response is beta * (log pi_cand - log pi_ref) of its tokens
  given the prompt (DPO's reward); ``implicit_reward_accuracy`` is the share of pairs whose chosen reward is
  strictly higher, ``implicit_reward_margin`` the mean reward difference chosen - rejected, and
  ``chosen_perplexity_*`` is exp(total NLL / total tokens) of the chosen responses (completion tokens + eos).
- With a judge (a reward model): each displayed response is scored by it (prompt rendered with the judge's own
  chat template, response, eos; preftune.scoring.score_texts). ``judge_reward_candidate`` and
  ``judge_reward_reference`` are the mean rewards; ``win_rate_vs_reference`` is the share of prompts where the
  candidate's reward is higher, a tie counting half; ``judge_ties`` is the number of prompts whose two rewards
  are equal (identical responses are scored once, so they always tie). Each generations row then also carries
  ``candidate_reward`` and ``reference_reward``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from preftune import reports, templating
from preftune.data.readers import RawRow
from preftune.data.records import completion_text, read_artifact_rows, to_messages, write_jsonl
from preftune.losses import sequence_logprobs
from preftune.modeling import load_causal_lm, load_reward_model, load_tokenizer, resolve, set_seed
from preftune.scoring import score_texts
from preftune.templating import render_prompt, tokenize_pair

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class EvalConfig:
    """Settings of one evaluation run (the evaluate component exposes each field as a parameter)."""

    max_new_tokens: int = field(default=48, metadata={"help": "Most tokens generated per response."})
    temperature: float = field(
        default=0.7,
        metadata={
            "help": "Sampling temperature of the displayed generations (0 = greedy). Same for both models."
        },
    )
    top_p: float = field(
        default=0.9, metadata={"help": "Nucleus sampling threshold of the displayed generations (1 = off)."}
    )
    seed: int = field(
        default=0,
        metadata={"help": "Random seed; both models sample with it, so differences come from the models."},
    )
    beta: float = field(
        default=0.1,
        metadata={"help": "DPO beta scaling the implicit rewards on the held-out preference pairs."},
    )
    max_prompts: int = field(default=64, metadata={"help": "Evaluate on at most this many held-out prompts."})
    batch_size: int = field(
        default=16, metadata={"help": "Prompts (or sequences) per forward/generate batch."}
    )

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be >= 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if self.beta <= 0:
            problems.append("beta must be > 0")
        if self.max_prompts < 1:
            problems.append("max_prompts must be >= 1")
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.seed < 0:
            problems.append("seed must be >= 0")
        for name in ("temperature", "top_p", "beta"):
            if not abs(getattr(self, name)) < float("inf"):  # NaN passes every comparison above
                problems.append(f"{name} must be a finite number")
        if problems:
            raise ValueError("EvalConfig: " + "; ".join(problems))


@dataclass
class Generations:
    """Responses of one model to a list of prompts, as token ids (for scoring) and text (for display)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # generated tokens up to and including the first eos
    texts: list[str]
    lengths: list[int]  # generated tokens, eos not counted


# --------------------------------------------------------------------------------------------------- diversity


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts, on whitespace words; 0.0 when there are none.

    N-grams are taken inside each text (never across two), so the score measures repetition within and between
    responses; splitting on whitespace keeps it comparable across tokenizers.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for text in texts:
        words = text.split()
        for i in range(len(words) - n + 1):
            seen.add(tuple(words[i : i + n]))
            total += 1
    return len(seen) / total if total else 0.0


# -------------------------------------------------------------------------------------------------------- data


def _read_rows(path: str, what: str) -> list[RawRow]:
    """Rows of a JSONL file, or of every *.jsonl in a directory (local or s3), each with its file and line."""
    try:
        rows = read_artifact_rows(path)
    except FileNotFoundError:
        raise ValueError(f"{what} {path!r} does not exist") from None
    if not rows:
        raise ValueError(f"{what} {path!r} is empty: no rows to evaluate")
    return rows


def _prompt_messages(row: RawRow, what: str) -> Messages:
    """A row's prompt as chat messages (plain text becomes one user message), checked to say something."""
    record = row.record or {}
    where = f"{what} {row.file}, line {row.row}, field 'prompt'"
    if "prompt" not in record:
        raise ValueError(f"{where}: missing")
    messages = to_messages(record["prompt"], row.file, row.row, "prompt")
    if not messages or not any(m["content"].strip() for m in messages):
        raise ValueError(f"{where}: empty prompt")
    return messages


def _answer(row: RawRow, name: str) -> str:
    record = row.record or {}
    text = completion_text(record.get(name), row.file, row.row, name)
    if not text.strip():
        raise ValueError(f"eval pairs {row.file}, line {row.row}, field {name!r}: empty answer")
    return text


def _prompt_text(messages: Messages) -> str:
    """The prompt as a person reads it: the user's text, or role-labelled turns for a conversation."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The chat template writes its own special tokens (bos), so the tokenizer must not add them again.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------------- generation


def _batches(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _eos_ids(tokenizer: PreTrainedTokenizerBase, *models: PreTrainedModel) -> list[int]:
    """Every token that ends a response: the tokenizer's eos and each model's generation eos."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    candidates += [getattr(m.generation_config, "eos_token_id", None) for m in models]
    for value in candidates:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    if not ids:
        raise ValueError("the tokenizer has no eos token: responses could not end")
    return ids


def _generation_config(
    *, max_new_tokens: int, temperature: float, top_p: float, eos_ids: list[int], pad_id: int
) -> GenerationConfig:
    """Explicit sampling settings, so neither model's own generation_config.json changes them.

    Every processor that could reshape the distribution is set to its neutral value: only ``temperature`` and
    ``top_p`` act, identically for both models.
    """
    neutral: dict[str, Any] = {
        "top_k": 0,
        "typical_p": 1.0,
        "epsilon_cutoff": 0.0,
        "eta_cutoff": 0.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": 0,  # takes precedence over any min_length
        "num_beams": 1,
        "use_cache": True,
    }
    if temperature == 0:
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            **neutral,
        )
    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        **neutral,
    )


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
) -> Generations:
    """Sample one response per rendered prompt: left-padded batches, KV cache, stop at eos.

    The seed is set right before the first batch, so two models given the same prompts and settings draw the
    same random numbers and their differences come from the models alone.
    """
    eos_ids = eos_ids or _eos_ids(tokenizer, model)
    pad_id = templating.pad_id(tokenizer)
    config = _generation_config(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id
    )
    device = next(model.parameters()).device
    model.eval()
    encoded = [_encode(tokenizer, prompt) for prompt in prompts]
    out = Generations(prompt_ids=encoded, response_ids=[], texts=[], lengths=[])
    set_seed(seed)
    eos = set(eos_ids)
    for batch in tqdm(list(_batches(len(encoded), batch_size)), desc=desc, unit="batch"):
        rows = [encoded[i] for i in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for j, ids in enumerate(rows):  # left padding: every prompt ends where generation starts
            input_ids[j, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[j, width - len(ids) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            generation_config=config,
        )
        for row in generated[:, width:].tolist():
            end = next((k for k, token in enumerate(row) if token in eos), None)
            body = row if end is None else row[:end]
            out.response_ids.append(row if end is None else row[: end + 1])
            out.lengths.append(len(body))
            out.texts.append(tokenizer.decode(body, skip_special_tokens=True).strip())
    return out


# ------------------------------------------------------------------------------------------------------ scoring


def _max_positions(model: PreTrainedModel) -> int:
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


def score_pairs(
    candidate: PreTrainedModel,
    reference: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[Messages, str, str]],
    *,
    beta: float,
    batch_size: int,
) -> dict[str, float]:
    """DPO implicit-reward accuracy and margin, and chosen-response perplexity, on (prompt, chosen, rejected).

    Responses are scored as completion tokens followed by eos (an assistant turn ends with eos), after the
    prompt rendered by the chat template.
    """
    limit = min(_max_positions(candidate), _max_positions(reference))
    items: list[tuple[list[int], list[int]]] = []
    for messages, chosen, rejected in pairs:
        # The same tokenisation (and truncation) as DPO training, so the implicit rewards match its own.
        tokens = tokenize_pair(tokenizer, messages, chosen, rejected, limit)
        items.append((tokens["prompt_ids"], tokens["chosen_ids"]))
        items.append((tokens["prompt_ids"], tokens["rejected_ids"]))
    pad_id = templating.pad_id(tokenizer)
    cand = completion_logprobs(
        candidate, items, batch_size=batch_size, pad_id=pad_id, desc="pairs: candidate"
    )
    ref = completion_logprobs(reference, items, batch_size=batch_size, pad_id=pad_id, desc="pairs: reference")
    rewards = [beta * (a - b) for a, b in zip(cand, ref, strict=True)]
    margins = [rewards[i] - rewards[i + 1] for i in range(0, len(rewards), 2)]
    chosen_tokens = sum(len(c) for _, c in items[0::2])

    def perplexity(logps: list[float]) -> float:
        nll = -sum(logps[0::2]) / max(chosen_tokens, 1)
        return math.exp(min(nll, 700.0))  # capped so the metric stays a finite float

    return {
        "num_pairs": float(len(pairs)),
        "implicit_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
        "implicit_reward_margin": sum(margins) / len(margins),
        "chosen_perplexity_candidate": perplexity(cand),
        "chosen_perplexity_reference": perplexity(ref),
    }


# ---------------------------------------------------------------------------------------------------- the judge


@dataclass
class JudgeScores:
    """Rewards a judge (reward model) gave the candidate's and the reference's response to each prompt."""

    candidate: list[float]
    reference: list[float]


def _check_reward_model(ref: str) -> None:
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


def judge_generations(
    judge: str,
    prompts: Sequence[Messages],
    candidate_texts: Sequence[str],
    reference_texts: Sequence[str],
    *,
    batch_size: int,
) -> JudgeScores:
    """Score both models' responses to each prompt with a reward model.

    The judge reads text with its own tokenizer and chat template, so it need not share the policies'
    tokenizer. Each distinct (prompt, response) is scored once: identical responses get identical rewards.
    """
    _check_reward_model(judge)
    tokenizer = load_tokenizer(judge)
    model = load_reward_model(judge).to(_device()).eval()
    unique: dict[tuple[int, str], int] = {}
    for texts in (candidate_texts, reference_texts):
        for i, text in enumerate(texts):
            unique.setdefault((i, text), len(unique))
    keys = list(unique)
    rewards = score_texts(
        model, tokenizer, [prompts[i] for i, _ in keys], [text for _, text in keys], batch_size=batch_size
    )
    del model

    def lookup(texts: Sequence[str]) -> list[float]:
        return [rewards[unique[(i, text)]] for i, text in enumerate(texts)]

    return JudgeScores(candidate=lookup(candidate_texts), reference=lookup(reference_texts))


def judge_metrics(scores: JudgeScores) -> dict[str, float]:
    """Mean rewards, the candidate's win rate against the reference (a tie counts half) and the tie count."""
    pairs = list(zip(scores.candidate, scores.reference, strict=True))
    if not pairs:
        raise ValueError("judge: no responses to compare")
    wins = sum(c > r for c, r in pairs)
    ties = sum(c == r for c, r in pairs)
    return {
        "judge_reward_candidate": sum(scores.candidate) / len(pairs),
        "judge_reward_reference": sum(scores.reference) / len(pairs),
        "win_rate_vs_reference": (wins + 0.5 * ties) / len(pairs),
        "judge_ties": float(ties),
    }


# ------------------------------------------------------------------------------------------------------ report


_METHODS = """<ul>
<li><b>kl_candidate_reference</b>: KL(candidate || reference) per response, the mean over candidate samples of the
sum over sampled tokens (eos included) of log p_cand - log p_ref, both under the models' raw distributions
(temperature 1, no truncation). The samples for this estimate are drawn at temperature 1 and top-p 1, so it is
unbiased; it can be slightly negative when the models are nearly identical.
<b>kl_candidate_reference_per_token</b> divides the same total by the number of sampled tokens.</li>
<li><b>distinct_1 / distinct_2</b>: unique / total word n-grams (whitespace split) over all responses of one model.</li>
<li><b>mean_length</b>: generated model tokens per response, eos not counted.</li>
<li><b>implicit_reward_*</b> (held-out pairs): reward = beta * (log pi_cand - log pi_ref) of a response given its
prompt; accuracy = share of pairs where the chosen reward is strictly higher; margin = mean chosen - rejected.</li>
<li><b>chosen_perplexity_*</b>: exp(mean NLL per token) of the chosen responses (completion tokens and eos).</li>
<li><b>judge_*</b> (with a judge reward model): mean reward of each model's displayed responses;
<b>win_rate_vs_reference</b> = share of prompts where the candidate's reward is higher, a tie counting half;
<b>judge_ties</b> = number of prompts with equal rewards (identical responses always tie).</li>
</ul>"""


def _report(
    metrics: Mapping[str, float],
    rows: Sequence[Mapping[str, str]],
    *,
    candidate: str,
    reference: str,
    config: EvalConfig,
    judge: str | None,
) -> str:
    distinct = {
        f"{name} {who}": metrics[f"{name.replace('-', '_')}_{who}"]
        for name in ("distinct-1", "distinct-2")
        for who in ("candidate", "reference")
    }
    lengths = {who: metrics[f"mean_length_{who}"] for who in ("candidate", "reference")}
    charts = reports.bar_chart(distinct, "Distinct n-grams (higher = more diverse)", "unique / total")
    charts += reports.bar_chart(lengths, "Mean response length", "tokens")
    columns = ["prompt", "candidate", "reference"]
    sections = [
        ("Metrics", reports.key_values(dict(metrics))),
        ("Diversity and length: candidate vs reference", charts),
    ]
    if judge is not None:
        columns += ["candidate_reward", "reference_reward"]
        sections.append(("Judge: reward-model scores", _judge_section(metrics, rows, judge)))
    sections += [
        ("How the metrics are computed", _METHODS),
        ("Settings", reports.key_values(asdict(config))),
        ("Generations (same prompts, same seed)", reports.table(rows, columns)),
    ]
    intro = f"Candidate {candidate} compared with reference {reference}."
    return reports.page("preftune evaluation", sections, intro=intro)


def _judge_section(metrics: Mapping[str, float], rows: Sequence[Mapping[str, Any]], judge: str) -> str:
    n = len(rows)
    wins = sum(r["candidate_reward"] > r["reference_reward"] for r in rows)
    ties = int(metrics["judge_ties"])
    outcome = {"candidate wins": wins / n, "ties": ties / n, "reference wins": (n - wins - ties) / n}
    means = {
        "candidate": metrics["judge_reward_candidate"],
        "reference": metrics["judge_reward_reference"],
    }
    text = (
        f"<p>Judge <code>{reports.escape(judge)}</code> scored both responses to each of {n} prompts: the "
        f"candidate wins {metrics['win_rate_vs_reference']:.1%} (ties counted half, {ties} ties).</p>"
    )
    return (
        text
        + reports.bar_chart(outcome, "Per-prompt outcome under the judge", "share of prompts")
        + reports.bar_chart(means, "Mean judge reward", "reward")
    )


# ------------------------------------------------------------------------------------------------------ driver


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _read_prompts(path: str, limit: int) -> list[Messages]:
    return [_prompt_messages(row, "eval prompts") for row in _read_rows(path, "eval prompts")[:limit]]


def _read_pairs(path: str) -> list[tuple[Messages, str, str]]:
    return [
        (_prompt_messages(row, "eval pairs"), _answer(row, "chosen"), _answer(row, "rejected"))
        for row in _read_rows(path, "eval pairs")
    ]


def evaluate(
    candidate: str,
    reference: str,
    eval_prompts: str,
    eval_pairs: str | None,
    generations_path: str,
    report_path: str,
    config: EvalConfig,
    *,
    judge: str | None = None,
) -> dict[str, float]:
    """Compare a candidate model with its reference; write generations JSONL and an HTML report.

    Args:
        candidate: Model reference of the tuned policy (directory, s3:// URI or hub id; adapters are merged).
        reference: Model reference it is compared with (the SFT model for DPO and PPO).
        eval_prompts: JSONL file or directory of held-out rows with a ``prompt`` (text or chat messages).
        eval_pairs: Optional JSONL of held-out preference pairs (``prompt``, ``chosen``, ``rejected``).
        generations_path: Where to write ``{"prompt", "candidate", "reference"}`` rows, one per prompt (with a
            judge, also ``candidate_reward`` and ``reference_reward``).
        report_path: Where to write the HTML report.
        config: Sampling and scoring settings.
        judge: Optional reward model reference (a reward-model artifact, e.g. from the reward_model step): scores
            both models' responses; adds the ``judge_*`` metrics, ``win_rate_vs_reference`` and a per-prompt
            ``candidate_reward`` / ``reference_reward`` in the generations.

    Returns:
        Flat metrics: see the module docstring for each name's definition.
    """
    prompts = _read_prompts(eval_prompts, config.max_prompts)  # fail on bad input before loading models
    pairs = _read_pairs(eval_pairs) if eval_pairs else None
    if judge is not None:
        # A missing judge, or one that is no reward model, fails now rather than after generating.
        judge = resolve(judge)
        _check_reward_model(judge)

    tokenizer = load_tokenizer(candidate)
    if tokenizer.get_vocab() != load_tokenizer(reference).get_vocab():
        raise ValueError(
            f"candidate {candidate} and reference {reference} use different tokenizers: "
            "KL and implicit rewards compare token probabilities, so they must share one"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {candidate} has no chat template: prompts could not be rendered")
    device = _device()
    cand_model = load_causal_lm(candidate).to(device).eval()
    ref_model = load_causal_lm(reference).to(device).eval()
    eos_ids = _eos_ids(tokenizer, cand_model, ref_model)
    pad_id = templating.pad_id(tokenizer)

    rendered = [render_prompt(tokenizer, messages) for messages in prompts]
    sampling = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "eos_ids": eos_ids,
    }
    cand_gen = generate_responses(cand_model, tokenizer, rendered, desc="generate: candidate", **sampling)
    ref_gen = generate_responses(ref_model, tokenizer, rendered, desc="generate: reference", **sampling)

    if config.temperature == 1.0 and config.top_p == 1.0:
        kl_samples = cand_gen  # the display samples already come from the raw distribution
    else:
        unbiased = {**sampling, "temperature": 1.0, "top_p": 1.0}
        kl_samples = generate_responses(
            cand_model, tokenizer, rendered, desc="kl: sample candidate", **unbiased
        )
    kl, kl_token = estimate_kl(cand_model, ref_model, kl_samples, batch_size=config.batch_size, pad_id=pad_id)

    metrics: dict[str, float] = {
        "num_prompts": float(len(prompts)),
        "kl_candidate_reference": float(kl),
        "kl_candidate_reference_per_token": float(kl_token),
        "distinct_1_candidate": distinct_n(cand_gen.texts, 1),
        "distinct_2_candidate": distinct_n(cand_gen.texts, 2),
        "distinct_1_reference": distinct_n(ref_gen.texts, 1),
        "distinct_2_reference": distinct_n(ref_gen.texts, 2),
        "mean_length_candidate": sum(cand_gen.lengths) / len(cand_gen.lengths),
        "mean_length_reference": sum(ref_gen.lengths) / len(ref_gen.lengths),
    }
    if pairs:
        metrics.update(
            score_pairs(
                cand_model,
                ref_model,
                tokenizer,
                pairs,
                beta=config.beta,
                batch_size=config.batch_size,
            )
        )
    rows: list[dict[str, Any]] = [
        {"prompt": _prompt_text(messages), "candidate": c, "reference": r}
        for messages, c, r in zip(prompts, cand_gen.texts, ref_gen.texts, strict=True)
    ]
    if judge is not None:
        scores = judge_generations(
            judge, prompts, cand_gen.texts, ref_gen.texts, batch_size=config.batch_size
        )
        metrics.update(judge_metrics(scores))
        for row, c, r in zip(rows, scores.candidate, scores.reference, strict=True):
            row["candidate_reward"], row["reference_reward"] = c, r
    write_jsonl(generations_path, rows)
    reports.write(
        report_path,
        _report(metrics, rows, candidate=candidate, reference=reference, config=config, judge=judge),
    )
    log.info("evaluation: %s", json.dumps(metrics))
    return metrics
