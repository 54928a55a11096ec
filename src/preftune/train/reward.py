"""Reward model: a one-scalar head on the SFT model, trained to imitate human preferences.

The reward model is the SFT model with a sequence-classification head (``num_labels=1``), so it reads text
exactly as the policy writes it: the chat-template-rendered prompt, the response, and eos (the same tokens as
DPO, preftune.model.templating.tokenize_pair). It reads its score at the last non-padding token; batches are
right-padded with the model's own ``config.pad_token_id`` (see preftune.model.scoring), the id it has again when the
artifact is loaded, so that training and scoring read the same token.

Two objectives:

- ``pairwise`` (default): Bradley-Terry, ``-log sigmoid(r_chosen - r_rejected - margin)``; with ``use_margin``
  a pair's ``margin`` (rank gap, normalised score difference, severity; times ``margin_scale``) is subtracted as
  in Llama 2's margin loss, and pairs without one use 0.
- ``regression``: MSE between each response's reward and its normalised score (``scores`` on pairs made from
  scalar ratings, docs/contracts.md). A pair without scores is an error naming its file and row.

Chosen and rejected answers of a batch go through the model together, in one forward pass. By default
(``prefix_sharing``, ``pack_length``) a pair is one document ``prompt + chosen + rejected`` whose rejected tokens
attend to the prompt but not to the chosen ones, with position ids restarting after the prompt (so the prompt
runs once, not twice), and documents are packed into rows of up to ``pack_length`` tokens with a block mask
(preftune.train.batching.pack_documents: no padding). Each answer's score is then read at the packed position
of the token where the classifier pools ``prompt + answer`` scored alone (:func:`score_position`), so training,
evaluation and the saved model's later scoring (preftune.model.scoring) read the same token of the same context. With
both levers off, the batch is 2B right-padded rows pooled by the classifier itself.

Training runs to convergence: the engine evaluates on the held-out pairs every ``eval_steps`` and at each epoch's
end, stops after ``early_stopping_patience`` evaluations without a better accuracy, and ends with the weights of
the best evaluation (ties: the lower loss; preftune.train.engine.stopping). With ``pair_subset`` the training
pairs are split by prompt (:func:`split_by_prompt`): ``policy`` trains the reward model PPO optimises,
``judge`` a held-out judge on prompts it never sees, which the evaluate step uses to check that PPO's gain is
not reward hacking.

Held-out metrics (on the eval pairs, whatever the objective): ``eval_accuracy`` (share of pairs with
r_chosen > r_rejected; a tie is not a win), ``eval_mean_margin`` (mean r_chosen - r_rejected) and
``eval_accuracy_margin_<bucket>``: accuracy by the data's own margin. Buckets: ``none`` (pairs without a
margin), then ``low`` / ``mid`` / ``high`` split at the 1/3 and 2/3 quantiles of the eval pairs' margins
(``low``: m <= q1, ``mid``: q1 < m <= q2, ``high``: m > q2). Quantiles keep the buckets meaningful for every
margin scale (rank gaps, z-score differences); the thresholds are in the report. An empty bucket has no metric.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from preftune.config.reward import RewardConfig, validate
from preftune.io import storage
from preftune.model import modeling
from preftune.model.losses import bradley_terry_loss, reward_regression_loss
from preftune.model.scoring import reward_pad_id, rewards_from_batch
from preftune.model.templating import eos_id, pad_id
from preftune.report import html as reports
from preftune.train.batching import (
    PROMPT,
    DataError,
    PairCollator,
    Part,
    load_pair_features,
    pack_documents,
    read_rows,
)
from preftune.train.engine import Artifact, Engine, EpochTrainer, Loss, Resumable, Run, StopRule, fit
from preftune.train.loop import History, config_rows, lora_options, make_optimizer, ready_for_training
from preftune.train.packed import check_kernel, classifier_outputs_at

log = logging.getLogger(__name__)

BUCKETS: tuple[str, ...] = ("none", "low", "mid", "high")


# -------------------------------------------------------------------------------------------------------- data


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def load_reward_features(
    path: str, tokenizer: Any, max_length: int, *, need_scores: bool
) -> list[dict[str, Any]]:
    """Tokenised preference pairs (as preftune.train.batching.load_pair_features) with ``margin`` (a float, NaN
    when the pair has none) and, when the pairs carry them, ``score_chosen`` / ``score_rejected``.

    Raises DataError naming the file, row and field for a bad ``margin``, and, with ``need_scores`` (the
    regression objective), for a pair without numeric ``scores.chosen`` / ``scores.rejected``.
    """
    local = str(storage.local_path(path))  # s3:// pairs are downloaded once
    features = load_pair_features(local, tokenizer, max_length)
    rows = read_rows(local)
    if len(rows) != len(features):  # both read the same files in the same order
        raise DataError(f"{path}: read {len(rows)} rows but tokenised {len(features)} pairs")
    for feature, (file, row, record) in zip(features, rows, strict=True):
        where = f"{file}: row {row}"
        margin = record.get("margin")
        if margin is None:
            feature["margin"] = math.nan
        else:
            number = _number(margin)
            if number is None or number < 0:
                raise DataError(
                    f"{where}: field 'margin': expected a non-negative number or null, got {margin!r}"
                )
            feature["margin"] = number
        scores = record.get("scores")
        if isinstance(scores, dict) and all(
            _number(scores.get(k)) is not None for k in ("chosen", "rejected")
        ):
            feature["score_chosen"] = float(scores["chosen"])
            feature["score_rejected"] = float(scores["rejected"])
        elif need_scores:
            what = "missing" if scores is None else f"got {scores!r}"
            raise DataError(
                f"{where}: field 'scores': the regression objective needs each pair's normalised scores "
                f'{{"chosen": number, "rejected": number}} ({what}); pairs made from scalar ratings carry them, '
                "otherwise use objective='pairwise'"
            )
    return features


def split_by_prompt(
    features: list[dict[str, Any]], subset: str, fraction: float, seed: int
) -> list[dict[str, Any]]:
    """The pairs of ``subset``: ``all``; ``judge``, the pairs whose prompt falls in the ``fraction`` share that a
    seeded hash of its tokens picks; ``policy``, the others. Every pair of a prompt lands on the same side, and
    the two sides with the same seed and fraction partition the pairs. Re-indexed 0..n-1."""
    if subset == "all":
        return features

    def judged(f: dict[str, Any]) -> bool:
        key = json.dumps([seed, f["prompt_ids"]]).encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64 < fraction

    kept = [f for f in features if judged(f) == (subset == "judge")]
    if not kept:
        raise DataError(f"pair_subset {subset!r} with judge_fraction {fraction} leaves no training pairs")
    return [{**f, "index": i} for i, f in enumerate(kept)]


class RewardCollator:
    """PairCollator batches (2B rows: chosen then rejected) plus ``margin`` (B,), NaN where a pair has none,
    and ``scores`` (2B,) when every pair of the batch has scores.

    Padding positions hold ``pad_id``: the id the reward model pools by (its ``config.pad_token_id``), so
    training reads each score at the same token as preftune.model.scoring does later on the saved model.
    """

    def __init__(self, tokenizer: Any, pad_id: int) -> None:
        self.pairs = PairCollator(tokenizer)
        self.pad_id = pad_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pairs(features)
        batch["input_ids"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, self.pad_id)
        batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        if all("score_chosen" in f for f in features):
            scores = [f["score_chosen"] for f in features] + [f["score_rejected"] for f in features]
            batch["scores"] = torch.tensor(scores, dtype=torch.float32)
        return batch


def score_position(ids: Sequence[int], pool_pad: int) -> int:
    """Where a transformers sequence classifier reads the score of the token sequence ``ids``: the rightmost
    token whose id is not ``pool_pad`` (its ``config.pad_token_id``), 0 when there is none.

    The closing eos when the model pads with another id; the last response token when it pads with eos. Right
    padding appends only ``pool_pad``, so this is also the position pooled in any padded batch.
    """
    return max((k for k, token in enumerate(ids) if token != pool_pad), default=0)


class PackedRewardCollator:
    """Packs B preference pairs into rows with no padding inside a row (:func:`batching.pack_documents`), and
    says where each answer's score is read: ``score_row`` / ``score_pos`` (2B,), chosen answers first.

    - ``prefix_sharing``: a pair is one document ``prompt + chosen + rejected``; the rejected tokens see the
      prompt, not the chosen answer, and their position ids restart after the prompt, so each answer's hidden
      states are those of ``prompt + answer`` alone while the prompt runs once. Off: two documents per pair.
    - ``pack_length``: documents packed first-fit into rows of up to this many tokens (0 = one per row).

    The read position is :func:`score_position` of ``prompt + answer`` mapped into the packed row: the token
    the classifier pools when the saved model scores that text alone. Also ``index``, ``margin``, ``scores``
    and ``tokens`` (real tokens in the batch) as :class:`RewardCollator`.
    """

    def __init__(
        self, tokenizer: Any, pool_pad: int, *, prefix_sharing: bool = True, pack_length: int = 256
    ) -> None:
        self.pad = pad_id(tokenizer)  # fills the rows' tails; never read
        self.pool_pad = pool_pad
        self.prefix_sharing = prefix_sharing
        self.pack_length = pack_length

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        docs: list[list[Part]] = []
        # (document, offset in it) of each answer's read position
        chosen_reads: list[tuple[int, int]] = []
        rejected_reads: list[tuple[int, int]] = []
        for f in features:
            prompt, chosen, rejected = list(f["prompt_ids"]), list(f["chosen_ids"]), list(f["rejected_ids"])
            at_c = score_position(prompt + chosen, self.pool_pad)
            at_r = score_position(prompt + rejected, self.pool_pad)
            if self.prefix_sharing:
                # rejected's tokens sit after chosen's in the document; a read inside the prompt stays there
                skip = len(chosen) if at_r >= len(prompt) else 0
                chosen_reads.append((len(docs), at_c))
                rejected_reads.append((len(docs), at_r + skip))
                docs.append([(prompt, PROMPT, -1), (chosen, 1, -1), (rejected, 2, -1)])
            else:
                chosen_reads.append((len(docs), at_c))
                rejected_reads.append((len(docs) + 1, at_r))
                docs.extend([[(prompt + chosen, PROMPT, -1)], [(prompt + rejected, PROMPT, -1)]])
        reads = chosen_reads + rejected_reads
        batch = pack_documents(docs, self.pad, self.pack_length)
        which = torch.tensor([d for d, _ in reads], dtype=torch.long)
        offset = torch.tensor([k for _, k in reads], dtype=torch.long)
        batch["score_row"] = batch["doc_row"][which]
        batch["score_pos"] = batch["doc_start"][which] + offset
        for key in ("target_row", "target_src", "target_ids", "target_segment", "target_pos"):
            del batch[key]  # nothing goes through an LM head
        batch["index"] = torch.tensor([f["index"] for f in features], dtype=torch.long)
        batch["margin"] = torch.tensor([f["margin"] for f in features], dtype=torch.float32)
        if all("score_chosen" in f for f in features):
            scores = [f["score_chosen"] for f in features] + [f["score_rejected"] for f in features]
            batch["scores"] = torch.tensor(scores, dtype=torch.float32)
        return batch


def make_collator(tokenizer: Any, config: RewardConfig, pool_pad: int) -> Any:
    """The pair collator the config asks for: packed / prefix-shared, or 2B right-padded rows (pooled by the
    classifier) when both levers are off. ``pool_pad`` is the id the reward model pools by."""
    if not config.prefix_sharing and config.pack_length <= 0:
        return RewardCollator(tokenizer, pool_pad)
    return PackedRewardCollator(
        tokenizer, pool_pad, prefix_sharing=config.prefix_sharing, pack_length=config.pack_length
    )


# ------------------------------------------------------------------------------------------------- the objective


def pair_rewards(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and the rejected answers, from one forward pass: over the packed rows of a
    :class:`PackedRewardCollator` batch (read at ``score_row`` / ``score_pos``), or over the 2B padded rows of
    a :class:`RewardCollator` batch (pooled by the classifier)."""
    if "score_pos" in batch:
        outputs = classifier_outputs_at(model, batch)
        if outputs.shape[-1] != 1:
            raise ValueError(
                f"a reward model has one output (num_labels=1); this one has {outputs.shape[-1]}"
            )
        rewards = outputs.squeeze(-1)
    else:
        rewards = rewards_from_batch(model, batch["input_ids"], batch["attention_mask"])
    n = batch["index"].numel()
    return rewards[:n], rewards[n:]


def pair_losses(
    config: RewardConfig, chosen: torch.Tensor, rejected: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Per-pair losses (B,) of the configured objective (regression: mean squared error of the pair's two
    responses)."""
    if config.objective == "regression":
        if "scores" not in batch:
            raise DataError("the regression objective needs 'scores' on every pair")
        n = chosen.numel()
        targets = batch["scores"].to(chosen.device)
        return 0.5 * (
            reward_regression_loss(chosen, targets[:n]) + reward_regression_loss(rejected, targets[n:])
        )
    margin = batch["margin"].to(chosen.device) * config.margin_scale if config.use_margin else None
    return bradley_terry_loss(chosen, rejected, margin)


def _summary(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    chosen, rejected = chosen.float(), rejected.float()
    both = torch.cat([chosen, rejected])
    return {
        "loss": float(losses.float().mean()),
        "accuracy": float((chosen > rejected).float().mean()),
        "mean_margin": float((chosen - rejected).mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()) if both.numel() > 1 else 0.0,
    }


# ---------------------------------------------------------------------------------------------------- buckets


def margin_thresholds(margins: Sequence[float]) -> tuple[float, float] | None:
    """The 1/3 and 2/3 quantiles (linear interpolation) of the finite margins; None when no pair has one."""
    values = torch.tensor([m for m in margins if math.isfinite(m)], dtype=torch.float64)
    if values.numel() == 0:
        return None
    q = torch.quantile(values, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    return float(q[0]), float(q[1])


def margin_bucket(margin: float, thresholds: tuple[float, float] | None) -> str:
    """``none`` for a pair without a margin, else ``low`` (<= q1), ``mid`` (<= q2) or ``high``."""
    if not math.isfinite(margin) or thresholds is None:
        return "none"
    low, mid = thresholds
    if margin <= low:
        return "low"
    return "mid" if margin <= mid else "high"


def bucket_rows(
    margins: Sequence[float],
    chosen: Sequence[float],
    rejected: Sequence[float],
    thresholds: tuple[float, float] | None,
) -> list[dict[str, Any]]:
    """Accuracy and mean reward margin per margin bucket (buckets with no pair are left out)."""
    groups: dict[str, list[int]] = {name: [] for name in BUCKETS}
    for i, m in enumerate(margins):
        groups[margin_bucket(m, thresholds)].append(i)
    ranges = {"none": "no margin"}
    if thresholds is not None:
        q1, q2 = thresholds
        ranges.update({"low": f"m <= {q1:.4g}", "mid": f"{q1:.4g} < m <= {q2:.4g}", "high": f"m > {q2:.4g}"})
    rows = []
    for name in BUCKETS:
        members = groups[name]
        if not members:
            continue
        wins = sum(chosen[i] > rejected[i] for i in members)
        rows.append(
            {
                "bucket": name,
                "range": ranges[name],
                "pairs": len(members),
                "accuracy": wins / len(members),
                "mean_margin": sum(chosen[i] - rejected[i] for i in members) / len(members),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------------ loop


def _evaluate(
    model: Any, loader: DataLoader, accelerator: Any, config: RewardConfig, count: int
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Metrics over the eval pairs, and every pair's chosen / rejected reward in the pairs' order."""
    model.eval()
    chosen = torch.zeros(count, dtype=torch.float64)
    rejected = torch.zeros(count, dtype=torch.float64)
    losses = torch.zeros(count, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            c, r = pair_rewards(model, batch)
            loss = pair_losses(config, c, r, batch)
            index, c, r, loss = accelerator.gather_for_metrics((batch["index"], c, r, loss))
            index = index.cpu()
            chosen[index] = c.double().cpu()
            rejected[index] = r.double().cpu()
            losses[index] = loss.double().cpu()
    model.train()
    return _summary(losses, chosen, rejected), chosen, rejected


@dataclasses.dataclass
class RewardState(Resumable):
    """The reward model's own resumable state: the evaluation before training, with every eval pair's rewards
    (the report's accuracy by margin bucket compares them with the rewards after training)."""

    first_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    first_chosen: list[float] = dataclasses.field(default_factory=list)
    first_rejected: list[float] = dataclasses.field(default_factory=list)


class RewardTrainer(EpochTrainer):
    """The reward model's objective for the engine; keeps the eval pairs' rewards of the latest evaluation, and
    stops on held-out accuracy (ties: the lower loss)."""

    def __init__(
        self, config: RewardConfig, accelerator: Any, eval_loader: DataLoader, eval_count: int
    ) -> None:
        self.config, self.accelerator = config, accelerator
        self.stop_rule = StopRule("accuracy", config.early_stopping_patience, ties_by_loss=True)
        self.eval_loader, self.eval_count = eval_loader, eval_count
        self.state = RewardState()
        self.last: tuple[list[float], list[float]] | None = (
            None  # chosen, rejected rewards of the latest eval
        )

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Loss:
        chosen, rejected = pair_rewards(model, batch)
        losses = pair_losses(self.config, chosen, rejected, batch)
        # every rank's pairs, so that the logged values are the global batch's, not rank 0's shard
        gathered = self.accelerator.gather_for_metrics((losses.detach(), chosen.detach(), rejected.detach()))
        return Loss(losses.mean(), _summary(*gathered), float(gathered[0].numel()))

    def evaluate(self, model: Any) -> dict[str, float]:
        values, chosen, rejected = _evaluate(
            model, self.eval_loader, self.accelerator, self.config, self.eval_count
        )
        self.last = chosen.tolist(), rejected.tolist()
        return values

    def first_evaluation(self, model: Any) -> dict[str, float]:
        values = self.evaluate(model)
        self.state.first_eval, (self.state.first_chosen, self.state.first_rejected) = values, self.last
        return values

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logged['loss']:.4f}", "acc": f"{logged['accuracy']:.2f}"}


def _reward_model(sft_model: str, tokenizer: Any, config: RewardConfig) -> tuple[Any, int]:
    """The reward model to train, and the pad id it pools by."""
    model = modeling.prepare_reward_model(sft_model, **lora_options(config))
    # The model reads its score at the rightmost token that is not config.pad_token_id. That id is set from the
    # parent's config (modeling.prepare_reward_model), exactly as modeling.load_reward_model sets it when the
    # artifact is loaded again; batches are padded with it, so training and later scoring read the same token.
    reward_pad = reward_pad_id(model)
    if reward_pad is None:
        raise ValueError(f"{sft_model}: the reward model has no config.pad_token_id to pad batches with")
    if reward_pad == eos_id(tokenizer):
        log.warning(
            "the model pads with its eos token: rewards are read at the last response token, before eos"
        )
    return ready_for_training(model, config), reward_pad


def _collator(model: Any, tokenizer: Any, config: RewardConfig, reward_pad: int, device: Any) -> Any:
    """The config's collator, once the model's attention kernel is known to mask its batches correctly."""
    collator = make_collator(tokenizer, config, reward_pad)
    packed = isinstance(collator, PackedRewardCollator)
    check_kernel(model, device, packed=packed, prefix_sharing=packed and config.prefix_sharing)
    return collator


def train_reward_model(
    sft_model: str,
    train_pairs: str,
    eval_pairs: str,
    model_dir: str,
    report_path: str,
    config: RewardConfig,
    *,
    sft_model_uri: str | None = None,
    model_uri: str | None = None,
) -> dict[str, float]:
    """Train a reward model on preference pairs from the SFT model and save it as a model artifact.

    Args:
        sft_model: The SFT model (local directory, s3:// URI or hub id); its backbone initialises the reward
            model, a new one-scalar head scores.
        train_pairs: Preference pairs (JSONL file or directory) in the contract shape.
        eval_pairs: Held-out pairs, same shape.
        model_dir: Where to write the model artifact (directory): full sequence-classification weights, or with
            LoRA an adapter (score head included) stacked on the SFT artifact.
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        sft_model_uri: The SFT artifact's URI for the lineage and the adapter's base (defaults to ``sft_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).

    Returns:
        Metrics: ``eval_accuracy`` (share of held-out pairs with r_chosen > r_rejected), ``first_eval_accuracy``
        (the same before training), ``eval_mean_margin`` (mean r_chosen - r_rejected), ``first_eval_loss``,
        ``eval_loss``, ``train_loss`` (mean over the last epoch), ``eval_accuracy_margin_<none|low|mid|high>``
        (by the data's margin; see the module docstring), ``eval_chosen_reward``, ``eval_rejected_reward``,
        ``eval_reward_mean`` and ``eval_reward_std`` (over all held-out responses: a scale for PPO),
        ``steps`` (run), ``best_step`` (the step of the weights kept), ``stopped_early`` (1 when early stopping
        ended training), ``train_pairs`` (after ``pair_subset``), ``eval_pairs``, ``train_seconds``.
    """
    validate(config)
    engine = Engine("reward", config)
    tokenizer = modeling.load_tokenizer(sft_model, trust_remote_code=config.trust_remote_code)
    need_scores = config.objective == "regression"
    train_features = load_reward_features(train_pairs, tokenizer, config.max_length, need_scores=need_scores)
    train_features = split_by_prompt(train_features, config.pair_subset, config.judge_fraction, config.seed)
    eval_features = load_reward_features(eval_pairs, tokenizer, config.max_length, need_scores=need_scores)
    model, reward_pad = _reward_model(sft_model, tokenizer, config)
    collator = _collator(model, tokenizer, config, reward_pad, engine.accelerator.device)

    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_features, batch_size=config.batch_size, shuffle=True, collate_fn=collator, generator=generator
    )
    eval_loader = DataLoader(eval_features, batch_size=config.eval_batch_size, collate_fn=collator)
    model, optimizer, train_loader, eval_loader = engine.accelerator.prepare(
        model, optimizer, train_loader, eval_loader
    )
    engine.artifact = Artifact(
        tokenizer,
        model_dir,
        report_path,
        parent_uri=sft_model_uri or sft_model,
        parameters={**dataclasses.asdict(config), "pad_token_id": reward_pad},
        artifact_uri=model_uri,
    )
    trainer = RewardTrainer(config, engine.accelerator, eval_loader, len(eval_features))
    run = fit(engine, trainer, model=model, optimizer=optimizer, loader=train_loader, generator=generator)

    margins = [f["margin"] for f in eval_features]
    thresholds = margin_thresholds(margins)
    state, (last_chosen, last_rejected) = trainer.state, trainer.last
    before = bucket_rows(margins, state.first_chosen, state.first_rejected, thresholds)
    after = bucket_rows(margins, last_chosen, last_rejected, thresholds)
    metrics = _metrics(engine, run, state, after, len(train_features), len(eval_features))
    data = {"train_pairs": storage.sha256_of(train_pairs), "eval_pairs": storage.sha256_of(eval_pairs)}
    truncated = sum(f["truncated"] for f in train_features)
    engine.save(
        model,
        run,
        data=data,
        metrics=metrics,
        report=lambda: _report(metrics, run.history, config, truncated, _bucket_table(before, after)),
    )
    return metrics


def _metrics(
    engine: Engine, run: Run, state: RewardState, after: list[dict[str, Any]], pairs: int, eval_pairs: int
) -> dict[str, float]:
    final = run.last_eval
    return {
        "eval_accuracy": final["accuracy"],
        "first_eval_accuracy": state.first_eval["accuracy"],
        "eval_mean_margin": final["mean_margin"],
        "eval_loss": final["loss"],
        "first_eval_loss": state.first_eval["loss"],
        "train_loss": run.state.epoch_meter.means().get("loss", float("nan")),
        **{f"eval_accuracy_margin_{row['bucket']}": float(row["accuracy"]) for row in after},
        "eval_chosen_reward": final["chosen_reward"],
        "eval_rejected_reward": final["rejected_reward"],
        "eval_reward_mean": final["reward_mean"],
        "eval_reward_std": final["reward_std"],
        "steps": float(run.state.step),
        "best_step": float(run.best_step if run.best_step is not None else run.state.step),
        "stopped_early": float(run.stopped_early),
        "train_pairs": float(pairs),
        "eval_pairs": float(eval_pairs),
        "train_seconds": run.seconds,
        "resumed_from_step": float(run.resumed_from),
        **engine.resources(run.state.tokens),
    }


def _bucket_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    first = {row["bucket"]: row for row in before}
    return [
        {
            "bucket": row["bucket"],
            "margin range": row["range"],
            "pairs": row["pairs"],
            "accuracy before": first[row["bucket"]]["accuracy"],
            "accuracy after": row["accuracy"],
            "mean reward margin after": row["mean_margin"],
        }
        for row in after
    ]


def _report(
    metrics: dict[str, float],
    history: History,
    config: RewardConfig,
    truncated: int,
    buckets: list[dict[str, Any]],
) -> str:
    objective = (
        "Bradley-Terry" + (" with the data's margins" if config.use_margin else "")
        if config.objective == "pairwise"
        else "regression on normalised scores"
    )
    intro = (
        f"Reward model ({objective}) trained on {int(metrics['train_pairs'])} pairs for {int(metrics['steps'])} "
        f"steps: held-out pair accuracy {metrics['first_eval_accuracy']:.1%} before training, "
        f"{metrics['eval_accuracy']:.1%} after (the weights of step {int(metrics['best_step'])}, the best "
        f"held-out evaluation{', after which training stopped early' if metrics['stopped_early'] else ''}); "
        f"mean reward margin {metrics['eval_mean_margin']:.3f}."
        + (
            f" Trained on the '{config.pair_subset}' share of the prompts."
            if config.pair_subset != "all"
            else ""
        )
    )

    def chart(name: str, title: str) -> str:
        return reports.line_chart(
            {"train": history.series("train", name), "eval": history.series("eval", name)}, title
        )

    rewards = reports.line_chart(
        {
            "eval chosen": history.series("eval", "chosen_reward"),
            "eval rejected": history.series("eval", "rejected_reward"),
        },
        "Mean reward of held-out answers",
    )
    bucket_note = (
        "<p>Buckets of the data's own margin: <code>none</code> = pairs without one; <code>low</code> / "
        "<code>mid</code> / <code>high</code> split at the 1/3 and 2/3 quantiles of the held-out pairs' margins. "
        "A good reward model is most accurate where people saw the clearest difference.</p>"
    )
    data = {
        "train pairs": metrics["train_pairs"],
        "eval pairs": metrics["eval_pairs"],
        "truncated to max_length": truncated,
    }
    return reports.page(
        "Reward model training",
        [
            ("Metrics", reports.key_values(metrics)),
            ("Loss", chart("loss", f"{config.objective} loss")),
            ("Pair accuracy", chart("accuracy", "Share of pairs with r(chosen) > r(rejected)")),
            ("Reward margin", chart("mean_margin", "Mean r(chosen) - r(rejected)")),
            ("Rewards", rewards),
            ("Accuracy by margin bucket (held-out pairs)", bucket_note + reports.table(buckets)),
            (
                "Learning rate",
                reports.line_chart({"learning rate": history.series("train", "lr")}, "Learning rate"),
            ),
            ("Evaluations", reports.table(history.eval)),
            ("Data", reports.key_values(data)),
            ("Configuration", reports.table(config_rows(config))),
        ],
        intro=intro,
    )
