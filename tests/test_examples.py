"""The bundled tiny model and sample data under examples/: loadable, well-formed, small and reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL = EXAMPLES / "tiny-llama"
DATA = EXAMPLES / "data"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _prompt_text(prompt: str | list[dict]) -> str:
    """The last user turn of a prompt (text or chat messages): what disjointness is about."""
    if isinstance(prompt, str):
        return prompt
    return [m["content"] for m in prompt if m["role"] == "user"][-1]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL)


def test_model_files_are_safetensors_only():
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)


def test_model_is_a_small_llama(model):
    assert model.config.model_type == "llama"
    assert type(model).__name__ == "LlamaForCausalLM"
    n = sum(p.numel() for p in model.parameters())
    assert 2e5 < n < 10e6
    assert model.config.tie_word_embeddings
    assert model.config.max_position_embeddings == 512


def test_tokenizer_is_byte_level_bpe_with_special_tokens(tokenizer, model):
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    assert backend["model"]["type"] == "BPE"
    assert backend["pre_tokenizer"]["type"] == "ByteLevel"
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.bos_token == "<|bos|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.unk_token is not None
    assert tokenizer.padding_side == "right"
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    # Byte-level: any text round-trips, even characters never seen in the corpus.
    text = "Grüße, 東京! 3 + 4 = 7"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert len(tokenizer(t, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_generation_prompt(tokenizer):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 3 plus 4?"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe kind.<|end|>\n<|user|>\nWhat is 3 plus 4?<|end|>\n<|assistant|>\n"
    full = tokenizer.apply_chat_template(
        [*msgs, {"role": "assistant", "content": "Sure! 3 plus 4 is 7."}], tokenize=False
    )
    assert full.startswith(text) and full.endswith("Sure! 3 plus 4 is 7.<|end|>\n")


def test_model_generates(tokenizer, model):
    import torch

    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    new = out[0, enc["input_ids"].shape[1] :]
    assert 0 < len(new) <= 12
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


def test_sft_data():
    rows = _read_jsonl(DATA / "sft.jsonl")
    assert 1500 <= len(rows) <= 3000
    plain = [r for r in rows if "prompt" in r]
    chat = [r for r in rows if "messages" in r]
    assert plain and chat and len(plain) + len(chat) == len(rows)
    for r in plain:
        assert (
            isinstance(r["prompt"], str)
            and r["prompt"]
            and isinstance(r["completion"], str)
            and r["completion"]
        )
    for r in chat:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-1] == "assistant" and roles[-2] == "user"
        assert set(roles) <= {"system", "user", "assistant"}
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])


def test_preference_data():
    rows = _read_jsonl(DATA / "preferences.jsonl")
    assert 1500 <= len(rows) <= 3000
    for r in rows:
        assert set(r) <= {"prompt", "chosen", "rejected", "margin", "comment"}
        assert (
            isinstance(r["chosen"], str) and isinstance(r["rejected"], str) and r["chosen"] != r["rejected"]
        )
        assert _prompt_text(r["prompt"])
        if "margin" in r:
            assert isinstance(r["margin"], float) and r["margin"] > 0
    assert any(isinstance(r["prompt"], list) for r in rows)
    assert any("margin" in r for r in rows) and any("comment" in r for r in rows)


def test_eval_prompts_are_held_out():
    evals = [_prompt_text(r["prompt"]) for r in _read_jsonl(DATA / "eval_prompts.jsonl")]
    assert len(evals) == 64 == len(set(evals))
    sft = {_prompt_text(r["prompt"]) if "prompt" in r else None for r in _read_jsonl(DATA / "sft.jsonl")}
    for r in _read_jsonl(DATA / "sft.jsonl"):
        if "messages" in r:
            sft.update(m["content"] for m in r["messages"] if m["role"] == "user")
    prefs = {_prompt_text(r["prompt"]) for r in _read_jsonl(DATA / "preferences.jsonl")}
    assert not set(evals) & sft
    assert not set(evals) & prefs


def test_data_generation_is_deterministic(tmp_path):
    script = EXAMPLES / "make_examples.py"
    for name in ("a", "b"):
        subprocess.run(
            [sys.executable, str(script), "--data-only", "--out", str(tmp_path / name)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    for f in ("sft.jsonl", "preferences.jsonl", "eval_prompts.jsonl"):
        a = (tmp_path / "a" / "data" / f).read_bytes()
        assert a == (tmp_path / "b" / "data" / f).read_bytes(), f
        # ... and the committed files are exactly what the committed script makes.
        assert a == (DATA / f).read_bytes(), f"examples/data/{f} is stale: rerun examples/make_examples.py"


def test_examples_are_small():
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 10 * 1024 * 1024
