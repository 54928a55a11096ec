"""Shared pieces of the benchmark: data, models, measurements (run inside each worker subprocess)."""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = ROOT / "examples" / "tiny-llama"
PREFERENCES = ROOT / "examples" / "data" / "preferences.jsonl"
SFT_DATA = ROOT / "examples" / "data" / "sft.jsonl"
CACHE = Path(os.environ.get("PREFTUNE_BENCH_CACHE", ROOT / ".bench-cache"))


def set_threads() -> int:
    """Pin torch's intra-op threads (PREFTUNE_BENCH_THREADS, default 1) so ours and TRL get the same.

    Idempotent: a child forked from a parent that already pinned them (benchmarks.forkserver) keeps them.
    """
    import torch

    n = int(os.environ.get("PREFTUNE_BENCH_THREADS", "1"))
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != 1:  # settable once per process, before any inter-op work
        torch.set_num_interop_threads(1)
    return n


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_gpu_mb() -> dict[str, float]:
    """``{"peak_gpu_mb": ...}``: the most GPU memory torch held at once in this process (empty without CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}


def _messages(prompt: Any) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def pair_rows(n: int) -> list[dict[str, Any]]:
    """The first ``n`` bundled preference pairs in the contract shape (prompt as chat messages)."""
    rows = []
    with PREFERENCES.open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({"prompt": _messages(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]})
            if len(rows) == n:
                break
    return rows


def sft_rows(n: int) -> list[dict[str, Any]]:
    rows = []
    with SFT_DATA.open(encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if not isinstance(r.get("completion"), str) or "prompt" not in r:
                continue  # the bundled file also holds other accepted shapes; keep prompt/completion rows
            rows.append({"prompt": _messages(r["prompt"]), "completion": r["completion"]})
            if len(rows) == n:
                break
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


#: A ~20M-parameter Llama (random init) on the bundled tokenizer, for the MFU measurement.
MFU_SHAPE = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=6)
#: Random-init Llamas the bench builds once into its cache, by name: the ~20M model, a ~125M one (GPT-2 /
#: Llama-small sized: hidden 768, 12 layers, MLP 2048, a 32k vocabulary, untied LM head) and, for the GPU run
#: (benchmarks/gpu.sh), Llamas of Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes (grouped-query attention, 152k
#: vocabulary, tied head). The bundled tokenizer writes the ids (its 1.5k tokens are the first rows of the
#: embedding), so the texts are the same tokens as the other rows, while the LM head and its softmax cost what
#: the real vocabulary costs. Missing keys: key/value heads = attention heads, head tied to the embedding.
SHAPES: dict[str, dict[str, Any]] = {
    "20m": MFU_SHAPE,
    "125m": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
    ),
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
    ),
}


def shape_config(name: str) -> Any:
    """The transformers config of the benchmark model ``name`` of :data:`SHAPES` (no weights made)."""
    from transformers import AutoConfig

    shape = SHAPES[name]
    config = AutoConfig.from_pretrained(str(TINY_MODEL))
    for key, value in shape.items():
        setattr(config, key, value)
    config.num_key_value_heads = shape.get("num_key_value_heads", shape["num_attention_heads"])
    config.head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    config.tie_word_embeddings = shape.get("tie_word_embeddings", True)
    return config


def model_dir(name: str) -> str:
    """``tiny`` (the bundled ~1M-parameter model) or a name of :data:`SHAPES` (random init, built once into the
    cache)."""
    if name == "tiny":
        return str(TINY_MODEL)
    if name not in SHAPES:
        raise ValueError(f"unknown benchmark model {name!r}")
    out = CACHE / f"llama-{name}"
    if (out / "config.json").is_file():  # the folder is moved into place whole, once written
        return str(out)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(shape_config(name))
    if name.endswith(
        "b"
    ):  # billion-sized: a bf16 checkpoint, as such models ship (trained weights load as fp32)
        model = model.to(torch.bfloat16)
    tmp = out.with_name(out.name + f".{os.getpid()}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(TINY_MODEL)).save_pretrained(str(tmp))
    for extra in ("chat_template.jinja",):
        if (TINY_MODEL / extra).is_file() and not (tmp / extra).is_file():
            (tmp / extra).write_text((TINY_MODEL / extra).read_text())
    os.replace(tmp, out) if not out.exists() else None
    return str(out)


def reward_model_dir(name: str) -> str:
    """A reward model for the PPO benchmark, built once into the cache: the benchmark model with a score head,
    trained for one epoch (full weights, Bradley-Terry) on the first 256 bundled pairs by preftune's own trainer.

    Both PPO and RLOO load this directory as their reward model, so its quality only shapes what the policies
    learn to sample, never which side does more work.
    """
    out = CACHE / f"reward-{name}"
    if (out / "model.safetensors").is_file():
        return str(out)
    import shutil
    import tempfile

    from preftune.train import reward

    tmp = Path(tempfile.mkdtemp(prefix="bench-rm-", dir=CACHE if CACHE.is_dir() else None))
    train = write_jsonl(tmp / "train.jsonl", pair_rows(256))
    config = reward.RewardConfig(
        epochs=1, use_lora=False, eval_steps=0, logging_steps=10**6, seed=0, precision="fp32"
    )
    reward.train_reward_model(model_dir(name), train, train, str(tmp / "model"), str(tmp / "r.html"), config)
    CACHE.mkdir(parents=True, exist_ok=True)
    os.replace(tmp / "model", out) if not out.exists() else None
    shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def param_counts(model: Any) -> dict[str, int]:
    """Parameters of the model: all (non-embedding matmul weights counted for FLOPs) and trainable."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"params": total, "trainable": trainable}


def matmul_params(config: Any) -> int:
    """N for the FLOPs formula: weights that take part in matmuls per token (layers + LM head; the embedding
    lookup is a gather, not counted)."""
    h, i, layers, v = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
        config.vocab_size,
    )
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * i
    return layers * (attn + mlp) + h * v


def trl_device_args(precision: str, liger: bool) -> dict[str, Any]:
    """TRL config arguments for where a run goes: the GPU when there is one (else the CPU), bf16 autocast when
    ``precision`` is bf16 (TRL's default on capable hardware, so fp32 must be asked for), Liger kernels on request
    (TRL's ``use_liger_kernel``: fused RMSNorm, SwiGLU, RoPE and its fused linear + cross-entropy losses)."""
    import torch

    args: dict[str, Any] = {"use_cpu": not torch.cuda.is_available(), "bf16": precision == "bf16"}
    if liger:
        args["use_liger_kernel"] = True
    return args


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed
