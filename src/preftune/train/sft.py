"""Supervised fine-tuning: teach the base model to answer in the chat format, loss on completions only.

The SFT model is the starting policy and, more importantly, the frozen reference for DPO and PPO: both
measure how far the policy drifts from it. The loss covers the assistant's answer (and the eos that ends it),
never the prompt, so the model learns to answer, not to imitate users.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from preftune.config.sft import SFTConfig, validate
from preftune.io import storage
from preftune.model import modeling
from preftune.report import html as reports
from preftune.train.batching import (
    IGNORE_INDEX,
    PackedSFTCollator,
    SFTCollator,
    load_sft_features,
    model_inputs,
)
from preftune.train.engine import Artifact, Engine, EpochTrainer, Loss, Run, fit
from preftune.train.loop import History, config_rows, lora_options, make_optimizer, ready_for_training
from preftune.train.packed import check_kernel, fused_head_weight, scored_logprobs


def completion_nll(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], *, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood over completion tokens, and how many tokens that covers
    (with ``per_row``, one sum and one count per row)."""
    shift_logits = logits[:, :-1, :]
    shift_labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)).float(),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none" if per_row else "sum",
    )
    if per_row:
        return nll.view(shift_labels.shape).sum(dim=1), (shift_labels != IGNORE_INDEX).sum(dim=1)
    return nll, (shift_labels != IGNORE_INDEX).sum()


def batch_nll(
    model: Any, batch: dict[str, torch.Tensor], *, fused_head: bool = True, per_example: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion NLL of a batch and its token count (with ``per_example``, one of each per example):
    a padded (:class:`SFTCollator`) batch through the model's logits, a packed (:class:`PackedSFTCollator`)
    one through the completion positions only."""
    if "target_ids" not in batch:
        return completion_nll(model(**model_inputs(batch)).logits, batch, per_row=per_example)
    logps = scored_logprobs(model, batch, fused_head=fused_head)
    if not per_example:
        return -logps.sum(), torch.tensor(logps.numel(), device=logps.device)
    examples = int(batch["doc_row"].numel())
    segments = batch["target_segment"]
    nll = torch.zeros(examples, dtype=logps.dtype, device=logps.device).index_add(0, segments, -logps)
    return nll, torch.bincount(segments, minlength=examples)


def make_collator(tokenizer: Any, config: SFTConfig) -> Any:
    """Packed rows when ``pack_length`` > 0, else one right-padded example per row."""
    if config.pack_length > 0:
        return PackedSFTCollator(tokenizer, pack_length=config.pack_length)
    return SFTCollator(tokenizer)


def _evaluate(model: Any, loader: DataLoader, accelerator: Any, fused_head: bool = True) -> dict[str, float]:
    model.eval()
    nll_sum = torch.zeros((), device=accelerator.device)
    tokens = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            nll, n = batch_nll(model, batch, fused_head=fused_head, per_example=True)
            # per example, so that under DDP the examples accelerate repeats to even out the last batch are
            # dropped (gather_for_metrics), not counted twice
            nll, n = accelerator.gather_for_metrics((nll.detach(), n))
            nll_sum += nll.sum()
            tokens += n.sum()
    loss = float(nll_sum / tokens.clamp(min=1))
    model.train()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


class SFTTrainer(EpochTrainer):
    """The SFT objective for the engine: mean completion-token NLL over the global batch."""

    def __init__(self, accelerator: Any, eval_loader: DataLoader, fused: bool) -> None:
        self.accelerator, self.eval_loader, self.fused = accelerator, eval_loader, fused

    def compute_loss(self, model: Any, batch: dict[str, torch.Tensor]) -> Loss:
        nll, n = batch_nll(model, batch, fused_head=self.fused)
        # the mean over the completion tokens of the whole (global) batch: DDP averages the ranks' gradients, so
        # each rank scales its sum by world size / all ranks' tokens
        totals = self.accelerator.reduce(torch.stack([nll.detach(), n.float()]), reduction="sum")
        loss = nll * self.accelerator.num_processes / totals[1].clamp(min=1)
        return Loss(loss, {"loss": float(totals[0] / totals[1].clamp(min=1))}, float(totals[1]))

    def evaluate(self, model: Any) -> dict[str, float]:
        return _evaluate(model, self.eval_loader, self.accelerator, self.fused)


def train_sft(
    base_model: str,
    train_data: str,
    eval_data: str,
    model_dir: str,
    report_path: str,
    config: SFTConfig,
    *,
    base_model_uri: str | None = None,
    model_uri: str | None = None,
) -> dict[str, float]:
    """Fine-tune ``base_model`` on contract SFT examples and save the result as a model artifact.

    Args:
        base_model: The model to start from (local directory, s3:// URI or hub id).
        train_data: SFT examples (JSONL file or directory) in the contract shape.
        eval_data: Held-out SFT examples, same shape.
        model_dir: Where to write the model artifact (directory).
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        base_model_uri: The parent's URI for the lineage and the adapter's base (defaults to ``base_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).

    Returns:
        Metrics: ``train_loss`` (mean over the last epoch's completion tokens), ``eval_loss``,
        ``eval_perplexity``, ``steps``, ``train_tokens`` (non-padding tokens fed to the model),
        ``train_seconds``, ``train_examples``, ``resumed_from_step``, ``stage_seconds`` (the whole stage),
        ``peak_memory_mb``.
    """
    validate(config)
    engine = Engine("sft", config)
    tokenizer = modeling.load_tokenizer(base_model, trust_remote_code=config.trust_remote_code)
    train_features = load_sft_features(train_data, tokenizer, config.max_length)
    eval_features = load_sft_features(eval_data, tokenizer, config.max_length)
    model = ready_for_training(modeling.prepare_for_training(base_model, **lora_options(config)), config)
    check_kernel(model, engine.accelerator.device, packed=config.pack_length > 0)

    collator = make_collator(tokenizer, config)
    # A head the fused path cannot reproduce (a bias, soft-capped logits): the model's own head, at the scored
    # positions.
    fused = config.fused_head and fused_head_weight(model) is not None
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        train_features, batch_size=config.batch_size, shuffle=True, collate_fn=collator, generator=generator
    )
    eval_loader = DataLoader(eval_features, batch_size=config.eval_batch_size, collate_fn=collator)
    optimizer = make_optimizer(model, config.learning_rate, config.weight_decay)
    model, optimizer, train_loader, eval_loader = engine.accelerator.prepare(
        model, optimizer, train_loader, eval_loader
    )
    engine.artifact = Artifact(
        tokenizer,
        model_dir,
        report_path,
        parent_uri=base_model_uri or base_model,
        parameters=dataclasses.asdict(config),
        artifact_uri=model_uri,
    )
    trainer = SFTTrainer(engine.accelerator, eval_loader, fused)
    run = fit(engine, trainer, model=model, optimizer=optimizer, loader=train_loader, generator=generator)

    metrics = _metrics(engine, run, len(train_features))
    data = {"train": storage.sha256_of(train_data), "eval": storage.sha256_of(eval_data)}
    truncated = sum(f["truncated"] for f in train_features)
    engine.save(
        model,
        run,
        data=data,
        metrics=metrics,
        report=lambda: _report(metrics, run.history, config, truncated, len(train_features)),
    )
    return metrics


def _metrics(engine: Engine, run: Run, examples: int) -> dict[str, float]:
    final = run.history.eval[-1]
    return {
        "train_loss": run.state.epoch_meter.means().get("loss", float("nan")),
        "eval_loss": final["loss"],
        "eval_perplexity": final["perplexity"],
        "steps": float(run.state.step),
        "train_seconds": run.seconds,
        "train_examples": float(examples),
        "resumed_from_step": float(run.resumed_from),
        **engine.resources(run.state.tokens),
    }


def _report(
    metrics: dict[str, float], history: History, config: SFTConfig, truncated: int, examples: int
) -> str:
    before = history.eval[0]["loss"]
    intro = (
        f"Supervised fine-tuning on {examples} examples for {int(metrics['steps'])} steps: eval loss "
        f"{before:.3f} -> {metrics['eval_loss']:.3f} (perplexity {metrics['eval_perplexity']:.2f})."
    )
    loss_chart = reports.line_chart(
        {
            "train (per logging window)": history.series("train", "loss"),
            "eval": history.series("eval", "loss"),
        },
        "Completion-token loss",
        ylabel="cross-entropy (nats/token)",
    )
    lr_chart = reports.line_chart({"learning rate": history.series("train", "lr")}, "Learning rate")
    data = {"train examples": examples, "truncated to max_length": truncated}
    return reports.page(
        "SFT training",
        [
            ("Metrics", reports.key_values(metrics)),
            ("Loss", loss_chart),
            ("Learning rate", lr_chart),
            ("Evaluations", reports.table(history.eval)),
            ("Data", reports.key_values(data)),
            ("Configuration", reports.table(config_rows(config))),
        ],
        intro=intro,
    )
