"""Tiny random base models of the common open architectures, for the architecture tests and end-to-end runs.

    python examples/make_arch_bases.py OUT_DIR [--arch gemma2 qwen2 ...] [--dtype bf16|fp32] [--seed 0]

writes ``OUT_DIR/tiny-<arch>/`` for each architecture: random weights built from transformers' own config of
that architecture (no download), saved as safetensors in the dtype asked for (bf16 by default, as hub
checkpoints are), with a tokenizer and a chat template of that model family. The tokenizer is the bundled
``examples/tiny-llama`` byte-level BPE; the family's turn markers are added to it as special tokens, so:

- Gemma (gemma2, gemma3_text): ``<start_of_turn>`` / ``<end_of_turn>``: a turn ends with ``<end_of_turn>``,
  which is not eos (as in Gemma's own template);
- Qwen (qwen2, qwen3): ChatML, ``<|im_start|>`` / ``<|im_end|>``, again an end of turn that is not eos;
- the others keep the bundled template, whose turns end with eos.

Nothing this writes is committed: the tests build the bases into a temporary directory. ``arch_config`` is the
one place the tests (tests/tiny_models.py) and the GPU check (benchmarks/gpu_matrix.py) get these configs from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parent
TINY_LLAMA = EXAMPLES / "tiny-llama"

#: The architectures checked (issue 14): one tiny config of each, straight from transformers.
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox")

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
    "\n{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Each family's chat template and the special tokens it adds (None: the bundled template).
FAMILIES: dict[str, tuple[str, list[str]] | None] = {
    "gemma": (GEMMA_TEMPLATE, ["<start_of_turn>", "<end_of_turn>"]),
    "chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"]),
}


def family(arch: str) -> str:
    """The chat-template family of an architecture: gemma, chatml, or bundled."""
    if arch.startswith("gemma"):
        return "gemma"
    if arch.startswith("qwen"):
        return "chatml"
    return "bundled"


def arch_config(
    arch: str,
    *,
    vocab_size: int,
    pad: int | None,
    bos: int | None,
    eos: int | None,
    hidden: int = 32,
    layers: int = 2,
    window: int | None = None,
    max_positions: int = 128,
    **overrides: Any,
) -> Any:
    """A tiny config of ``arch`` from transformers' own config class: 4 heads (2 key-value heads) of 8 dims.

    ``window`` gives every model that has sliding-window layers that window (mixed full and sliding layers
    where the family mixes them), so short test documents already cross it.
    """
    from transformers import AutoConfig

    values: dict[str, Any] = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        initializer_range=0.2,
    )
    if arch == "gpt_neox":
        for key in ("num_key_value_heads", "head_dim"):
            values.pop(key)
    if window is not None:
        if arch in ("mistral", "phi3", "gemma2"):
            values["sliding_window"] = window
        elif arch == "gemma3_text":
            values.update(
                sliding_window=window, layer_types=["sliding_attention", "full_attention"] * (layers // 2)
            )
        elif arch in ("qwen2", "qwen3"):
            values.update(use_sliding_window=True, sliding_window=window, max_window_layers=1)
    values.update(overrides)
    return AutoConfig.for_model(arch, **values)


def chat_tokenizer(style: str, source: Path = TINY_LLAMA) -> Any:
    """The bundled tokenizer with a family's chat template (``gemma``, ``chatml`` or ``bundled``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    spec = FAMILIES.get(style)
    if spec is not None:
        template, tokens = spec
        tokenizer.add_special_tokens({"additional_special_tokens": tokens})
        tokenizer.chat_template = template
    return tokenizer


def make_base(
    out_dir: Path, arch: str, *, dtype: str = "bf16", seed: int = 0, hidden: int = 64, layers: int = 2
) -> str:
    """One random ``arch`` base with its family's tokenizer, saved in ``dtype`` under ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = chat_tokenizer(family(arch))
    config = arch_config(
        arch,
        vocab_size=len(tokenizer),
        pad=tokenizer.pad_token_id,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        hidden=hidden,
        layers=layers,
        max_positions=512,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(
        {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write tiny-<arch>/ into")
    parser.add_argument("--arch", nargs="+", default=["gemma2", "qwen2"], choices=ARCHITECTURES)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for arch in args.arch:
        path = make_base(args.out / f"tiny-{arch}", arch, dtype=args.dtype, seed=args.seed)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
