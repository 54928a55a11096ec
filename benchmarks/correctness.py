"""Correctness gate: our per-pair losses against TRL's, on identical model batches (fp32).

Same weights, same pairs, same token ids. The policy is made to differ from the reference first (the LoRA
adapter gets random non-zero weights), so the comparison is not the trivial ln 2 of step 0. TRL's number comes
from its own trainer code path: ``DPOTrainer._compute_loss`` on a batch from its ``DataCollatorForPreference``,
one pair at a time (its loss is a batch mean), with its reference computed inline (adapter disabled). The
reward model's losses are checked on the batches its trainer trains on by default (packed, prefix-shared pairs)
and on 2B padded rows, against ``RewardTrainer.compute_loss`` on TRL's own collated pairs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

TOLERANCE = 1e-5


def _perturbed_model(model_path: str, seed: int = 0) -> Any:
    """The model with every weight nudged by seeded noise: a policy that differs from its reference."""
    import torch

    from preftune.model import modeling
    from preftune.train.loop import disable_dropout

    model = modeling.load_causal_lm(model_path)
    disable_dropout(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def dpo_gate(n_pairs: int = 8, beta: float = 0.1, model: str = "tiny") -> dict[str, Any]:
    """Max |our per-pair DPO loss - TRL's| over ``n_pairs`` bundled pairs, both through the trainers' code."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from preftune.model import modeling
    from preftune.model.losses import dpo_loss
    from preftune.train import dpo
    from preftune.train.batching import load_pair_features
    from preftune.train.loop import disable_dropout, make_accelerator

    model_path = common.model_dir(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gate-"))
    rows_path = common.write_jsonl(tmp / "pairs.jsonl", common.pair_rows(n_pairs))
    tokenizer = modeling.load_tokenizer(model_path)
    features = load_pair_features(rows_path, tokenizer, 256)
    policy = _perturbed_model(model_path)
    reference = modeling.load_causal_lm(model_path)
    disable_dropout(reference)

    # Ours: the reference pass, then the policy pass, through the trainer's collator and code.
    config = dpo.DPOConfig(beta=beta)
    collator = dpo.make_collator(tokenizer, config)
    dpo.score_reference(reference, features, collator, n_pairs, make_accelerator("no"))
    batch = collator(features)
    policy.eval()
    with torch.no_grad():
        c, r = dpo.pair_logprobs(policy, batch, fused_head=config.fused_head)
    ours, _, _ = dpo_loss(c, r, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=beta)

    # TRL: the same token ids through its collator and its loss path.
    from preftune.model.templating import render_prompt

    rows = common.pair_rows(n_pairs)  # TRL's trainer needs a dataset to start; the batches below bypass it
    data = Dataset.from_list(
        [
            {
                "prompt": render_prompt(tokenizer, r["prompt"]),
                "chosen": r["chosen"],
                "rejected": r["rejected"],
            }
            for r in rows
        ]
    )
    args = TRLConfig(
        output_dir=str(tmp / "trl"),
        beta=beta,
        report_to=[],
        use_cpu=True,
        max_length=256,
        disable_dropout=True,
        per_device_train_batch_size=1,
        bf16=False,
    )
    trainer = DPOTrainer(
        model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.model.eval()
    theirs = []
    with torch.no_grad():
        for f in features:
            inputs = trainer.data_collator(
                [
                    {
                        "prompt_ids": f["prompt_ids"],
                        "chosen_ids": f["chosen_ids"],
                        "rejected_ids": f["rejected_ids"],
                    }
                ]
            )
            theirs.append(float(trainer._compute_loss(trainer.model, inputs, return_outputs=False)))
    theirs_t = torch.tensor(theirs, dtype=torch.float64)
    diff = float((ours.double() - theirs_t).abs().max())
    return {
        "max_abs_diff": diff,
        "ok": diff <= TOLERANCE,
        "ours": [float(x) for x in ours],
        "trl": theirs,
        "mean_loss": float(ours.mean()),
    }


def reward_gate(n_pairs: int = 8, model: str = "tiny") -> dict[str, Any]:
    """Max |our per-pair Bradley-Terry loss - TRL RewardTrainer's| on identical batches (same weights, token ids)."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from preftune.model import modeling
    from preftune.train import reward

    model_path = common.model_dir(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gate-rm-"))
    rows_path = common.write_jsonl(tmp / "pairs.jsonl", common.pair_rows(n_pairs))
    tokenizer = modeling.load_tokenizer(model_path)
    rm = modeling.prepare_reward_model(model_path, use_lora=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=generator) * 0.5)
    rm.eval()
    features = reward.load_reward_features(rows_path, tokenizer, 256, need_scores=False)
    # The trainer's default batches (packed rows, one prompt + chosen + rejected document per pair, read at each
    # answer's pooling position): what the benchmark's reward runs train on. Also the 2B padded rows (levers off).
    config = reward.RewardConfig()
    packed = reward.make_collator(tokenizer, config, rm.config.pad_token_id)(features)
    padded = reward.RewardCollator(tokenizer, rm.config.pad_token_id)(features)
    if "score_pos" not in packed or packed["input_ids"].shape[0] >= len(features):
        raise RuntimeError(
            "the reward trainer's default batches are not packed: the gate would not check them"
        )
    with torch.no_grad():
        c, r = reward.pair_rewards(rm, packed)
        c_padded, r_padded = reward.pair_rewards(rm, padded)
    from preftune.model.losses import bradley_terry_loss

    ours = bradley_terry_loss(c, r)

    seqs = [(f["prompt_ids"] + f["chosen_ids"], f["prompt_ids"] + f["rejected_ids"]) for f in features]
    data = Dataset.from_list([{"chosen_ids": a, "rejected_ids": b} for a, b in seqs])
    args = RewardConfig(
        output_dir=str(tmp / "trl"),
        report_to=[],
        use_cpu=True,
        max_length=256,
        per_device_train_batch_size=1,
        disable_dropout=True,
        center_rewards_coefficient=None,
        bf16=False,
    )
    trainer = RewardTrainer(model=rm, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.model.eval()
    theirs = []
    with torch.no_grad():
        for a, b in seqs:
            inputs = trainer.data_collator([{"chosen_ids": a, "rejected_ids": b}])
            theirs.append(float(trainer.compute_loss(trainer.model, inputs)))
    ours_pairs = reward.pair_losses(config, c, r, packed)  # the trainer's own loss path
    ours_padded = reward.pair_losses(config, c_padded, r_padded, padded)
    theirs_t = torch.tensor(theirs, dtype=torch.float64)
    diffs = {
        name: float((losses.double() - theirs_t).abs().max())
        for name, losses in (("bradley_terry", ours), ("packed", ours_pairs), ("padded", ours_padded))
    }
    diff = max(diffs.values())
    return {
        "max_abs_diff": diff,
        "ok": diff <= TOLERANCE,
        "paths": diffs,
        "ours": [float(x) for x in ours_pairs],
        "trl": theirs,
    }


def run(impl: str = "both", **kwargs: Any) -> dict[str, Any]:
    """Worker entry: both gates (``impl`` is ignored)."""
    out = {"dpo": dpo_gate(**kwargs)}
    try:
        out["reward"] = reward_gate(**kwargs)
    except Exception as exc:  # noqa: BLE001 - reported, and the reward speed-up is then withheld
        out["reward"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return out
