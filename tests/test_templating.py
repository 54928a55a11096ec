"""Chat templating, tokenisation with truncation, and the label masks the training loops rely on."""

from __future__ import annotations

import pytest
import tiny_models
from transformers import PreTrainedTokenizerFast

from preftune.model.templating import end_of_turn_ids, render_prompt, tokenize_example, tokenize_pair
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


# ------------------------------------------------------------------------------ templates whose turn is not eos

GEMMA_SPECIALS = ("<pad>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>")


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Gemma's turn markers: an assistant turn ends with <end_of_turn>, which is not eos."""
    corpus = [*CORPUS, "<start_of_turn> <end_of_turn> model user"]
    return tiny_models.make_tokenizer(
        corpus, special_tokens=GEMMA_SPECIALS, chat_template=tiny_models.ARCH_BASES.GEMMA_TEMPLATE
    )


def test_the_completion_is_the_assistant_turn_the_template_renders() -> None:
    tok = gemma_tokenizer()
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    out = tokenize_example(tok, USER, "the sky is blue.", max_length=200)
    rendered = tok.apply_chat_template(
        [*USER, {"role": "assistant", "content": "the sky is blue."}], tokenize=False
    )
    assert rendered.endswith("<start_of_turn>model\nthe sky is blue.<end_of_turn>\n")
    # the prompt's tokens, then the answer up to and including the turn's end: what the template writes, not eos
    assert out["completion_ids"] == tok("the sky is blue.", add_special_tokens=False)["input_ids"] + [end]
    assert tok.eos_token_id not in out["completion_ids"]
    assert tok.decode(out["prompt_ids"] + out["completion_ids"]) == rendered.rstrip("\n")
    assert end_of_turn_ids(tok) == [end]
    # the bundled-style template ends a turn with eos: the same tokens as ever
    plain = make_tokenizer()
    assert tokenize_example(plain, USER, "blue.", 200)["completion_ids"][-1] == plain.eos_token_id
    assert end_of_turn_ids(plain) == [plain.eos_token_id]


def test_a_template_ending_turns_in_plain_text_gets_eos_after_it() -> None:
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}"
    )
    out = tokenize_example(tok, USER, "blue.", 200)
    assert out["completion_ids"] == tok("blue.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_a_template_whose_prompt_is_not_a_prefix_is_refused_by_name() -> None:
    tok = make_tokenizer()
    # renders the generation prompt with a marker the finished conversation does not have
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>[thinking]{% endif %}"
    )
    tok.name_or_path = "odd-template-model"
    with pytest.raises(ValueError, match="odd-template-model.*not a prefix of prompt \\+ answer"):
        tokenize_example(tok, USER, "blue.", 200)


def test_sft_trains_on_the_end_of_turn_and_generation_stops_there(tmp_path) -> None:
    """Trained on Gemma-style turns, the model learns to close its answer with <end_of_turn>, and sampling stops at
    it (it is not eos): what the template renders is what is trained and what is sampled."""
    import torch

    from preftune.model import modeling
    from preftune.model.sampling import eos_ids_of, generate_responses
    from preftune.train.sft import SFTConfig, train_sft

    tok = gemma_tokenizer()
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    base = tiny_models.make_model_dir(tmp_path / "base", tok)
    rows = [{"prompt": USER, "completion": "the sky is blue."}] * 8
    data = tiny_models.write_jsonl(tmp_path / "sft.jsonl", rows)
    config = SFTConfig(
        epochs=30, learning_rate=1e-2, batch_size=8, use_lora=False, logging_steps=10, eval_steps=0
    )
    train_sft(base, data, data, str(tmp_path / "sft"), str(tmp_path / "r.html"), config)
    model = modeling.load_causal_lm(str(tmp_path / "sft"))
    assert end in eos_ids_of(tok, model) and tok.eos_token_id != end
    out = generate_responses(
        model,
        tok,
        [render_prompt(tok, USER)],
        max_new_tokens=12,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        batch_size=1,
    )
    assert out.response_ids[0] == tok("the sky is blue.", add_special_tokens=False)["input_ids"] + [end]
    assert out.texts == ["the sky is blue."]
    with torch.no_grad():
        ids = torch.tensor(
            [tok(render_prompt(tok, USER) + "the sky is blue.", add_special_tokens=False)["input_ids"]]
        )
        assert int(model(input_ids=ids).logits[0, -1].argmax()) == end
