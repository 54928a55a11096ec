"""Tiny random Llamas (and the other common architectures) and byte-level BPE tokenizers built offline, shared
by the tests.

Build a tokenizer with ``make_tokenizer``, a model for it with ``make_model`` (or ``make_config``), and save both as a
model artifact with ``save_model_dir``; ``make_model_dir`` does all of that at once. ``make_arch_model`` and
``make_arch_dir`` do the same for any of ``ARCHITECTURES`` (configs from examples/make_arch_bases.py).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _arch_bases() -> Any:
    spec = importlib.util.spec_from_file_location("make_arch_bases", EXAMPLES / "make_arch_bases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: examples/make_arch_bases.py: the architectures and their tiny configs.
ARCH_BASES = _arch_bases()
ARCHITECTURES: tuple[str, ...] = ARCH_BASES.ARCHITECTURES
#: The sliding window of the architecture tests' models: shorter than their documents, so masks must apply it.
WINDOW = 8

# Every message ends with eos; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Preferred and dispreferred answers, and the corpus a tokenizer for pairs built from them is trained on.
GOOD = ["the sky is blue, thank you.", "two plus two is four, thank you.", "paris is in france, thank you."]
BAD = ["no.", "go away.", "whatever."]
PAIR_CORPUS = [*GOOD, *BAD, "<|user|> <|assistant|> question"]


def make_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int = 300,
    special_tokens: Sequence[str] = ("<pad>", "<s>", "</s>"),
    bos: str | None = "<s>",
    eos: str | None = "</s>",
    pad: str | None = "<pad>",
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``; a special token given as None is left unset."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus, trainer)
    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **{k: v for k, v in named.items() if v is not None})
    tok.chat_template = chat_template
    return tok


def make_config(tok: PreTrainedTokenizerFast, *, special_ids: bool = True, **overrides: Any) -> LlamaConfig:
    """A 2-layer Llama config for ``tok``'s vocabulary, with its bos/eos/pad ids unless ``special_ids`` is False.

    initializer_range=0.2 gives peaked distributions: a head wide enough that a LoRA on the blocks, or a
    perturbation of the weights, moves the logits visibly.
    """
    values: dict[str, Any] = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    if special_ids:
        values.update(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,  # None without a pad token
        )
    values.update(overrides)
    return LlamaConfig(**values)


def make_model(tok: PreTrainedTokenizerFast, *, seed: int = 0, **config: Any) -> LlamaForCausalLM:
    """A random causal Llama for ``tok`` (see ``make_config``), its weights drawn after ``torch.manual_seed(seed)``."""
    llama_config = make_config(tok, **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config)


def save_model_dir(model: PreTrainedModel, tok: PreTrainedTokenizerFast, path: Path) -> str:
    """Save a model and its tokenizer (safetensors) as a model artifact in ``path``; returns the path."""
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return str(path)


def make_model_dir(path: Path, tok: PreTrainedTokenizerFast, *, seed: int = 0, **config: Any) -> str:
    """A random causal Llama for ``tok`` saved with it as a model artifact in ``path``; returns the path."""
    return save_model_dir(make_model(tok, seed=seed, **config), tok, path)


def make_policy_dir(path: Path, *, pad: str | None = "<pad>", **config: Any) -> str:
    """The random starting policy of the preference tests: a tokenizer trained on PAIR_CORPUS and its model."""
    return make_model_dir(path, make_tokenizer(PAIR_CORPUS, pad=pad), **config)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def pair_rows(n: int) -> list[dict]:
    """``n`` preference pairs, a GOOD answer chosen over a BAD one, with distinct prompts."""
    return [
        {
            "id": f"{i:016x}",
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": GOOD[i % 3],
            "rejected": BAD[(i + 1) % 3],
            "margin": None,
            "meta": {},
        }
        for i in range(n)
    ]


def make_counting_reward(policy_dir: str, out_dir: Path, target: int) -> str:
    """A reward model whose score rises with the number of ``target`` tokens in the sequence."""
    from preftune.model import modeling

    tok = modeling.load_tokenizer(policy_dir)
    hidden = 32
    config = make_config(
        tok,
        hidden_size=hidden,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=hidden,
        num_labels=1,
        initializer_range=0.02,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    layer = model.model.layers[0]
    with torch.no_grad():
        layer.self_attn.q_proj.weight.zero_()  # uniform attention: each position sees the mean of its prefix
        layer.self_attn.k_proj.weight.zero_()
        layer.self_attn.v_proj.weight.copy_(torch.eye(hidden))
        layer.self_attn.o_proj.weight.copy_(4.0 * torch.eye(hidden))
        layer.mlp.down_proj.weight.zero_()
        embeddings = model.model.embed_tokens.weight
        embeddings.normal_()
        direction = embeddings[target] / embeddings[target].norm()
        model.score.weight.copy_(direction.unsqueeze(0) * 10.0 / math.sqrt(hidden))
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return str(out_dir)


def make_arch_model(
    arch: str, tok: PreTrainedTokenizerFast, *, seed: int = 0, **overrides: Any
) -> PreTrainedModel:
    """A random fp32 causal LM of ``arch`` for ``tok`` (2 layers, hidden 32, sliding windows of ``WINDOW``)."""
    from transformers import AutoModelForCausalLM

    config = ARCH_BASES.arch_config(
        arch,
        vocab_size=len(tok),
        pad=tok.pad_token_id,
        bos=tok.bos_token_id,
        eos=tok.eos_token_id,
        window=WINDOW,
        **overrides,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def make_arch_dir(
    path: Path, arch: str, tok: PreTrainedTokenizerFast, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> str:
    """``make_arch_model`` saved in ``dtype`` (as a bf16 hub checkpoint is) with ``tok`` in ``path``."""
    return save_model_dir(make_arch_model(arch, tok, seed=seed).to(dtype), tok, path)
