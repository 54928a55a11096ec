"""Model loading from every kind of reference, stacked adapters, and what a saved artifact holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_model_dir, make_tokenizer

from preftune.io import storage
from preftune.model import modeling

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    tok = make_tokenizer(
        ["a tiny corpus for a tiny tokenizer"] * 20,
        special_tokens=["<eos>"],
        bos=None,
        eos="<eos>",
        pad=None,
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    # LlamaConfig's own special ids and initializer range; tied embeddings, no grouped-query attention.
    config = dict(
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.02
    )
    return Path(make_model_dir(tmp_path / "base", tok, special_ids=False, **config))


def _perturb_lora(model: torch.nn.Module, seed: int) -> None:
    """A fresh LoRA adapter is a no-op (B = 0); give it weights so stacking is observable."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.5


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def _save(model: torch.nn.Module, out: Path, stage: str, parent: str) -> None:
    modeling.save_model(
        model,
        modeling.load_tokenizer(parent),
        str(out),
        stage=stage,
        parent_uri=parent,
        parameters={"lr": 0.1},
        data={"train": "abc"},
        metrics={"loss": 1.5},
    )


def test_stacked_adapters_load_as_the_merged_chain(base_dir: Path, tmp_path: Path) -> None:
    sft = modeling.prepare_for_training(str(base_dir), use_lora=True, lora_r=4)
    _perturb_lora(sft, 1)
    sft_logits = _logits(sft)
    _save(sft, tmp_path / "sft", "sft", str(base_dir))

    policy = modeling.prepare_for_training(str(tmp_path / "sft"), use_lora=True, lora_r=4)
    _perturb_lora(policy, 2)
    with policy.disable_adapter():
        # the reference inside DPO/PPO: the same weights with the adapter off is exactly the SFT model
        assert torch.allclose(_logits(policy), sft_logits, atol=1e-5)
    policy_logits = _logits(policy)
    assert not torch.allclose(policy_logits, sft_logits, atol=1e-3)
    _save(policy, tmp_path / "dpo", "dpo", str(tmp_path / "sft"))

    reloaded = modeling.load_causal_lm(str(tmp_path / "dpo"))
    assert torch.allclose(_logits(reloaded), policy_logits, atol=1e-5)
    assert torch.allclose(_logits(modeling.load_causal_lm(str(tmp_path / "sft"))), sft_logits, atol=1e-5)

    lineage = json.loads((tmp_path / "dpo" / "lineage.json").read_text())
    assert [c["stage"] for c in lineage["chain"]] == ["base", "sft", "dpo"]
    assert lineage["base_model"] == str(base_dir)
    assert lineage["parent"] == str(tmp_path / "sft")
    assert lineage["adapter"] is True
    adapter_config = json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "sft")
    card = (tmp_path / "dpo" / "README.md").read_text()
    assert "LoRA adapter" in card and "`sft`" in card and "| loss | 1.5 |" in card


def test_saved_artifacts_hold_safetensors_only(base_dir: Path, tmp_path: Path) -> None:
    full = modeling.prepare_for_training(str(base_dir), use_lora=False)
    _save(full, tmp_path / "full", "sft", str(base_dir))
    files = {p.name for p in (tmp_path / "full").iterdir()}
    assert "model.safetensors" in files and "lineage.json" in files and "README.md" in files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert torch.allclose(_logits(modeling.load_causal_lm(str(tmp_path / "full"))), _logits(full), atol=1e-6)


def test_model_from_s3_and_adapter_whose_parent_is_on_s3(s3, base_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    storage.upload_dir(base_dir, s3.uri("models/base"))
    base_uri = s3.uri("models/base")
    model = modeling.load_causal_lm(base_uri)
    assert torch.allclose(_logits(model), _logits(modeling.load_causal_lm(str(base_dir))), atol=1e-6)

    sft = modeling.prepare_for_training(base_uri, use_lora=True, lora_r=4)
    _perturb_lora(sft, 3)
    _save(sft, tmp_path / "sft", "sft", base_uri)
    storage.upload_dir(tmp_path / "sft", s3.uri("models/sft"))
    reloaded = modeling.load_causal_lm(s3.uri("models/sft"))
    assert torch.allclose(_logits(reloaded), _logits(sft), atol=1e-5)
    assert modeling.load_tokenizer(s3.uri("models/sft")).eos_token == "<eos>"


def test_hub_id_resolves_through_the_hugging_face_cache(base_dir: Path, tmp_path: Path) -> None:
    """A hub id goes to transformers unchanged; here it is served offline from a prepared HF cache."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for item in base_dir.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    refs = tmp_path / "hub" / "models--acme--tiny-chat" / "refs"
    refs.mkdir()
    (refs / "main").write_text("0123abc")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = (
        "from preftune.model.modeling import load_causal_lm, load_tokenizer, resolve\n"
        "assert resolve('acme/tiny-chat') == 'acme/tiny-chat'\n"
        "m = load_causal_lm('acme/tiny-chat'); t = load_tokenizer('acme/tiny-chat')\n"
        "print(type(m).__name__, t.eos_token)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("LlamaForCausalLM <eos>")


@pytest.mark.parametrize(
    ("ref", "error", "match"),
    [
        ("", ValueError, "empty"),
        ("./no/such/model", FileNotFoundError, "does not exist"),
        ("http://example.com/model", ValueError, "unsupported scheme"),
    ],
)
def test_bad_references_give_clear_errors(ref: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        modeling.resolve(ref)


def test_a_file_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        modeling.resolve(str(path))


def test_remote_code_is_never_run_unless_asked(base_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "remote-code-ran"
    config = json.loads((base_dir / "config.json").read_text())
    config["model_type"] = "preftune_untrusted"
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (base_dir / "config.json").write_text(json.dumps(config))
    (base_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        modeling.load_causal_lm(str(base_dir))
    assert not marker.exists()
