"""Build each alignment-benchmark task's data and a base model fitted to it, offline and seeded.

For a task (benchmarks.alignment_tasks): its data files; a byte-level BPE tokenizer trained on its texts with
the ``tokenizers`` library (the bundled model's special tokens and chat template, examples/make_examples.py); a
randomly initialised ~0.6M-parameter Llama pre-trained briefly on chat-formatted task texts; then SFT on the
task's SFT rows with preftune's own trainer (full fine-tuning, 3 epochs, lr 3e-3, batch 32: the setting of
issue 16). The SFT model is the reference every method starts from. Nothing is downloaded.

    python -m benchmarks.alignment_base --task sentiment --out .bench-cache/alignment
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.alignment_tasks import TASKS, Task, make_task_data

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: The base model's shape: ~0.54M parameters with the task's 1024-token vocabulary.
SHAPE = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
VOCAB = 1024
PRETRAIN = {"steps": 600, "lr": 3e-3, "seq_len": 128, "batch": 16}
SFT = {"epochs": 3, "learning_rate": 3e-3, "batch_size": 32, "use_lora": False}


def _examples_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _base_model(task_dir: Path, corpus: list[str], seed: int) -> tuple[str, float]:
    """Tokenizer + random Llama pre-trained on the chat-formatted corpus; returns its directory and final loss
    (kept: a second build reuses it)."""
    out = task_dir / "base"
    if (out / "pretrain.json").is_file():
        return str(out), json.loads((out / "pretrain.json").read_text(encoding="utf-8"))["loss"]
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ex = _examples_module()
    chats = [
        ex.render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        for prompt, answer in (text.split("\n", 1) for text in corpus)
    ]
    tok = ex.train_tokenizer(chats, VOCAB)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        num_key_value_heads=SHAPE["num_attention_heads"],
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPE,
    )
    model = LlamaForCausalLM(config)
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(chats):
        ids.extend(enc.ids)
    p = PRETRAIN
    loss = ex.pretrain(model, ids, p["steps"], seed, p["lr"], p["seq_len"], p["batch"])
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ex.patch_tokenizer_config(out / "tokenizer_config.json")
    (out / "pretrain.json").write_text(json.dumps({"loss": loss, **PRETRAIN}), encoding="utf-8")
    return str(out), loss


def build_task(task: Task, out: Path, *, seed: int = 0) -> dict[str, Any]:
    """Write the task's data, base model and SFT model under ``out/<task>/``; returns what was built (also
    written to ``built.json``, which makes a second call a no-op)."""
    task_dir = out / task.name
    marker = task_dir / "built.json"
    if marker.is_file():
        return json.loads(marker.read_text(encoding="utf-8"))
    from preftune.config.sft import SFTConfig
    from preftune.train.sft import train_sft

    began = time.perf_counter()
    data = make_task_data(task, seed=seed)
    files = {
        name: write_jsonl(task_dir / "data" / f"{name}.jsonl", getattr(data, name))
        for name in ("sft", "train_pairs", "eval_pairs", "eval_prompts")
    }
    cut = len(data.sft) // 10
    files["sft_train"] = write_jsonl(task_dir / "data" / "sft_train.jsonl", data.sft[cut:])
    files["sft_eval"] = write_jsonl(task_dir / "data" / "sft_eval.jsonl", data.sft[:cut])
    base, pretrain_loss = _base_model(task_dir, data.corpus, seed)
    sft_dir = task_dir / "sft"
    sft = train_sft(
        base,
        files["sft_train"],
        files["sft_eval"],
        str(sft_dir / "model"),
        str(sft_dir / "report.html"),
        SFTConfig(seed=seed, **SFT),
    )
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    built = {
        "task": task.name,
        "scorer": task.scorer_name,
        "files": files,
        "base": base,
        "sft": str(sft_dir / "model"),
        "parameters": params,
        "pretrain_loss": pretrain_loss,
        "sft_eval_loss": sft["eval_loss"],
        "seconds": time.perf_counter() - began,
    }
    marker.write_text(json.dumps(built, indent=2), encoding="utf-8")
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task", choices=sorted(TASKS), action="append", help="task(s) to build (default all)"
    )
    parser.add_argument("--out", type=Path, default=Path(".bench-cache/alignment"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.task or sorted(TASKS):
        built = build_task(TASKS[name], args.out, seed=args.seed)
        print(json.dumps(built, indent=2))


if __name__ == "__main__":
    main()
