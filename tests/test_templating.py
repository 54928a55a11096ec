"""Chat templating, tokenisation with truncation, and the label masks the training loops rely on."""

from __future__ import annotations

import pytest
import tiny_models
from transformers import PreTrainedTokenizerFast

from preftune.model.templating import render_prompt, tokenize_example, tokenize_pair
from preftune.train.batching import IGNORE_INDEX, PairCollator, SFTCollator

USER = [{"role": "user", "content": "what colour is the sky?"}]
CORPUS = ["what colour is the sky? the sky is blue.", "<|user|> <|assistant|>"]


def make_tokenizer(pad: str | None = "<pad>") -> PreTrainedTokenizerFast:
    return tiny_models.make_tokenizer(CORPUS, pad=pad)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def test_render_prompt_ends_at_the_assistant_turn(tok: PreTrainedTokenizerFast) -> None:
    system = [{"role": "system", "content": "be brief"}, *USER]
    assert (
        render_prompt(tok, system)
        == "<s><|system|>\nbe brief</s>\n<|user|>\nwhat colour is the sky?</s>\n<|assistant|>\n"
    )


def test_render_prompt_needs_a_chat_template() -> None:
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(bare, USER)


def test_tokenize_example_splits_prompt_and_completion(tok: PreTrainedTokenizerFast) -> None:
    out = tokenize_example(tok, USER, "the sky is blue.", max_length=200)
    assert out["prompt_ids"] == tok(render_prompt(tok, USER), add_special_tokens=False)["input_ids"]
    assert out["prompt_ids"][0] == tok.bos_token_id and out["prompt_ids"].count(tok.bos_token_id) == 1
    assert out["completion_ids"][-1] == tok.eos_token_id
    assert tok.decode(out["completion_ids"][:-1]) == "the sky is blue."
    assert out["truncated"] is False


def test_truncation_keeps_the_prompt_end_and_cuts_the_completion(tok: PreTrainedTokenizerFast) -> None:
    long_prompt = [{"role": "user", "content": "the sky " * 40 + "what colour is the sky?"}]
    full = tokenize_example(tok, long_prompt, "the sky is blue. " * 20, max_length=10_000)
    out = tokenize_example(tok, long_prompt, "the sky is blue. " * 20, max_length=40)
    assert out["truncated"] is True
    assert len(out["prompt_ids"]) + len(out["completion_ids"]) == 40
    # Prompt: half the budget, the leading bos plus its last 19 tokens (the end holds the generation prompt).
    assert len(out["prompt_ids"]) == 20
    assert out["prompt_ids"] == [tok.bos_token_id] + full["prompt_ids"][-19:]
    # Completion: its start, cut; no eos, since the answer did not end there.
    assert out["completion_ids"] == full["completion_ids"][:20]
    assert tok.eos_token_id not in out["completion_ids"]
    # A short completion leaves the prompt more room: it keeps everything it can.
    short = tokenize_example(tok, long_prompt, "blue.", max_length=40)
    assert len(short["prompt_ids"]) + len(short["completion_ids"]) == 40
    assert short["completion_ids"][-1] == tok.eos_token_id


def test_tokenize_pair_shares_the_prompt(tok: PreTrainedTokenizerFast) -> None:
    long_prompt = [{"role": "user", "content": "the sky " * 40}]
    out = tokenize_pair(tok, long_prompt, "the sky is blue. " * 5, "no.", max_length=48)
    assert out["truncated"] is True
    single = tokenize_example(tok, long_prompt, "the sky is blue. " * 5, max_length=48)
    assert out["prompt_ids"] == single["prompt_ids"]  # budget set by the longer answer, for both
    assert out["chosen_ids"] == single["completion_ids"]
    assert out["rejected_ids"][-1] == tok.eos_token_id
    assert len(out["prompt_ids"]) + max(len(out["chosen_ids"]), len(out["rejected_ids"])) <= 48


@pytest.mark.parametrize("pad", ["<pad>", None])
def test_sft_labels_are_masked_exactly_on_prompt_and_padding(pad: str | None) -> None:
    tok = make_tokenizer(pad=pad)  # pad None: padding uses eos, whose final occurrence must still be trained
    features = [tokenize_example(tok, USER, text, 200) for text in ("the sky is blue.", "blue.")]
    batch = SFTCollator(tok)(features)
    for i, f in enumerate(features):
        p, c = len(f["prompt_ids"]), len(f["completion_ids"])
        width = batch["input_ids"].shape[1]
        labels = batch["labels"][i].tolist()
        assert labels[:p] == [IGNORE_INDEX] * p
        assert labels[p : p + c] == f["completion_ids"]
        assert labels[p + c :] == [IGNORE_INDEX] * (width - p - c)
        assert batch["attention_mask"][i].tolist() == [1] * (p + c) + [0] * (width - p - c)
        assert batch["input_ids"][i].tolist()[: p + c] == f["prompt_ids"] + f["completion_ids"]
    assert batch["labels"][1].tolist().count(tok.eos_token_id) == 1


def test_pair_collator_puts_chosen_first(tok: PreTrainedTokenizerFast) -> None:
    features = []
    for i, (chosen, rejected) in enumerate([("the sky is blue.", "no."), ("blue.", "the sky is what?")]):
        features.append({**tokenize_pair(tok, USER, chosen, rejected, 200), "index": i})
    batch = PairCollator(tok)(features)
    assert batch["input_ids"].shape[0] == 4
    assert batch["index"].tolist() == [0, 1]
    for i, f in enumerate(features):
        for row, key in ((i, "chosen_ids"), (i + 2, "rejected_ids")):
            p, c = len(f["prompt_ids"]), len(f[key])
            assert batch["labels"][row].tolist()[p : p + c] == f[key]
            assert batch["completion_mask"][row].sum() == c
            assert batch["completion_mask"][row].tolist()[:p] == [0] * p
    assert "ref_chosen_logps" not in batch
    scored = [{**f, "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5} for f in features]
    batch = PairCollator(tok)(scored)
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -1.5] and batch["ref_rejected_logps"].tolist() == [
        -2.5,
        -2.5,
    ]
