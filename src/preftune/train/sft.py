"""Supervised fine-tuning: teach the base model to answer in the chat format, loss on completions only.

The SFT model is the starting policy and, more importantly, the frozen reference for DPO and PPO: both
measure how far the policy drifts from it. The loss covers the assistant's answer (and the eos that ends it),
never the prompt, so the model learns to answer, not to imitate users.
"""

from __future__ import annotations

import dataclasses
import math
import time
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
from preftune.train.checkpoint import Checkpointer, LoopProgress
from preftune.train.loop import (
    History,
    Meter,
    config_rows,
    lora_options,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    plan_steps,
    progress,
    ready_for_training,
    resource_metrics,
)
from preftune.train.packed import fused_head_weight, scored_logprobs


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
    began = time.perf_counter()
    validate(config)
    modeling.set_seed(config.seed)
    accelerator = make_accelerator(config.mixed_precision, config.gradient_accumulation_steps)
    tokenizer = modeling.load_tokenizer(base_model, trust_remote_code=config.trust_remote_code)
    train_features = load_sft_features(train_data, tokenizer, config.max_length)
    eval_features = load_sft_features(eval_data, tokenizer, config.max_length)

    model = ready_for_training(modeling.prepare_for_training(base_model, **lora_options(config)), config)

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
    model, optimizer, train_loader, eval_loader = accelerator.prepare(
        model, optimizer, train_loader, eval_loader
    )
    total_steps = plan_steps(
        len(train_loader), config.gradient_accumulation_steps, config.epochs, config.max_steps
    )
    scheduler = make_scheduler(optimizer, total_steps, config.warmup_ratio)

    loop = LoopProgress(
        Checkpointer(config.checkpoint_uri, config.checkpoint_every, accelerator, stage="sft"),
        generator,
        modules={"model": model},
        optimizers={"model": optimizer},
        schedulers={"model": scheduler},
    )
    resumed = loop.resume()
    if resumed is None:
        history = History()
        history.log_eval(0, 0.0, _evaluate(model, eval_loader, accelerator, fused))
        window, epoch_meter = Meter(), Meter()
    else:
        history = History.from_state(resumed["history"])
        window, epoch_meter = Meter.from_state(resumed["window"]), Meter.from_state(resumed["epoch_meter"])

    def loop_state() -> dict[str, Any]:
        return {
            "history": history.state_dict(),
            "window": window.state_dict(),
            "epoch_meter": epoch_meter.state_dict(),
        }

    bar = progress(total_steps, "sft", accelerator)
    bar.update(loop.step)
    model.train()
    start = time.perf_counter()
    while loop.step < total_steps:
        fresh_epoch = loop.skip == 0
        for batch_number, batch in loop.batches(train_loader, accelerator):
            if batch_number == 1 and fresh_epoch:
                epoch_meter = Meter()
            loop.seen(batch)
            with accelerator.accumulate(model):
                nll, n = batch_nll(model, batch, fused_head=fused)
                # the mean over the completion tokens of the whole (global) batch: DDP averages the ranks'
                # gradients, so each rank scales its sum by world size / all ranks' tokens
                totals = accelerator.reduce(torch.stack([nll.detach(), n.float()]), reduction="sum")
                loss = nll * accelerator.num_processes / totals[1].clamp(min=1)
                loop.check_finite(
                    loss, accelerator, batch_number, config.gradient_accumulation_steps, loop_state()
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            batch_loss = float(totals[0] / totals[1].clamp(min=1))
            window.add(float(totals[1]), loss=batch_loss)
            epoch_meter.add(float(totals[1]), loss=batch_loss)
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            loop.stepped()
            step = loop.step
            bar.update(1)
            if step % config.logging_steps == 0 or step == total_steps:
                logged = window.means()
                history.log_train(step, {**logged, "lr": scheduler.get_last_lr()[0]})
                bar.set_postfix(loss=f"{logged['loss']:.4f}")
                window = Meter()
            if step >= total_steps:
                break
            if config.eval_steps > 0 and step % config.eval_steps == 0 and batch_number < len(train_loader):
                history.log_eval(
                    step,
                    loop.epoch - 1 + batch_number / len(train_loader),
                    _evaluate(model, eval_loader, accelerator, fused),
                )
            if loop.checkpointer.due(step):
                loop.save(batch_number, loop_state())
        history.log_eval(loop.step, loop.epoch, _evaluate(model, eval_loader, accelerator, fused))
    bar.close()
    train_seconds = time.perf_counter() - start

    final_eval = history.eval[-1]
    metrics = {
        "train_loss": epoch_meter.means().get("loss", float("nan")),
        "eval_loss": final_eval["loss"],
        "eval_perplexity": final_eval["perplexity"],
        "steps": float(loop.step),
        "train_seconds": train_seconds,
        "train_examples": float(len(train_features)),
        "resumed_from_step": float(loop.resumed_from),
        **resource_metrics(began, accelerator, loop.tokens),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        modeling.save_model(
            unwrapped,
            tokenizer,
            model_dir,
            stage="sft",
            parent_uri=base_model_uri or base_model,
            parameters=dataclasses.asdict(config),
            data={
                "train": storage.sha256_of(train_data),
                "eval": storage.sha256_of(eval_data),
                "data_order": loop.data_order,
            },
            metrics=metrics,
            artifact_uri=model_uri,
        )
        truncated = sum(f["truncated"] for f in train_features)
        reports.write(report_path, _report(metrics, history, config, truncated, len(train_features)))
    return metrics


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
