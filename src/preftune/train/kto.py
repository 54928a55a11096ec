"""KTO: train the policy on unpaired desirable / undesirable answers against the frozen SFT model.

Binary feedback (a thumbs up or down, a rating above or below a threshold) says whether one answer was good, not
which of two was better. KTO (Ethayarajh et al. 2024) learns from it directly: a desirable answer's implicit
reward ``beta * (log pi - log ref)`` is pushed above a reference point ``z0``, an undesirable one's below, each
through a sigmoid (model.policy_losses.kto_loss). ``z0`` is the policy's KL to the SFT model, estimated on every
batch as in the paper: each prompt of the batch is paired with the previous example's answer (a mismatched pair,
``policy_losses.mismatched_order``), and ``z0 = max(0, mean(log pi(y'|x) - log ref(y'|x)))`` over those pairs, with
no gradient, averaged over every process.

Input rows (JSONL): ``{"prompt": text or chat messages, "completion": text, "label": true | false}`` (true =
desirable), or preference pairs ``{"prompt", "chosen", "rejected"}``, whose chosen answer counts as desirable and
rejected one as undesirable; a file may mix both. Held-out pairs also give the preference accuracy: the share of
pairs whose chosen answer gets the higher implicit reward (``reward_accuracy``), and whose chosen answer the
policy itself finds likelier (``logp_accuracy``, which at step 0 is the SFT model's).

Batches are DPO's packed, prefix-shared pair batches (train.batching.PackedPairCollator): each example is one
document, its prompt once, its own answer (scored, with gradients) and its mismatched answer (scored for ``z0``)
beside it. The reference pass runs on the same batch with the adapter off (or on a frozen copy), no gradients:
at step 0 the policy is the reference, so every reward and ``z0`` are exactly 0 and the loss is exactly half the
mean example weight (``first_step_loss``, a check that both passes see the same tokens).
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from preftune.config.kto import KTOConfig, validate
from preftune.data.records import to_messages
from preftune.io import storage
from preftune.model import modeling
from preftune.model.policy_losses import kto_loss, kto_reference_point, mismatched_order
from preftune.model.templating import tokenize_example, tokenize_pair
from preftune.report import html as reports
from preftune.train.batching import DataError, PackedPairCollator, read_rows
from preftune.train.dpo import pair_logprobs
from preftune.train.engine import Artifact, Engine, EpochTrainer, Loss, Resumable, Run, fit
from preftune.train.loop import (
    History,
    Meter,
    config_rows,
    disable_dropout,
    lora_options,
    make_optimizer,
    model_options,
    ready_for_training,
)
from preftune.train.ppo.models import adapter_off

log = logging.getLogger(__name__)

#: The paper's advised range of ``desirable_weight * n_desirable / (undesirable_weight * n_undesirable)``.
BALANCE_RANGE = (1.0, 4.0 / 3.0)


def _text(where: str, record: dict[str, Any], field: str) -> str:
    value = record.get(field)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {field!r}: expected a non-empty string")
    return value


def _example(
    feature: dict[str, Any], completion: list[int], label: bool, pair: int, id_: str
) -> dict[str, Any]:
    return {
        "prompt_ids": feature["prompt_ids"],
        "completion_ids": completion,
        "label": label,
        "pair": pair,
        "truncated": feature["truncated"],
        "id": id_,
    }


def _row_examples(
    tokenizer: Any, file: str, row: int, record: dict[str, Any], max_length: int, pair: int
) -> list[dict[str, Any]]:
    where, id_ = f"{file}: row {row}", str(record.get("id", f"{Path(file).name}:{row}"))
    try:
        prompt = to_messages(record.get("prompt"), file, row, "prompt")
    except ValueError as exc:
        raise DataError(f"{where}: field 'prompt': {exc}") from None
    if not prompt:
        raise DataError(f"{where}: field 'prompt': empty prompt")
    if "label" in record:
        label = record["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: field 'label': expected true (desirable) or false, got {label!r}")
        feature = tokenize_example(tokenizer, prompt, _text(where, record, "completion"), max_length)
        return [_example(feature, feature["completion_ids"], label, -1, id_)]
    if "chosen" in record or "rejected" in record:
        chosen, rejected = _text(where, record, "chosen"), _text(where, record, "rejected")
        feature = tokenize_pair(tokenizer, prompt, chosen, rejected, max_length)
        return [
            _example(feature, feature["chosen_ids"], True, pair, id_),
            _example(feature, feature["rejected_ids"], False, pair, id_),
        ]
    raise DataError(
        f"{where}: expected a 'completion' with a 'label' (true = desirable, false = undesirable), or a "
        "'chosen' and a 'rejected' answer"
    )


def load_kto_features(path: str | Path, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Read and tokenise KTO examples (see the module docstring for the rows); each feature has ``prompt_ids``,
    ``completion_ids`` (answer + eos), ``label`` (True = desirable), ``pair`` (the pair's number for both halves
    of a preference pair, -1 for an unpaired row), ``index``, ``truncated`` and ``id``."""
    features: list[dict[str, Any]] = []
    pairs = 0
    for file, row, record in read_rows(path):
        examples = _row_examples(tokenizer, file, row, record, max_length, pairs)
        pairs += len(examples) == 2
        for example in examples:
            example["index"] = len(features)
            features.append(example)
    if not features:
        raise DataError(f"{path}: no examples")
    return features


def merge_unpaired(pairs: list[dict[str, Any]], unpaired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training examples when both pairs and unpaired rows are given: every unpaired row, and the pairs of
    the prompts without any, so a prompt whose thumbs or ratings were also paired by the import is learned from
    once (as its raw feedback) while pairwise feedback on other prompts still counts."""
    rated = {tuple(f["prompt_ids"]) for f in unpaired}
    kept = [f for f in pairs if tuple(f["prompt_ids"]) not in rated]
    offset = max((f["pair"] for f in unpaired), default=-1) + 1
    merged = [dict(f) for f in unpaired]
    merged += [{**f, "pair": f["pair"] + offset if f["pair"] >= 0 else -1} for f in kept]
    for index, feature in enumerate(merged):
        feature["index"] = index
    return merged


def _train_features(
    train_data: str, unpaired_data: str | None, tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    """The training examples: ``train_data``'s rows, merged with ``unpaired_data``'s when that has any."""
    if unpaired_data is None or not read_rows(unpaired_data):
        return load_kto_features(train_data, tokenizer, max_length)
    unpaired = load_kto_features(unpaired_data, tokenizer, max_length)
    return merge_unpaired(load_kto_features(train_data, tokenizer, max_length), unpaired)


class KTOCollator:
    """KTO batches: each example a packed document ``prompt + its answer + the previous example's answer``
    (PackedPairCollator's chosen / rejected slots), with ``label`` and ``pair`` per example."""

    def __init__(self, tokenizer: Any, pack_length: int) -> None:
        self.pairs = PackedPairCollator(tokenizer, prefix_sharing=True, pack_length=pack_length)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        other = mismatched_order(len(features))
        documents = [
            {
                "prompt_ids": f["prompt_ids"],
                "chosen_ids": f["completion_ids"],
                "rejected_ids": features[j]["completion_ids"],
                "index": f["index"],
            }
            for f, j in zip(features, other, strict=True)
        ]
        batch = self.pairs(documents)
        batch["label"] = torch.tensor([f["label"] for f in features], dtype=torch.bool)
        batch["pair"] = torch.tensor([f["pair"] for f in features], dtype=torch.long)
        return batch


def _summary(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """Logged values of a set of examples: loss, z0, the mean implicit reward of each kind and their gap, and on
    the preference pairs among them, the two preference accuracies."""
    label, rewards = parts["label"].bool(), parts["rewards"]
    desirable = float(rewards[label].mean()) if label.any() else float("nan")
    undesirable = float(rewards[~label].mean()) if (~label).any() else float("nan")
    out = {
        "loss": float(parts["losses"].mean()),
        "kl": float(parts["kl"].mean()),
        "desirable_reward": desirable,
        "undesirable_reward": undesirable,
        "reward_margin": desirable - undesirable,
    }
    chosen, rejected = {}, {}
    for p, is_chosen, reward, logp in zip(
        parts["pair"].tolist(), label.tolist(), rewards.tolist(), parts["logps"].tolist(), strict=True
    ):
        if p >= 0:
            (chosen if is_chosen else rejected)[p] = (reward, logp)
    both = sorted(set(chosen) & set(rejected))
    if both:
        out["reward_accuracy"] = sum(chosen[p][0] > rejected[p][0] for p in both) / len(both)
        out["logp_accuracy"] = sum(chosen[p][1] > rejected[p][1] for p in both) / len(both)
    return out


@dataclasses.dataclass
class KTOState(Resumable):
    """KTO's own resumable state: the mean loss of the first optimisation step (half the mean weight)."""

    first: Meter = dataclasses.field(default_factory=Meter)


class KTOTrainer(EpochTrainer):
    """The KTO objective for the engine's epoch loop (see the module docstring)."""

    name = "policy"

    def __init__(self, config: KTOConfig, accelerator: Any, reference: Any | None, eval_loader: Any) -> None:
        self.config, self.accelerator, self.reference = config, accelerator, reference
        self.eval_loader = eval_loader
        self.state = KTOState()
        self.reduce = (lambda t: accelerator.reduce(t, "mean")) if accelerator.num_processes > 1 else None
        # Eval mode for the reference pass only matters with dropout or activation checkpointing on; otherwise
        # the switch there and back (a walk over every module, twice a step) changes nothing but the time.
        self.switch_mode = not config.disable_dropout or config.gradient_checkpointing

    def _reference(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The SFT model's log-probs of the batch's answers and mismatched answers (no gradients)."""
        config = self.config
        ref = self.reference if self.reference is not None else self.accelerator.unwrap_model(model)
        was_training = ref.training
        if self.switch_mode:
            ref.eval()
        with torch.no_grad(), adapter_off(ref) if self.reference is None else nullcontext():
            out = pair_logprobs(ref, batch, fused_head=config.fused_head, chunk_size=config.head_chunk_size)
        if self.switch_mode:
            ref.train(was_training)
        return out

    def _parts(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        ref_logps, ref_kl_logps = self._reference(model, batch)
        logps, kl_logps = pair_logprobs(
            model, batch, fused_head=config.fused_head, chunk_size=config.head_chunk_size
        )
        z0 = kto_reference_point(kl_logps, ref_kl_logps, reduce=self.reduce)
        losses, rewards = kto_loss(
            logps,
            ref_logps,
            batch["label"].to(logps.device),
            z0,
            beta=config.beta,
            desirable_weight=config.desirable_weight,
            undesirable_weight=config.undesirable_weight,
        )
        kept = (
            losses.detach(),
            rewards,
            batch["label"],
            batch["pair"],
            logps.detach(),
            z0.expand_as(rewards),
        )
        gathered = self.accelerator.gather_for_metrics(kept)
        names = ("losses", "rewards", "label", "pair", "logps", "kl")
        return losses.mean(), {k: v.cpu() for k, v in zip(names, gathered, strict=True)}

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Loss:
        loss, parts = self._parts(model, batch)
        summary = {k: v for k, v in _summary(parts).items() if v == v}  # NaN: a kind absent from the batch
        return Loss(loss, summary, float(parts["losses"].numel()))

    def evaluate(self, model: Any) -> dict[str, float]:
        model.eval()
        collected: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for batch in self.eval_loader:
                for name, value in self._parts(model, batch)[1].items():
                    collected.setdefault(name, []).append(value)
        model.train()
        return _summary({k: torch.cat(v) for k, v in collected.items()})

    def observe(self, step: int, loss: Loss) -> None:
        if step == 0:
            self.state.first.add(loss.weight, loss=loss.values["loss"])

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logged['loss']:.4f}", "kl": f"{logged['kl']:.3f}"}


def balance(features: list[dict[str, Any]], config: KTOConfig) -> tuple[int, int, str]:
    """The desirable and undesirable counts, and a note when their weighted ratio is outside the paper's advised
    range (logged as a warning too)."""
    desirable = sum(f["label"] for f in features)
    undesirable = len(features) - desirable
    if not desirable or not undesirable:
        kind = "desirable" if not desirable else "undesirable"
        raise DataError(f"KTO needs desirable and undesirable examples; the training data has no {kind} one")
    ratio = config.desirable_weight * desirable / (config.undesirable_weight * undesirable or 1.0)
    note = ""
    if not BALANCE_RANGE[0] <= ratio <= BALANCE_RANGE[1]:
        low = BALANCE_RANGE[0] * config.undesirable_weight * undesirable / desirable
        note = (
            f"desirable_weight x {desirable} desirable / (undesirable_weight x {undesirable} undesirable) = "
            f"{ratio:.2f}, outside the KTO paper's advised [1, 4/3]: consider desirable_weight "
            f"{low:.2f} to {low * BALANCE_RANGE[1]:.2f}."
        )
        log.warning(note)
    return desirable, undesirable, note


def _load_reference(sft_model: str, config: KTOConfig) -> Any | None:
    """A frozen copy of the SFT model for full fine-tuning; None with LoRA (the adapter off serves)."""
    if config.use_lora:
        return None
    reference = modeling.load_causal_lm(
        sft_model, trust_remote_code=config.trust_remote_code, **model_options(config)
    )
    reference.requires_grad_(False)
    disable_dropout(reference)
    return reference.eval()


def _data_hashes(**paths: str | None) -> dict[str, str]:
    """The lineage's data: each given input's hash."""
    return {name: storage.sha256_of(path) for name, path in paths.items() if path is not None}


def train_kto(
    sft_model: str,
    train_data: str,
    eval_data: str,
    model_dir: str,
    report_path: str,
    config: KTOConfig,
    *,
    sft_model_uri: str | None = None,
    model_uri: str | None = None,
    snapshot_dir: str | None = None,
    unpaired_data: str | None = None,
) -> dict[str, float]:
    """Train a KTO policy from the SFT model and save it as a model artifact.

    Args:
        sft_model: The SFT model (local directory, s3:// URI or hub id): the starting policy and the reference.
        train_data: Unpaired examples and/or preference pairs (JSONL file or directory; see the module docstring).
        eval_data: Held-out examples, same shape; pairs among them give the preference accuracies.
        model_dir: Where to write the model artifact. With LoRA only the adapter is saved, stacked on the SFT
            artifact.
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        sft_model_uri: The SFT artifact's URI for the lineage and the adapter's base (defaults to ``sft_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).
        snapshot_dir: Where to keep ``config.num_checkpoints`` intermediate policies; None keeps none.
        unpaired_data: Unpaired examples (the import's thumbs and ratings), merged by :func:`merge_unpaired`.

    Returns:
        Metrics: ``first_step_loss`` (half the mean example weight), ``train_loss`` (mean over the last epoch),
        ``eval_loss``, ``eval_kl`` (z0), ``eval_desirable_reward``, ``eval_undesirable_reward``,
        ``eval_reward_margin``, with held-out pairs ``eval_reward_accuracy`` and ``eval_logp_accuracy`` (and
        ``first_eval_logp_accuracy``, the SFT model's), ``steps``, ``train_examples``, ``desirable_examples``,
        ``undesirable_examples``, ``train_seconds``, ``resumed_from_step`` and the engine's resources.
    """
    validate(config)
    engine = Engine("kto", config)
    accelerator = engine.accelerator
    tokenizer = modeling.load_tokenizer(sft_model, trust_remote_code=config.trust_remote_code)
    train_features = _train_features(train_data, unpaired_data, tokenizer, config.max_length)
    eval_features = load_kto_features(eval_data, tokenizer, config.max_length)
    counts = balance(train_features, config)
    model = ready_for_training(modeling.prepare_for_training(sft_model, **lora_options(config)), config)
    reference = _load_reference(sft_model, config)
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    if reference is not None:
        reference = reference.to(accelerator.device)

    collator = KTOCollator(tokenizer, config.pack_length)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_features, batch_size=config.batch_size, shuffle=True, collate_fn=collator, generator=generator
    )
    eval_loader = DataLoader(eval_features, batch_size=config.eval_batch_size, collate_fn=collator)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    engine.artifact = Artifact(
        tokenizer,
        model_dir,
        report_path,
        parent_uri=sft_model_uri or sft_model,
        parameters=dataclasses.asdict(config),
        artifact_uri=model_uri,
        snapshot_dir=snapshot_dir,
        snapshots=config.num_checkpoints,
    )
    trainer = KTOTrainer(config, accelerator, reference, eval_loader)
    run = fit(engine, trainer, model=model, optimizer=optimizer, loader=train_loader, generator=generator)

    metrics = _metrics(engine, run, trainer.state, counts)
    engine.save(
        model,
        run,
        data=_data_hashes(train_data=train_data, eval_data=eval_data, unpaired_data=unpaired_data),
        metrics=metrics,
        report=lambda: _report(metrics, run.history, config, train_features, counts[2]),
    )
    return metrics


def _metrics(engine: Engine, run: Run, state: KTOState, counts: tuple[int, int, str]) -> dict[str, float]:
    first, final = run.history.eval[0], run.history.eval[-1]
    out = {
        "first_step_loss": state.first.means()["loss"],
        "train_loss": run.state.epoch_meter.means().get("loss", float("nan")),
        **{f"eval_{k}": v for k, v in final.items() if k not in ("step", "epoch")},
        "steps": float(run.state.step),
        "train_examples": float(counts[0] + counts[1]),
        "desirable_examples": float(counts[0]),
        "undesirable_examples": float(counts[1]),
        "train_seconds": run.seconds,
        "resumed_from_step": float(run.resumed_from),
        **engine.resources(run.state.tokens),
    }
    if "logp_accuracy" in first:
        out["first_eval_logp_accuracy"] = first["logp_accuracy"]
    return out


def _report(
    metrics: dict[str, float], history: History, config: KTOConfig, features: list[dict[str, Any]], note: str
) -> str:
    accuracy = metrics.get("eval_reward_accuracy")
    intro = (
        f"KTO (beta={config.beta}, desirable_weight={config.desirable_weight}, undesirable_weight="
        f"{config.undesirable_weight}) on {int(metrics['desirable_examples'])} desirable and "
        f"{int(metrics['undesirable_examples'])} undesirable examples for {int(metrics['steps'])} steps against "
        f"the SFT model: eval reward margin {metrics['eval_reward_margin']:.3f}"
        + (f", held-out preference accuracy {accuracy:.1%}" if accuracy is not None else "")
        + f", reference point (KL estimate) {metrics['eval_kl']:.4f}. First-step loss "
        f"{metrics['first_step_loss']:.4f} (half the mean example weight expected). {note}"
    )

    def chart(name: str, title: str) -> str:
        series = {"train": history.series("train", name), "eval": history.series("eval", name)}
        return reports.line_chart(series, title)

    data = {
        "examples": len(features),
        "from preference pairs": sum(f["pair"] >= 0 for f in features),
        "truncated to max_length": sum(f["truncated"] for f in features),
    }
    return reports.page(
        "KTO training",
        [
            ("Metrics", reports.key_values(metrics)),
            ("Loss", chart("loss", "KTO loss")),
            (
                "Reference point",
                chart("kl", "z0: KL(policy || SFT) on mismatched pairs (per answer, clamped at 0)"),
            ),
            ("Desirable reward", chart("desirable_reward", "Mean implicit reward of desirable answers")),
            (
                "Undesirable reward",
                chart("undesirable_reward", "Mean implicit reward of undesirable answers"),
            ),
            ("Preference accuracy", chart("reward_accuracy", "Share of pairs with chosen reward > rejected")),
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
