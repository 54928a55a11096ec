"""Tests of preftune.train.sft on a tiny random Llama built offline (seconds on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_model_dir, make_tokenizer, write_jsonl

from preftune.model import modeling
from preftune.train.batching import DataError
from preftune.train.sft import SFTConfig, train_sft

ANSWERS = ["the sky is blue.", "two plus two is four.", "paris is in france.", "cats like to sleep."]


def sft_rows(n: int) -> list[dict]:
    return [
        {
            "id": f"{i:016x}",
            "prompt": [{"role": "user", "content": f"question {i % 4}"}],
            "completion": ANSWERS[i % 4],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> str:
    tok = make_tokenizer([*ANSWERS, "<|user|> <|assistant|> question what is tell me"])
    return make_model_dir(tmp_path_factory.mktemp("base"), tok)


def _config(**overrides) -> SFTConfig:
    values = dict(
        epochs=3, learning_rate=3e-3, batch_size=4, max_length=48, logging_steps=1, eval_batch_size=8
    )
    values.update(overrides)
    return SFTConfig(**values)


@pytest.mark.parametrize("use_lora", [True, False])
def test_sft_lowers_loss_and_saves_artifact(base: str, tmp_path: Path, use_lora: bool) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(16))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", sft_rows(4))
    out, report = tmp_path / "model", tmp_path / "report.html"
    metrics = train_sft(
        base, train, eval_, str(out), str(report), _config(use_lora=use_lora, learning_rate=1e-2)
    )

    assert set(metrics) == {
        "train_loss", "eval_loss", "eval_perplexity", "steps", "train_tokens", "train_seconds", "train_examples",
        "resumed_from_step", "stage_seconds", "peak_memory_mb",
    }  # fmt: skip
    assert metrics["steps"] == 12  # 16 examples / batch 4 = 4 steps x 3 epochs
    assert metrics["train_examples"] == 16
    assert metrics["train_tokens"] > 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["stage"] == "sft" and lineage["parent"] == base and lineage["adapter"] is use_lora
    assert lineage["parameters"]["use_lora"] is use_lora
    html = report.read_text()
    assert "SFT training" in html and "data:image/png;base64" in html

    # The eval loss before training (recorded by the report) is higher than after.
    before = modeling.load_causal_lm(base)
    after = modeling.load_causal_lm(str(out))
    tok = modeling.load_tokenizer(str(out))
    from preftune.train.batching import SFTCollator, load_sft_features, model_inputs
    from preftune.train.sft import completion_nll

    batch = SFTCollator(tok)(load_sft_features(eval_, tok, 48))
    with torch.no_grad():
        losses = [completion_nll(m(**model_inputs(batch)).logits, batch) for m in (before, after)]
    loss_before, loss_after = (float(nll / n) for nll, n in losses)
    assert loss_after < loss_before - 0.3
    assert metrics["eval_loss"] == pytest.approx(loss_after, abs=1e-4)


def test_sft_max_steps_and_accumulation(base: str, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(10))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", sft_rows(2))
    # 10 examples / batch 2 = 5 batches = 3 steps per epoch (the last window is short), so 4 steps span 2 epochs;
    # eval_steps=1 evaluates mid-epoch between accumulation windows.
    config = _config(
        max_steps=4, batch_size=2, gradient_accumulation_steps=2, logging_steps=2, eval_steps=1, pack_length=0
    )
    report = tmp_path / "r.html"
    metrics = train_sft(base, train, eval_, str(tmp_path / "m"), str(report), config)
    assert metrics["steps"] == 4
    evals = report.read_text().split("<h2>Evaluations</h2>")[1].split("</table>")[0]
    assert evals.count("<tr>") == 1 + 5  # header; step 0; 1 and 2 mid-epoch; 3 (end of epoch 1); 4 (stop)


def test_sft_bad_row_names_file_row_and_field(base: str, tmp_path: Path) -> None:
    rows = sft_rows(3)
    rows[1]["completion"] = ""
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl: row 2: field 'completion'"):
        train_sft(base, train, train, str(tmp_path / "m"), str(tmp_path / "r.html"), _config())


def test_packed_batches_give_the_padded_loss_and_gradients(base: str, tmp_path: Path) -> None:
    from preftune.train.batching import PackedSFTCollator, SFTCollator, load_sft_features
    from preftune.train.sft import batch_nll

    rows = sft_rows(8)
    for i, row in enumerate(rows):  # lengths differ, so the padded batch has padding and packing has work
        row["completion"] = " ".join([row["completion"]] * (1 + i % 3))
        row["prompt"][0]["content"] += " tell me" * (i % 4)
    tok = modeling.load_tokenizer(base)
    features = load_sft_features(write_jsonl(tmp_path / "train.jsonl", rows), tok, 48)
    model = modeling.prepare_for_training(base, use_lora=True)
    model.eval()  # no dropout: the two layouts must see the same function

    def loss_and_grads(batch: dict, fused: bool) -> tuple[float, int, list[torch.Tensor]]:
        model.zero_grad()
        nll, n = batch_nll(model, batch, fused_head=fused)
        (nll / n).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return float(nll.detach()), int(n), grads

    padded = SFTCollator(tok)(features)
    assert (padded["attention_mask"] == 0).any()
    nll0, n0, grads0 = loss_and_grads(padded, True)
    assert n0 == sum(len(f["completion_ids"]) for f in features)
    for pack_length in (0, 40, 1024):
        packed = PackedSFTCollator(tok, pack_length=pack_length)(features)
        if pack_length == 1024:
            assert packed["input_ids"].shape[0] == 1  # everything in one row, no padding at all
            assert packed["input_ids"].numel() == int(packed["tokens"])
        for fused in (True, False):
            nll, n, grads = loss_and_grads(packed, fused)
            assert n == n0
            assert nll == pytest.approx(nll0, rel=1e-5)
            for g, g0 in zip(grads, grads0, strict=True):
                torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # per example too (evaluation gathers those across processes)
            per_example = batch_nll(model, packed, per_example=True)
            per_row = batch_nll(model, padded, per_example=True)
        torch.testing.assert_close(per_example[0], per_row[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(per_example[1], per_row[1])


def test_sft_trains_unpacked_and_packed_alike(base: str, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows(8))
    eval_ = write_jsonl(tmp_path / "eval.jsonl", sft_rows(4))
    results = [
        train_sft(
            base, train, eval_, str(tmp_path / f"m{k}"), str(tmp_path / f"r{k}.html"), _config(pack_length=k)
        )
        for k in (0, 256)
    ]
    # Same examples per step, the same loss function: the same training run up to float rounding.
    assert results[0]["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-3)
    assert results[0]["train_tokens"] == results[1]["train_tokens"]
