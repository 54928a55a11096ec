"""Sampling runs on a complete, explicit generation config: a checkpoint's generation_config.json changes nothing.

transformers fills every setting a GenerationConfig leaves unset from the model's own generation_config.json, so
a checkpoint shipping min_p, top_k, a repetition penalty or suppressed tokens would silently truncate the
"temperature 1, no truncation" samples that evaluation's KL estimate and PPO's ratio are defined on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import PAIR_CORPUS, make_model, make_tokenizer, save_model_dir
from transformers import GenerationConfig

from preftune.config.ppo import PPOConfig
from preftune.model.modeling import load_causal_lm
from preftune.model.sampling import generate_responses, generation_config
from preftune.model.templating import render_prompt
from preftune.train.ppo.rollout import generate_rollout

PROMPTS = [[{"role": "user", "content": f"question {i}"}] for i in range(6)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[int]]:
    """The same weights twice: with an empty generation config, and with one that sets every kind of filter."""
    tmp = tmp_path_factory.mktemp("generation")
    tok = make_tokenizer(PAIR_CORPUS)
    model = make_model(tok, initializer_range=0.02)  # a flat distribution: the filters would bite
    plain = save_model_dir(model, tok, tmp / "plain")
    suppressed = list(range(10, 60))
    model.generation_config = GenerationConfig(
        do_sample=True,
        min_p=0.5,
        top_k=3,
        repetition_penalty=1.8,
        suppress_tokens=suppressed,
        bad_words_ids=[[70], [71]],
        forced_eos_token_id=tok.eos_token_id,
        no_repeat_ngram_size=1,
        temperature=0.3,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    shipped = save_model_dir(model, tok, tmp / "shipped")
    assert (Path(shipped) / "generation_config.json").read_text().count("min_p")
    return plain, shipped, suppressed


def _sample(ref: str) -> list[list[int]]:
    tok = make_tokenizer(PAIR_CORPUS)
    model = load_causal_lm(ref)
    rendered = [render_prompt(tok, p) for p in PROMPTS]
    out = generate_responses(
        model, tok, rendered, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3, batch_size=3
    )
    return out.response_ids


def test_evaluation_samples_as_with_an_empty_generation_config(
    checkpoints: tuple[str, str, list[int]],
) -> None:
    plain, shipped, suppressed = checkpoints
    samples = _sample(shipped)
    assert samples == _sample(plain)
    # and those settings would have changed the samples: a suppressed token is drawn
    assert any(token in suppressed for row in samples for token in row)


def test_the_leak_is_real_without_the_blank_config(checkpoints: tuple[str, str, list[int]]) -> None:
    """What transformers does with the same explicit config when the model's file is not hidden: the shipped
    settings act (so the equality above is the fix at work, not an accident)."""
    plain, shipped, suppressed = checkpoints
    tok = make_tokenizer(PAIR_CORPUS)
    config = generation_config(
        max_new_tokens=12, temperature=1.0, top_p=1.0, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id
    )
    ids = torch.tensor([tok(render_prompt(tok, PROMPTS[0]), add_special_tokens=False)["input_ids"]] * 8)
    drawn = {}
    for name, ref in (("plain", plain), ("shipped", shipped)):
        torch.manual_seed(0)
        drawn[name] = load_causal_lm(ref).generate(input_ids=ids, generation_config=config)
    assert not torch.equal(drawn["plain"], drawn["shipped"])
    assert not any(int(t) in suppressed for t in drawn["shipped"][:, ids.shape[1] :].flatten())


def test_ppo_rollouts_sample_as_with_an_empty_generation_config(
    checkpoints: tuple[str, str, list[int]],
) -> None:
    plain, shipped, _ = checkpoints
    tok = make_tokenizer(PAIR_CORPUS)
    config = PPOConfig(max_new_tokens=10, forward_batch_size=3)
    encoded = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    drawn = []
    for ref in (plain, shipped):
        torch.manual_seed(5)
        rollout = generate_rollout(
            load_causal_lm(ref), tok, PROMPTS, encoded, config, [tok.eos_token_id], torch.device("cpu")
        )
        drawn.append(rollout.response_tokens)
    assert drawn[0] == drawn[1]


def test_the_config_names_every_filter_at_its_neutral_value() -> None:
    config = generation_config(max_new_tokens=4, temperature=0.7, top_p=0.9, eos_ids=[2, 5], pad_id=0)
    assert (config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (0.7, 0.9, 0, 1.0)
    assert config.min_p is None and config.suppress_tokens is None and config.forced_eos_token_id is None
    assert config.no_repeat_ngram_size == 0 and config.num_beams == 1 and config.eos_token_id == [2, 5]
    greedy = generation_config(max_new_tokens=4, temperature=0.0, top_p=0.9, eos_ids=[2], pad_id=0)
    assert greedy.do_sample is False
