"""The GPU check of issue 14: every architecture, in bf16, under sdpa, flash attention and flex attention.

    python -m benchmarks.gpu_matrix [--out benchmarks/gpu-matrix.json] [--arch llama gemma2 ...]
    python -m benchmarks.gpu_matrix --dry-run --out /tmp/gpu-matrix.json    # the same code on this CPU

On a CUDA machine it builds each architecture of examples/make_arch_bases.py (random weights, bf16 checkpoints,
sliding windows shorter than the documents), and for each attention kernel the GPU has (sdpa always, eager for
reference, flash_attention_2 when the flash_attn package is installed and the model supports it, flex_attention on
CUDA) it measures, under bf16 autocast:

- packed and prefix-shared log-probs per token, rewards and values against one-at-a-time scoring of each
  sequence alone (flash: packed through position ids, no shared prompts, which preftune refuses there);
- one full fine-tuning step of SFT and of DPO on the kernel: finite, every trained weight fp32, DPO's first-step
  loss ln 2 up to bf16's resolution.

Each row records its differences and whether they are within ``BOUND`` (bf16: 0.05). The JSON goes to ``--out``
with the device, the library versions and ``ok`` (every row within bounds). ``--dry-run`` runs the same code on
the CPU with eager and sdpa (the tests run it), so the script is known to work before a GPU is lent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Largest difference allowed between two bf16 computations of one log-prob, reward or value.
BOUND = 0.05


def _arch_bases() -> Any:
    spec = importlib.util.spec_from_file_location("make_arch_bases", ROOT / "examples" / "make_arch_bases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernels(arch: str, device: str) -> list[str]:
    """The attention kernels to check ``arch`` with on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(arch))]
    found = ["eager", "sdpa"] if model_class._supports_sdpa else ["eager"]  # Gemma-2: no sdpa (soft-capping)
    if device == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            found.append("flash_attention_2")
        found.append("flex_attention")
    return found


def _pairs(tok: Any) -> list[dict[str, Any]]:
    from preftune.model.templating import tokenize_pair

    prompts = ["What is 3 plus 4? Answer in a full sentence, please.", "Name a colour.", "Say hello to me."]
    answers = [("Sure! 3 plus 4 is 7.", "7"), ("Blue is a colour.", "no."), ("Hello to you too!", "go away.")]
    features = []
    for i, (prompt, (chosen, rejected)) in enumerate(zip(prompts, answers, strict=True)):
        feature = tokenize_pair(tok, [{"role": "user", "content": prompt}], chosen, rejected, 128)
        features.append({**feature, "index": i, "margin": math.nan})
    return features


def _max_diff(a: Any, b: Any) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def _scoring(base: str, kernel: str, tok: Any, device: str) -> dict[str, float]:
    """Packed against one-at-a-time: log-probs per token, rewards, values (see the module docstring)."""
    import torch

    from preftune.model import modeling
    from preftune.model.losses import token_logprobs
    from preftune.model.precision import resolve_precision
    from preftune.model.scoring import score_sequences
    from preftune.model.templating import pad_id
    from preftune.train.batching import FIRST_ANSWER, PROMPT, PackedPairCollator, pack_documents
    from preftune.train.packed import scored_logprobs
    from preftune.train.ppo.models import TokenValueModel, response_values
    from preftune.train.reward import PackedRewardCollator, pair_rewards

    bf16 = resolve_precision("bf16")
    features = _pairs(tok)
    shared = "flash" not in kernel
    policy = (
        modeling.load_causal_lm(base, dtype=bf16.frozen_dtype, attn_implementation=kernel).to(device).eval()
    )
    reward = modeling.prepare_reward_model(
        base, use_lora=False, dtype=bf16.frozen_dtype, attn_implementation=kernel
    )
    reward = reward.to(device=device, dtype=bf16.frozen_dtype).eval()
    critic = TokenValueModel(reward)

    def moved(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(device) for k, v in batch.items()}

    def alone(model: Any, prompt: list[int], answer: list[int]) -> Any:
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1]
        return token_logprobs(logits, torch.tensor([answer], device=device))[0]

    answers = {i: f["chosen_ids"] for i, f in enumerate(features)}
    answers.update({len(features) + i: f["rejected_ids"] for i, f in enumerate(features)})
    with torch.no_grad(), bf16.autocast(device):
        batch = moved(PackedPairCollator(tok, prefix_sharing=shared, pack_length=256)(features))
        packed = scored_logprobs(policy, batch, fused_head=False)
        segments, positions = batch["target_segment"].tolist(), batch["target_pos"].tolist()
        one = [
            alone(policy, features[s % len(features)]["prompt_ids"], answers[s])[p]
            for s, p in zip(segments, positions, strict=True)
        ]
        rewards = torch.cat(
            pair_rewards(
                reward,
                moved(
                    PackedRewardCollator(
                        tok, reward.config.pad_token_id, prefix_sharing=shared, pack_length=256
                    )(features)
                ),
            )
        )
        seqs = [f["prompt_ids"] + f[k] for k in ("chosen_ids", "rejected_ids") for f in features]
        docs = [
            [(f["prompt_ids"], PROMPT, -1), (f["chosen_ids"], FIRST_ANSWER, k)]
            for k, f in enumerate(features)
        ]
        values = response_values(critic, moved(pack_documents(docs, pad_id(tok), 256)))
        one_values = []
        for f in features:
            ids = torch.tensor([f["prompt_ids"] + f["chosen_ids"]], device=device)
            out = critic(input_ids=ids, position_ids=torch.arange(ids.shape[1], device=device)[None])
            one_values.append(
                out[0, len(f["prompt_ids"]) - 1 : len(f["prompt_ids"]) - 1 + len(f["chosen_ids"])]
            )
        return {
            "logprob_diff": _max_diff(packed, torch.stack(one)),
            "reward_diff": _max_diff(rewards, torch.tensor(score_sequences(reward, seqs, batch_size=1))),
            "value_diff": _max_diff(values, torch.cat(one_values)),
            "prefix_shared": float(shared),
        }


def _training(base: str, kernel: str, tok: Any, tmp: Path) -> dict[str, float]:
    """One full fine-tuning step of SFT and of DPO under bf16 on the kernel (prefix sharing off for flash)."""
    from safetensors.torch import load_file

    from preftune.train.dpo import DPOConfig, train_dpo
    from preftune.train.sft import SFTConfig, train_sft

    rows = [
        {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": "Sure! 3 plus 4 is 7.",
            "rejected": "7",
        }
        for i in range(8)
    ]
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sft = tmp / "sft.jsonl"
    sft.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows)
    )
    common = dict(max_steps=1, batch_size=4, use_lora=False, learning_rate=1e-5, precision="bf16")
    common["attn_implementation"] = kernel
    out: dict[str, float] = {}
    report = str(tmp / "report.html")
    sft_metrics = train_sft(base, str(sft), str(sft), str(tmp / "sft"), report, SFTConfig(**common))
    dpo_config = DPOConfig(prefix_sharing="flash" not in kernel, **common)
    dpo_metrics = train_dpo(base, str(pairs), str(pairs), str(tmp / "dpo"), report, dpo_config)
    for name in ("sft", "dpo"):
        weights = load_file(str(tmp / name / "model.safetensors"))
        out[f"{name}_weights_fp32_finite"] = float(
            all(str(w.dtype) == "torch.float32" and bool(w.isfinite().all()) for w in weights.values())
        )
    out["sft_eval_loss"] = sft_metrics["eval_loss"]
    out["dpo_first_step_loss"] = dpo_metrics["first_step_loss"]
    return out


def _row(arch: str, kernel: str, base: str, tok: Any, device: str, tmp: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"arch": arch, "kernel": kernel}
    began = time.perf_counter()
    try:
        row.update(_scoring(base, kernel, tok, device))
        row.update(_training(base, kernel, tok, tmp))
        diffs = [row[k] for k in ("logprob_diff", "reward_diff", "value_diff")]
        row["ok"] = (
            all(d <= BOUND for d in diffs)
            and row["sft_weights_fp32_finite"] == 1.0
            and row["dpo_weights_fp32_finite"] == 1.0
            and abs(row["dpo_first_step_loss"] - math.log(2)) < 5e-3
        )
    except Exception as err:  # a row that fails is recorded, not fatal: the JSON says which combination broke
        row.update(ok=False, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-2000:])
    row["seconds"] = round(time.perf_counter() - began, 2)
    return row


def run(archs: list[str], device: str, out: Path) -> dict[str, Any]:
    """Every (architecture, kernel) row on ``device``; writes and returns the result."""
    import torch
    import transformers

    from preftune.model.modeling import load_tokenizer

    bases = _arch_bases()
    rows = []
    with tempfile.TemporaryDirectory(prefix="preftune-gpu-matrix-") as tmp:
        for arch in archs:
            base = bases.make_base(Path(tmp) / arch, arch, dtype="bf16", hidden=64, layers=2)
            tok = load_tokenizer(base)  # the family's chat template (Gemma, ChatML or the bundled one)
            for kernel in kernels(arch, device):
                work = Path(tmp) / f"{arch}-{kernel}"
                work.mkdir()
                rows.append(_row(arch, kernel, base, tok, device, work))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "trace"}), flush=True)
    flash = importlib.util.find_spec("flash_attn")
    result = {
        "device": torch.cuda.get_device_name(0)
        if device == "cuda"
        else f"cpu ({platform.processor() or 'cpu'})",
        "dry_run": device != "cuda",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "flash_attn": __import__("flash_attn").__version__ if flash is not None else None,
        "bound": BOUND,
        "rows": rows,
        "ok": all(r["ok"] for r in rows),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu-matrix.json")
    parser.add_argument("--arch", nargs="+", default=None, help="architectures (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU (eager and sdpa only)")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    archs = args.arch or list(_arch_bases().ARCHITECTURES)
    result = run(archs, "cpu" if args.dry_run else "cuda", args.out)
    bad = [f"{r['arch']}/{r['kernel']}" for r in result["rows"] if not r["ok"]]
    print(
        f"{len(result['rows'])} rows on {result['device']}: "
        + ("all within bounds" if not bad else f"FAILED {bad}")
    )
    print(f"wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
