"""Direct Preference Optimization: train the policy on preference pairs against the frozen SFT model.

The reference is the SFT model itself, and it is never held twice in memory. Before the first update, one
no-grad pass (eval mode, dropout off; with LoRA, adapter disabled) scores every train and eval pair under the
reference; those log-probabilities are stored with the pairs and reused for the whole run. At step 0 the policy
equals the reference, so the sigmoid loss starts at exactly ln 2 (recorded as ``first_step_loss``, a check
that the reference pass and the training pass see the same tokens).

Chosen and rejected answers of a batch go through the model together (2B sequences, one forward pass).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from preftune.config.dpo import DPOConfig, validate
from preftune.io import storage
from preftune.model import modeling
from preftune.model.losses import dpo_loss, sequence_logprobs
from preftune.model.precision import precision_of
from preftune.report import html as reports
from preftune.train.batching import (
    PackedPairCollator,
    PairCollator,
    load_pair_features,
    model_inputs,
    shifted,
)
from preftune.train.engine import Artifact, Engine, EpochTrainer, Loss, Resumable, Run, StopRule, fit
from preftune.train.loop import History, Meter, config_rows, lora_options, make_optimizer, ready_for_training
from preftune.train.packed import check_kernel, fused_head_weight, scored_logprobs

log = logging.getLogger(__name__)


def pair_logprobs(
    model: Any, batch: dict[str, torch.Tensor], *, fused_head: bool = True, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probabilities of the chosen and the rejected answers of a batch, from one forward.

    Takes a :class:`PairCollator` batch (2B padded rows) or a :class:`PackedPairCollator` batch (packed rows,
    shared prompts); for the latter, ``fused_head`` applies the LM head only to the scored positions, in chunks.
    """
    n = batch["index"].numel()
    if "target_src" not in batch:
        logits = model(**model_inputs(batch)).logits
        logps = sequence_logprobs(*shifted(batch, logits))
        return logps[:n], logps[n:]
    token = scored_logprobs(model, batch, fused_head=fused_head, chunk_size=chunk_size)
    logps = torch.zeros(2 * n, dtype=torch.float32, device=token.device)
    logps = logps.index_add(0, batch["target_segment"], token)
    return logps[:n], logps[n:]


def make_collator(tokenizer: Any, config: DPOConfig) -> Any:
    """The pair collator the config asks for: packed/prefix-shared, or plain 2B padded rows when every lever is off."""
    if not config.prefix_sharing and config.pack_length <= 0 and not config.fused_head:
        return PairCollator(tokenizer)
    return PackedPairCollator(tokenizer, prefix_sharing=config.prefix_sharing, pack_length=config.pack_length)


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def score_reference(
    model: Any,
    features: list[dict[str, Any]],
    collator: Any,
    batch_size: int,
    accelerator: Any,
    *,
    fused_head: bool = True,
    chunk_size: int = 1024,
) -> None:
    """Store the reference log-probabilities of every pair in its feature (``ref_chosen_logps``,
    ``ref_rejected_logps``).

    Called before any update, so the model still is the reference; eval mode and, for LoRA, the adapter
    disabled make that exact. Batches are sharded across processes and gathered back.
    """
    if sorted(f["index"] for f in features) != list(range(len(features))):
        raise ValueError("pair features must be indexed 0..n-1 (one list from load_pair_features)")
    loader = accelerator.prepare(DataLoader(features, batch_size=batch_size, collate_fn=collator))
    unwrapped = accelerator.unwrap_model(model)
    chosen = torch.zeros(len(features), dtype=torch.float64)
    rejected = torch.zeros(len(features), dtype=torch.float64)
    model.eval()
    with torch.no_grad(), unwrapped.disable_adapter() if _is_peft(unwrapped) else nullcontext():
        for batch in loader:
            c, r = pair_logprobs(model, batch, fused_head=fused_head, chunk_size=chunk_size)
            index, c, r = accelerator.gather_for_metrics((batch["index"], c, r))
            chosen[index.cpu()] = c.double().cpu()
            rejected[index.cpu()] = r.double().cpu()
    model.train()
    for feature in features:
        feature["ref_chosen_logps"] = float(chosen[feature["index"]])
        feature["ref_rejected_logps"] = float(rejected[feature["index"]])


def _model_hash(ref: str) -> str:
    """A content hash of a model reference and its adapter chain (a hub id hashes as its name)."""
    parts = []
    for _ in range(modeling.MAX_ADAPTER_DEPTH):
        path = modeling.resolve(ref)
        if not Path(path).is_dir():
            parts.append(f"hub:{path}")
            break
        parts.append(storage.sha256_of(path))
        if not modeling.is_adapter(path):
            break
        ref = modeling.adapter_parent(path)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _reference_cache_path(
    config: DPOConfig, sft_model: str, *feature_lists: list[dict[str, Any]]
) -> Path | None:
    """Where the reference log-probs of these exact tokenised pairs under this exact model are cached, if asked.

    The key covers the reference weights (the whole adapter chain), every token id of every pair (so the data,
    tokenizer, template and max_length), the precision and the attention kernel; not beta, the loss or the learning rate, so a sweep
    over those, or a retried step, reuses one reference pass.
    """
    if not config.reference_cache_dir:
        return None
    digest = hashlib.sha256()
    compute = f"precision={precision_of(config).name}\nattention={config.attn_implementation}\n"
    digest.update(f"model={_model_hash(sft_model)}\n{compute}".encode())
    for features in feature_lists:
        digest.update(b"split\n")
        for f in features:
            digest.update(json.dumps([f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]]).encode() + b"\n")
    return Path(config.reference_cache_dir) / f"dpo-reference-{digest.hexdigest()[:40]}.json"


def _load_reference_cache(path: Path, feature_lists: tuple[list[dict[str, Any]], ...]) -> bool:
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        splits = stored["splits"]
        if [len(s["chosen"]) for s in splits] != [len(f) for f in feature_lists]:
            return False
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring unreadable reference cache %s", path)
        return False
    for features, split in zip(feature_lists, splits, strict=True):
        for f in features:
            f["ref_chosen_logps"] = float(split["chosen"][f["index"]])
            f["ref_rejected_logps"] = float(split["rejected"][f["index"]])
    log.info("reference log-probs read from cache %s", path)
    return True


def _save_reference_cache(path: Path, feature_lists: tuple[list[dict[str, Any]], ...]) -> None:
    splits = []
    for features in feature_lists:
        ordered = sorted(features, key=lambda f: f["index"])
        splits.append(
            {
                "chosen": [f["ref_chosen_logps"] for f in ordered],
                "rejected": [f["ref_rejected_logps"] for f in ordered],
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": 1, "splits": splits}), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one


def _summary(losses: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {
        "loss": float(losses.mean()),
        "reward_accuracy": float((chosen > rejected).float().mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
    }


def _losses(config: DPOConfig, c: torch.Tensor, r: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple:
    return dpo_loss(
        c,
        r,
        batch["ref_chosen_logps"].to(c.device),
        batch["ref_rejected_logps"].to(c.device),
        beta=config.beta,
        loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
    )


def _evaluate(model: Any, loader: DataLoader, accelerator: Any, config: DPOConfig) -> dict[str, float]:
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for batch in loader:
            c, r = pair_logprobs(
                model, batch, fused_head=config.fused_head, chunk_size=config.head_chunk_size
            )
            parts.append(accelerator.gather_for_metrics(_losses(config, c, r, batch)))
    model.train()
    losses, chosen, rejected = (torch.cat([p[i] for p in parts]).float().cpu() for i in range(3))
    return _summary(losses, chosen, rejected)


def _reference_summary(features: list[dict[str, Any]], config: DPOConfig) -> dict[str, float]:
    """Eval metrics at step 0, where the policy is the reference: computed from the stored log-probs. Every
    implicit reward is 0 there, so no pair is ranked: the reward accuracy is left out rather than shown as 0."""
    ref_c = torch.tensor([f["ref_chosen_logps"] for f in features])
    ref_r = torch.tensor([f["ref_rejected_logps"] for f in features])
    batch = {"ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    summary = _summary(*_losses(config, ref_c, ref_r, batch))
    del summary["reward_accuracy"]
    return summary


def _reference_pass(
    model: Any,
    config: DPOConfig,
    sft_model: str,
    collator: Any,
    accelerator: Any,
    *feature_lists: list[dict[str, Any]],
) -> float:
    """Give every pair its reference log-probs (from the cache when asked and present); returns the seconds."""
    began = time.perf_counter()
    cache = _reference_cache_path(config, sft_model, *feature_lists)
    if cache and _load_reference_cache(cache, feature_lists):
        return time.perf_counter() - began
    for features in feature_lists:  # separately: ``index`` is a position within each list
        score_reference(
            model,
            features,
            collator,
            config.eval_batch_size,
            accelerator,
            fused_head=config.fused_head,
            chunk_size=config.head_chunk_size,
        )
    if cache and accelerator.is_main_process:
        _save_reference_cache(cache, feature_lists)
    return time.perf_counter() - began


@dataclasses.dataclass
class DPOState(Resumable):
    """DPO's own resumable state: the mean loss of the first optimisation step (ln 2 for sigmoid)."""

    first: Meter = dataclasses.field(default_factory=Meter)


class DPOTrainer(EpochTrainer):
    """The DPO-family objective for the engine, on pairs carrying their reference log-probs."""

    name = "policy"

    def __init__(
        self,
        config: DPOConfig,
        accelerator: Any,
        eval_loader: DataLoader,
        eval_features: list[dict[str, Any]],
    ) -> None:
        self.config, self.accelerator = config, accelerator
        self.eval_loader, self.eval_features = eval_loader, eval_features
        self.state = DPOState()
        # the earliest best held-out accuracy: the same ranking of pairs for the least drift
        self.stop_rule = StopRule("reward_accuracy", config.early_stopping_patience)

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Loss:
        config = self.config
        c, r = pair_logprobs(model, batch, fused_head=config.fused_head, chunk_size=config.head_chunk_size)
        losses, chosen_rewards, rejected_rewards = _losses(config, c, r, batch)
        # every rank's pairs, so that the logged values are the global batch's, not rank 0's shard
        gathered = self.accelerator.gather_for_metrics((losses.detach(), chosen_rewards, rejected_rewards))
        return Loss(losses.mean(), _summary(*gathered), float(gathered[0].numel()))

    def evaluate(self, model: Any) -> dict[str, float]:
        return _evaluate(model, self.eval_loader, self.accelerator, self.config)

    def first_evaluation(self, model: Any) -> dict[str, float]:
        return _reference_summary(self.eval_features, self.config)  # the policy is the reference at step 0

    def observe(self, step: int, loss: Loss) -> None:
        if step == 0:
            self.state.first.add(loss.weight, loss=loss.values["loss"])

    def postfix(self, logged: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logged['loss']:.4f}", "acc": f"{logged['reward_accuracy']:.2f}"}


def _policy(sft_model: str, tokenizer: Any, config: DPOConfig, device: Any) -> tuple[Any, DPOConfig, Any]:
    """The policy to train, the config as it will run, and the collator; a kernel that cannot mask its batches
    is refused here, before any pass."""
    model = ready_for_training(modeling.prepare_for_training(sft_model, **lora_options(config)), config)
    if config.fused_head and fused_head_weight(model) is None:
        # a head the fused path cannot reproduce (a bias, soft-capped logits like Gemma-2's): the model's own
        log.info("%s: fused_head is off: the model's LM head has a bias or soft-capped logits", sft_model)
        config = dataclasses.replace(config, fused_head=False)
    collator = make_collator(tokenizer, config)
    packed = isinstance(collator, PackedPairCollator)
    check_kernel(model, device, packed=packed, prefix_sharing=packed and config.prefix_sharing)
    return model, config, collator


def train_dpo(
    sft_model: str,
    train_pairs: str,
    eval_pairs: str,
    model_dir: str,
    report_path: str,
    config: DPOConfig,
    *,
    sft_model_uri: str | None = None,
    model_uri: str | None = None,
    snapshot_dir: str | None = None,
) -> dict[str, float]:
    """Train a DPO policy from the SFT model on contract preference pairs and save it as a model artifact.

    Args:
        sft_model: The SFT model (local directory, s3:// URI or hub id): the starting policy and the reference.
        train_pairs: Preference pairs (JSONL file or directory) in the contract shape.
        eval_pairs: Held-out pairs, same shape.
        model_dir: Where to write the model artifact (directory). With LoRA only the DPO adapter is saved,
            stacked on the SFT artifact.
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        sft_model_uri: The SFT artifact's URI for the lineage and the adapter's base (defaults to ``sft_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).
        snapshot_dir: Where to keep ``config.num_checkpoints`` intermediate policies (preftune.train.snapshots);
            None keeps none.

    Returns:
        Metrics: ``first_step_loss`` (mean loss of the first optimisation step; ln 2 for sigmoid),
        ``train_loss`` (mean over the last epoch), ``eval_loss``, ``eval_reward_accuracy`` (share of eval pairs
        whose chosen implicit reward beats the rejected one), ``eval_reward_margin``, ``eval_chosen_reward``,
        ``eval_rejected_reward`` (all of the weights kept: the best held-out evaluation), ``steps`` (run),
        ``best_step`` (the step of the weights kept), ``stopped_early`` (1 when early stopping ended training),
        ``train_pairs``, ``train_seconds``.
    """
    validate(config)
    engine = Engine("dpo", config)
    accelerator = engine.accelerator
    tokenizer = modeling.load_tokenizer(sft_model, trust_remote_code=config.trust_remote_code)
    train_features = load_pair_features(train_pairs, tokenizer, config.max_length)
    eval_features = load_pair_features(eval_pairs, tokenizer, config.max_length)
    model, config, collator = _policy(sft_model, tokenizer, config, accelerator.device)
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    with engine.autocast():  # the reference computes as the policy's training forward will
        ref_seconds = _reference_pass(
            model, config, sft_model, collator, accelerator, train_features, eval_features
        )

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
    trainer = DPOTrainer(config, accelerator, eval_loader, eval_features)
    run = fit(engine, trainer, model=model, optimizer=optimizer, loader=train_loader, generator=generator)

    metrics = _metrics(engine, run, trainer.state, len(train_features))
    data = {"train_pairs": storage.sha256_of(train_pairs), "eval_pairs": storage.sha256_of(eval_pairs)}
    truncated = sum(f["truncated"] for f in train_features)
    engine.save(
        model,
        run,
        data=data,
        metrics=metrics,
        report=lambda: _report(metrics, run.history, config, truncated, len(train_features), ref_seconds),
    )
    return metrics


def _metrics(engine: Engine, run: Run, state: DPOState, pairs: int) -> dict[str, float]:
    final = run.last_eval
    return {
        "first_step_loss": state.first.means()["loss"],
        "train_loss": run.state.epoch_meter.means().get("loss", float("nan")),
        "eval_loss": final["loss"],
        "eval_reward_accuracy": final["reward_accuracy"],
        "eval_reward_margin": final["reward_margin"],
        "eval_chosen_reward": final["chosen_reward"],
        "eval_rejected_reward": final["rejected_reward"],
        "steps": float(run.state.step),
        "best_step": float(run.best_step if run.best_step is not None else run.state.step),
        "stopped_early": float(run.stopped_early),
        "train_pairs": float(pairs),
        "train_seconds": run.seconds,
        "resumed_from_step": float(run.resumed_from),
        **engine.resources(run.state.tokens),
    }


def _columns(rows: list[dict[str, float]]) -> list[str]:
    """Every key of the rows, in first-seen order (the step-0 row has no reward accuracy)."""
    return list(dict.fromkeys(k for row in rows for k in row))


def _report(
    metrics: dict[str, float],
    history: History,
    config: DPOConfig,
    truncated: int,
    pairs: int,
    ref_seconds: float,
) -> str:
    intro = (
        f"DPO ({config.loss_type}, beta={config.beta}) on {pairs} pairs for {int(metrics['steps'])} steps against "
        f"the SFT model: eval reward accuracy {metrics['eval_reward_accuracy']:.1%}, margin "
        f"{metrics['eval_reward_margin']:.3f} (the weights of step {int(metrics['best_step'])}, the earliest best "
        f"held-out accuracy{'; training then stopped early' if metrics['stopped_early'] else ''}). First-step "
        f"loss {metrics['first_step_loss']:.4f}"
        + (" (ln 2 = 0.6931 expected)." if config.loss_type == "sigmoid" else ".")
    )

    def chart(name: str, title: str, ylabel: str = "") -> str:
        return reports.line_chart(
            {"train": history.series("train", name), "eval": history.series("eval", name)},
            title,
            ylabel=ylabel,
        )

    rewards = reports.line_chart(
        {
            "train chosen": history.series("train", "chosen_reward"),
            "train rejected": history.series("train", "rejected_reward"),
            "eval chosen": history.series("eval", "chosen_reward"),
            "eval rejected": history.series("eval", "rejected_reward"),
        },
        "Implicit rewards: beta * (log pi - log ref)",
    )
    data = {"train pairs": pairs, "truncated to max_length": truncated, "reference pass seconds": ref_seconds}
    return reports.page(
        "DPO training",
        [
            ("Metrics", reports.key_values(metrics)),
            ("Loss", chart("loss", f"{config.loss_type} loss")),
            ("Reward accuracy", chart("reward_accuracy", "Share of pairs with chosen reward > rejected")),
            ("Reward margin", chart("reward_margin", "Mean chosen - rejected reward")),
            ("Rewards", rewards),
            (
                "Learning rate",
                reports.line_chart({"learning rate": history.series("train", "lr")}, "Learning rate"),
            ),
            ("Evaluations", reports.table(history.eval, _columns(history.eval))),
            ("Data", reports.key_values(data)),
            ("Configuration", reports.table(config_rows(config))),
        ],
        intro=intro,
    )
