"""Evaluate a tuned policy against its reference: drift (KL), preference fit, and diversity.

Alignment must not cost the model its generative range. This module measures how far the candidate moved away
from the reference (a KL estimate on the candidate's own samples), how well it ranks held-out preference pairs
(DPO implicit rewards, perplexity of the chosen answers) and whether its outputs stayed diverse (distinct-n,
length), and writes the generations and an HTML report a reviewer can read in the Kubeflow UI.

Which policy is the candidate: with training snapshots, every snapshot and the final policy are measured the same
way (preftune.eval.frontier) and the best one inside the gate's bounds is chosen (preftune.eval.selection); the
metrics below are then that policy's, and ``selected_path`` receives a copy of it for the gate and promote.

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
  strictly higher, ``implicit_reward_margin`` the mean reward difference chosen - rejected (both only for a
  policy of the DPO family: for PPO, GRPO or RLOO the log-ratio is no reward it was trained on), and
  ``chosen_perplexity_*`` is exp(total NLL / total tokens) of the chosen responses (completion tokens + eos).
- ``diversity_ratio_vs_reference``: ``distinct_2_candidate / distinct_2_reference`` (absent when the reference
  has no bigrams): below 1 the candidate repeats itself more than the model it started from.
- With a judge (a reward model): each displayed response is scored by it (prompt rendered with the judge's own
  chat template, response, eos; preftune.model.scoring.score_texts). ``judge_reward_<model>`` is the mean reward of
  a model's responses; ``win_rate_vs_<model>`` (reference, champion) is the share of prompts where the
  candidate's reward is higher, a tie counting half; ``lc_win_rate_vs_<model>`` is the length-controlled win
  rate (preftune.eval.winrate: the win probability at equal response length in words, from a logistic model of the
  outcome on the length difference) with ``length_coefficient_vs_<model>`` the fitted effect of length;
  ``judge_ties_vs_<model>`` counts prompts whose rewards are equal (identical responses are scored once, so they
  always tie). Each generations row then also carries ``<model>_reward``. ``judge_reward_gain`` is the
  candidate's gain over the reference in the judge's standard deviations (preftune.eval.frontier).
- With a held-out judge (a second reward model, trained on preferences the training reward model never saw):
  ``heldout_reward_candidate`` / ``_reference``, ``heldout_win_rate_vs_reference``, ``heldout_judge_ties_vs_
  reference`` and ``heldout_reward_gain``, as above; rows carry ``<model>_heldout_reward``. The gate's
  reward-hacking guard compares the two gains.
- With a champion (the registry's current model): it answers the same prompts with the same settings;
  ``distinct_*_champion`` and ``mean_length_champion`` describe it, and with a judge the candidate is compared
  with it as above.
- With training snapshots: ``frontier_points`` counts the points of the reward-vs-KL chart (the reference, the
  snapshots, the final policy); ``selection_points`` the policies considered, ``selection_in_bounds`` those
  inside the bounds, ``selected_step`` the chosen one's training step and ``selected_final`` 1 when it is the
  final policy.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.config.evaluate import EvalConfig
from preftune.data.readers import RawRow
from preftune.data.records import completion_text, read_artifact_rows, to_messages, write_jsonl
from preftune.eval.evaluation_report import Names, Page, render
from preftune.eval.frontier import FrontierProbe, Measured, distinct_n, y_metric
from preftune.eval.judge import Judge, check_reward_model
from preftune.eval.selection import Bounds, select
from preftune.eval.winrate import length_controlled_win_rate, win_rate
from preftune.model.generation.stage import require_backend, stage_backend
from preftune.model.modeling import load_causal_lm, load_tokenizer, read_lineage, resolve
from preftune.model.precision import resolve_precision
from preftune.model.sampling import Generations, PairScorer, eos_ids_of, generate_responses
from preftune.model.templating import render_prompt
from preftune.report import html as reports
from preftune.train.snapshots import read_index

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

__all__ = ["EvalConfig", "distinct_n", "evaluate", "judge_metrics", "words"]

#: Training stages whose policy is no DPO implicit-reward model: implicit-reward metrics mean nothing for them.
RL_STAGES = ("ppo", "grpo", "rloo")


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


# ---------------------------------------------------------------------------------------------------- the judge


def words(text: str) -> int:
    """Length of a response in whitespace words: comparable across models with different tokenizers."""
    return len(text.split())


def judge_metrics(
    candidate: Sequence[float],
    other: Sequence[float],
    candidate_lengths: Sequence[float],
    other_lengths: Sequence[float],
    *,
    name: str,
) -> dict[str, float]:
    """The candidate against ``name`` (reference, champion) under the judge: mean rewards, raw and
    length-controlled win rates (ties count half) and the tie count."""
    if not candidate:
        raise ValueError("judge: no responses to compare")
    lc = length_controlled_win_rate(candidate, other, candidate_lengths, other_lengths)
    return {
        "judge_reward_candidate": sum(candidate) / len(candidate),
        f"judge_reward_{name}": sum(other) / len(other),
        f"win_rate_vs_{name}": win_rate(candidate, other),
        f"lc_win_rate_vs_{name}": lc.win_rate,
        f"length_coefficient_vs_{name}": lc.length_coefficient,
        f"judge_ties_vs_{name}": float(sum(c == o for c, o in zip(candidate, other, strict=True))),
    }


def heldout_metrics(candidate: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    """The held-out judge's view of the candidate against the reference: mean rewards, win rate, ties."""
    return {
        "heldout_reward_candidate": sum(candidate) / len(candidate),
        "heldout_reward_reference": sum(reference) / len(reference),
        "heldout_win_rate_vs_reference": win_rate(candidate, reference),
        "heldout_judge_ties_vs_reference": float(
            sum(c == o for c, o in zip(candidate, reference, strict=True))
        ),
    }


# ------------------------------------------------------------------------------------------------------ driver


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_model(ref: str, config: EvalConfig) -> Any:
    """A causal LM on this machine's device, in eval mode, its weights in the compute dtype of the precision."""
    dtype = resolve_precision(config.precision).compute_dtype
    model = load_causal_lm(ref, dtype=dtype, attn_implementation=config.attn_implementation)
    return model.to(_device()).eval()


def _read_prompts(path: str, limit: int) -> list[Messages]:
    return [_prompt_messages(row, "eval prompts") for row in _read_rows(path, "eval prompts")[:limit]]


def _read_pairs(path: str) -> list[tuple[Messages, str, str]]:
    return [
        (_prompt_messages(row, "eval pairs"), _answer(row, "chosen"), _answer(row, "rejected"))
        for row in _read_rows(path, "eval pairs")
    ]


@dataclass
class _Inputs:
    """What the models are evaluated on: read and checked (with the generation backend's availability) before any
    model is loaded, so bad input fails fast."""

    prompts: list[Messages]
    pairs: list[tuple[Messages, str, str]] | None
    snapshots: list[dict[str, Any]]


def _read_inputs(
    eval_prompts: str, eval_pairs: str | None, checkpoints: str | None, config: EvalConfig
) -> _Inputs:
    require_backend(config)  # vllm where it cannot run: refused before anything is read or loaded
    prompts = _read_prompts(eval_prompts, config.max_prompts)
    pairs = _read_pairs(eval_pairs) if eval_pairs else None
    return _Inputs(prompts, pairs, read_index(checkpoints) if checkpoints else [])


def _resolve_names(
    candidate: str, reference: str, judge: str | None, heldout_judge: str | None, champion: str | None
) -> Names:
    """A missing judge, or one that is no reward model, fails now rather than after generating."""
    judges = []
    for ref in (judge, heldout_judge):
        if ref is not None:
            ref = resolve(ref)
            check_reward_model(ref)
        judges.append(ref)
    if champion:
        champion = resolve(champion)
    return Names(candidate, reference, judges[0], judges[1], champion)


@dataclass
class _Session:
    """What every generation and measurement of one evaluation shares: the final candidate and the reference
    (on one device, with their one tokenizer), the prompts rendered for them, and the display sampling
    settings (``backend``: the generation backend every policy is sampled with)."""

    cand_model: Any
    ref_model: Any
    tokenizer: Any
    prompts: list[Messages]
    rendered: list[str]
    sampling: dict[str, Any]
    config: EvalConfig


def _open_session(names: Names, prompts: list[Messages], config: EvalConfig) -> _Session:
    """Load both models after checking that they share a tokenizer with a chat template."""
    tokenizer = load_tokenizer(names.candidate)
    if tokenizer.get_vocab() != load_tokenizer(names.reference).get_vocab():
        raise ValueError(
            f"candidate {names.candidate} and reference {names.reference} use different tokenizers: "
            "KL and implicit rewards compare token probabilities, so they must share one"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {names.candidate} has no chat template: prompts could not be rendered"
        )
    cand_model = _load_model(names.candidate, config)
    ref_model = _load_model(names.reference, config)
    sampling = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "eos_ids": eos_ids_of(tokenizer, cand_model, ref_model),
    }
    rendered = [render_prompt(tokenizer, messages) for messages in prompts]
    # one backend for every policy measured: generate_responses hands it each policy's weights in turn
    sampling["backend"] = _backend(ref_model, tokenizer, rendered, names.reference, config)
    return _Session(cand_model, ref_model, tokenizer, prompts, rendered, sampling, config)


def _backend(model: Any, tokenizer: Any, rendered: Sequence[str], ref: str, config: EvalConfig) -> Any:
    """The generation backend of the config's settings; a vLLM engine starts from ``ref``'s weights with room for
    the longest prompt and ``max_new_tokens`` (preftune.model.generation.stage)."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rendered), default=1)
    return stage_backend(model, config, model_ref=ref, max_model_len=longest + config.max_new_tokens)


def _champion_responses(
    champion: str, prompts: Sequence[Messages], sampling: Mapping[str, Any], config: EvalConfig
) -> Generations:
    """The champion's answers under the same sampling settings, with its own tokenizer and chat template."""
    tokenizer = load_tokenizer(champion)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of champion {champion} has no chat template")
    model = _load_model(champion, config)
    rendered = [render_prompt(tokenizer, messages) for messages in prompts]
    settings = {k: v for k, v in sampling.items() if k not in ("eos_ids", "backend")}
    backend = _backend(model, tokenizer, rendered, champion, config)  # its architecture may differ
    try:
        generations = generate_responses(
            model, tokenizer, rendered, desc="generate: champion", backend=backend, **settings
        )
    finally:
        backend.close()
    del model
    return generations


def _judges(names: Names, config: EvalConfig) -> dict[str, Judge]:
    """The judges by role (``judge``, ``heldout_judge``), loaded once for every point."""
    options = {
        "batch_size": config.batch_size,
        "device": _device(),
        "max_length": config.max_length,
        "dtype": resolve_precision(config.precision).compute_dtype,
        "attn_implementation": config.attn_implementation,
    }
    found = {"judge": names.judge, "heldout_judge": names.heldout_judge}
    return {role: Judge(ref, **options) for role, ref in found.items() if ref is not None}


def _final_step(candidate: str, snapshots: Sequence[Mapping[str, Any]]) -> float:
    """The candidate's training step count from its lineage, else one past the last snapshot."""
    trained = read_lineage(candidate).get("metrics", {})
    final_step = trained.get("steps") or trained.get("iterations")
    if not isinstance(final_step, (int, float)):
        final_step = max((s["step"] for s in snapshots), default=0) + 1
    return final_step


def _implicit_rewards_apply(candidate: str) -> bool:
    """False for a policy trained by RL (its lineage says so): DPO's implicit reward is no reward of its."""
    stage = str(read_lineage(candidate).get("stage", ""))
    return not any(stage == s or stage.startswith(f"{s}-") for s in RL_STAGES)


@dataclass
class _Policies:
    """Every policy the evaluation measured: the reference, then the snapshots and the final one, in step order
    (``paths`` gives each non-reference point's model reference)."""

    reference: Measured
    candidates: list[Measured]
    paths: list[str]

    def points(self) -> list[dict[str, Any]]:
        return [self.reference.point] + [m.point for m in self.candidates]


def _measure_policies(
    session: _Session, probe: FrontierProbe, inputs: _Inputs, candidate: str, scored: bool
) -> _Policies:
    """The reference and the final policy always; the snapshots too when there is something to score them by."""
    reference = probe.measure(session.ref_model, label="reference", step=0, is_reference=True)
    measured, paths = [], []
    for snap in inputs.snapshots if scored else []:
        model = _load_model(snap["path"], session.config)
        measured.append(probe.measure(model, label=f"step {snap['step']}", step=snap["step"]))
        paths.append(snap["path"])
        del model
    step = _final_step(candidate, inputs.snapshots)
    measured.append(probe.measure(session.cand_model, label="final", step=step))
    paths.append(candidate)
    return _Policies(reference, measured, paths)


def _choose(policies: _Policies, config: EvalConfig) -> tuple[int, str, int]:
    """The index of the candidate among the measured policies, why, and how many were inside the bounds."""
    final = len(policies.candidates) - 1
    if not config.select_snapshot or final == 0:
        why = "The final policy is the candidate (" + (
            "select_snapshot is off)."
            if not config.select_snapshot
            else "the run kept no snapshots to choose from)."
        )
        return final, why, 0
    bounds = Bounds(config.max_kl, config.min_diversity_ratio, config.min_judge_confirmation)
    selection = select([m.point for m in policies.candidates], policies.reference.point, bounds)
    return selection.index, selection.reason, selection.in_bounds


def _diversity(generations: Generations, who: str) -> dict[str, float]:
    return {
        f"distinct_1_{who}": distinct_n(generations.texts, 1),
        f"distinct_2_{who}": distinct_n(generations.texts, 2),
        f"mean_length_{who}": sum(generations.lengths) / len(generations.lengths),
    }


def _drift_and_diversity(
    chosen: Measured, reference: Measured, champion: Generations | None
) -> dict[str, float]:
    """KL of the chosen candidate to the reference, and each model's distinct-n and response length."""
    metrics: dict[str, float] = {
        "num_prompts": float(len(chosen.display.texts)),
        "kl_candidate_reference": chosen.point["kl"],
        "kl_candidate_reference_per_token": chosen.point["kl_per_token"],
        **_diversity(chosen.display, "candidate"),
        **_diversity(reference.display, "reference"),
    }
    if champion is not None:
        metrics.update(_diversity(champion, "champion"))
    if metrics["distinct_2_reference"] > 0:
        metrics["diversity_ratio_vs_reference"] = (
            metrics["distinct_2_candidate"] / metrics["distinct_2_reference"]
        )
    return metrics


def _generation_rows(prompts: Sequence[Messages], texts: Mapping[str, list[str]]) -> list[dict[str, Any]]:
    """One row per prompt: the prompt as a person reads it and each model's response."""
    return [
        {"prompt": _prompt_text(m), **{who: texts[who][i] for who in texts}} for i, m in enumerate(prompts)
    ]


def _judge_responses(
    judges: Mapping[str, Judge],
    prompts: Sequence[Messages],
    texts: Mapping[str, list[str]],
    rows: list[dict[str, Any]],
) -> dict[str, float]:
    """The judges' verdicts on the candidate against every other model (the held-out judge: against the
    reference); each row gets each model's rewards."""
    metrics: dict[str, float] = {}
    lengths = {who: [words(t) for t in texts[who]] for who in texts}
    for role, judge in judges.items():
        models = list(texts) if role == "judge" else ["candidate", "reference"]
        rewards = {who: judge.score(prompts, texts[who]) for who in models}
        suffix = "_reward" if role == "judge" else "_heldout_reward"
        for i, row in enumerate(rows):
            row.update({f"{who}{suffix}": rewards[who][i] for who in models})
        if role == "heldout_judge":
            metrics.update(heldout_metrics(rewards["candidate"], rewards["reference"]))
            continue
        for who in models[1:]:
            metrics.update(
                judge_metrics(
                    rewards["candidate"], rewards[who], lengths["candidate"], lengths[who], name=who
                )
            )
    return metrics


def _pair_metrics(pairs: PairScorer | None, chosen: Measured, model: Any, implicit: bool) -> dict[str, float]:
    """Held-out pair metrics of the candidate: perplexity always, implicit rewards for DPO-family policies."""
    if pairs is None:
        return {}
    scores = chosen.pair_scores or pairs.score(model)
    return {k: v for k, v in scores.items() if implicit or not k.startswith("implicit_reward")}


def _probe(session: _Session, inputs: _Inputs, judges: Mapping[str, Judge]) -> FrontierProbe:
    """What every policy is measured with; held-out pairs are scored against the reference loaded once."""
    pairs = None
    if inputs.pairs:
        config = session.config
        pairs = PairScorer(
            session.ref_model,
            session.tokenizer,
            inputs.pairs,
            beta=config.beta,
            batch_size=config.batch_size,
            max_length=config.max_length,
        )
    return FrontierProbe(
        session.ref_model,
        session.tokenizer,
        session.prompts,
        session.rendered,
        session.sampling,
        judges,
        pairs,
    )


def _selection_metrics(
    chosen: Measured, points: Sequence[Mapping[str, Any]], considered: int, inside: int, final: bool
) -> dict[str, float]:
    """Each judge's gain for the gate's reward-hacking guard, and what the selection considered and chose."""
    metrics = {
        "frontier_points": float(sum(p.get(y_metric(points)[0]) is not None for p in points)),
        "selection_points": float(considered),
        "selection_in_bounds": float(inside),
        "selected_step": float(chosen.point["step"]),
        "selected_final": float(final),
    }
    for key, name in (("reward_gain", "judge_reward_gain"), ("heldout_reward_gain", "heldout_reward_gain")):
        if key in chosen.point:
            metrics[name] = chosen.point[key]
    return metrics


def _write_selected(path: str, selected_path: str) -> None:
    """A copy of the chosen policy's artifact (an adapter keeps naming its parent, so it loads as before)."""
    target = Path(selected_path)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(resolve(path), target)


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
    heldout_judge: str | None = None,
    champion: str | None = None,
    checkpoints: str | None = None,
    frontier_path: str | None = None,
    selected_path: str | None = None,
) -> dict[str, float]:
    """Choose the candidate among a training run's policies, compare it with its reference (and the champion);
    write generations and an HTML report.

    Args:
        candidate: Model reference of the tuned policy (directory, s3:// URI or hub id; adapters are merged).
        reference: Model reference it is compared with (the SFT model for DPO and PPO).
        eval_prompts: JSONL file or directory of held-out rows with a ``prompt`` (text or chat messages).
        eval_pairs: Optional JSONL of held-out preference pairs (``prompt``, ``chosen``, ``rejected``).
        generations_path: Where to write ``{"prompt", "candidate", "reference"}`` rows, one per prompt (with a
            champion also ``champion``; with judges each model's ``<model>_reward`` / ``<model>_heldout_reward``).
        report_path: Where to write the HTML report.
        config: Sampling, scoring and selection settings.
        judge: Optional reward model reference (a reward-model artifact, e.g. from the reward_model step): scores
            every model's responses; adds the ``judge_*``, ``win_rate_vs_*`` and ``lc_win_rate_vs_*`` metrics.
        heldout_judge: Optional second reward model, trained on preferences the judge never saw: the
            ``heldout_*`` metrics; it ranks the snapshots and checks that the judge's gain is real.
        champion: Optional model reference of the current champion (the registry's): it answers the same
            prompts with the same settings; with a judge, ``win_rate_vs_champion`` and
            ``lc_win_rate_vs_champion`` compare the candidate with it.
        checkpoints: Optional snapshot directory of the training step (preftune.train.snapshots): each snapshot
            becomes a point of the reward-vs-KL chart and may be chosen as the candidate.
        frontier_path: Where to write the reward-vs-KL points as JSONL (``label``, ``step``, ``kl``, ``reward``
            or ``implicit_reward_accuracy``, ``in_bounds``, ``chosen``, ...), for comparisons across runs.
        selected_path: Where to copy the chosen policy's model artifact (the gate and promote take it).

    Returns:
        Flat metrics of the chosen candidate: see the module docstring for each name's definition.
    """
    inputs = _read_inputs(eval_prompts, eval_pairs, checkpoints, config)
    names = _resolve_names(candidate, reference, judge, heldout_judge, champion)
    session = _open_session(names, inputs.prompts, config)
    try:
        judges = _judges(names, config)
        probe = _probe(session, inputs, judges)
        policies = _measure_policies(session, probe, inputs, candidate, scored=bool(judges or probe.pairs))
    finally:
        session.sampling["backend"].close()  # one engine at a time: the champion's comes next
    index, reason, inside = _choose(policies, config)
    chosen, chosen_path = policies.candidates[index], policies.paths[index]
    final = index == len(policies.candidates) - 1
    model = session.cand_model if final else _load_model(chosen_path, config)
    champ = (
        _champion_responses(names.champion, inputs.prompts, session.sampling, config)
        if names.champion
        else None
    )
    metrics = _drift_and_diversity(chosen, policies.reference, champ)
    metrics.update(_pair_metrics(probe.pairs, chosen, model, _implicit_rewards_apply(candidate)))
    texts = {"candidate": chosen.display.texts, "reference": policies.reference.display.texts}
    if champ is not None:
        texts["champion"] = champ.texts
    rows = _generation_rows(inputs.prompts, texts)
    metrics.update(_judge_responses(judges, inputs.prompts, texts, rows))
    points = policies.points() if len(policies.candidates) > 1 or policies.reference.rewards else []
    metrics.update(_selection_metrics(chosen, points, len(policies.candidates), inside, final))
    write_jsonl(generations_path, rows)
    if frontier_path:
        write_jsonl(frontier_path, points)
    if selected_path:
        _write_selected(chosen_path, selected_path)
    page = Page(metrics, rows, points, reason, dataclasses.replace(names, candidate=chosen_path), config)
    reports.write(report_path, render(page))
    log.info("evaluation: %s", json.dumps(metrics))
    return metrics
