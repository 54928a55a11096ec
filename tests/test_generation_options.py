"""The transformers backend's speed options (issue 22) change how answers are drawn, never what they are:
batching by length gives each prompt the answer it gets alone, the static cache the dynamic cache's, and the
sampled log-probs recorded under every option are the scoring pass's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PAIR_CORPUS, make_model, make_tokenizer

from preftune.config.generation import GenerationOptions
from preftune.model.generation import SamplingSettings
from preftune.model.generation.transformers_backend import TransformersBackend, batch_order


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, list[list[int]], SamplingSettings]:
    tok = make_tokenizer(PAIR_CORPUS)
    model = make_model(tok).eval()
    # prompts of very different lengths, out of order: bucketing reorders them across batches
    prompts = [
        [1] + [5 + (i * 7 + k) % 200 for k in range(n)] for i, n in enumerate([3, 17, 5, 12, 2, 9, 20, 4])
    ]
    settings = SamplingSettings(
        max_new_tokens=6, temperature=0.0, top_p=1.0, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id
    )
    return model, prompts, settings


def _scores(model: torch.nn.Module, prompt: list[int], answer: list[int], temperature: float) -> list[float]:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(answer)[:, None])[:, 0].tolist()


def test_batch_order_sorts_by_length_only_when_there_is_more_than_one_batch() -> None:
    assert batch_order([5, 1, 3], 4, True) == [[0, 1, 2]]
    assert batch_order([5, 1, 3, 2], 2, True) == [[1, 3], [2, 0]]
    assert batch_order([5, 1, 3, 2], 2, False) == [[0, 1], [2, 3]]


@pytest.mark.parametrize(
    "options",
    [
        GenerationOptions(kv_cache="dynamic", length_bucketing=False),
        GenerationOptions(kv_cache="dynamic", length_bucketing=True),
        GenerationOptions(kv_cache="static", length_bucketing=True),
    ],
    ids=["dynamic", "dynamic+bucketing", "static+bucketing"],
)
def test_every_option_gives_each_prompt_its_greedy_answer_alone_in_the_prompts_order(setup, options) -> None:
    model, prompts, settings = setup
    batched = TransformersBackend(model, options).generate(
        prompts, SamplingSettings(**{**settings.__dict__, "batch_size": 3})
    )
    for i, prompt in enumerate(prompts):
        alone = TransformersBackend(model, GenerationOptions(length_bucketing=False)).generate(
            [prompt], settings
        )
        assert batched.tokens[i] == alone.tokens[0], i
        assert batched.ended[i] == alone.ended[0]


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_sampled_logprobs_equal_the_scoring_pass_under_bucketing(setup, kv_cache: str) -> None:
    model, prompts, settings = setup
    sampling = SamplingSettings(**{**settings.__dict__, "temperature": 0.7, "batch_size": 3})
    torch.manual_seed(0)
    out = TransformersBackend(model, GenerationOptions(kv_cache=kv_cache, length_bucketing=True)).generate(
        prompts, sampling, logprobs=True
    )
    assert out.logprobs is not None
    for prompt, answer, logps in zip(prompts, out.tokens, out.logprobs, strict=True):
        assert len(logps) == len(answer) > 0
        assert (
            max(abs(a - b) for a, b in zip(logps, _scores(model, prompt, answer, 0.7), strict=True)) <= 1e-5
        )
