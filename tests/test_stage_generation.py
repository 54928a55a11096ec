"""The generation settings (issue 22) are real in every sampling stage: PPO, GRPO / RLOO, online DPO and evaluate
carry them in their configs and their components, refuse what generation.validate refuses, sample through the
backend the settings name with the options given, and with ``generation_backend="vllm"`` build one engine per run
from the SFT (evaluate: reference) model and hand it the policy's current weights before every round of
sampling; without vLLM they stop with NeedsVLLM before anything is loaded."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make_counting_reward, make_policy_dir, write_jsonl

import preftune.model.generation.stage as stage
import preftune.model.generation.vllm_backend as vllm_backend
from preftune.config import evaluate as eval_config
from preftune.config import grpo, online_dpo, ppo
from preftune.config.components import configs_from
from preftune.config.fields import ConfigError
from preftune.config.generation import GenerationOptions, options_of
from preftune.eval.evaluation import evaluate
from preftune.model import modeling
from preftune.model.generation import NeedsVLLM
from preftune.model.generation.transformers_backend import TransformersBackend
from preftune.train.group_rl import train_grpo
from preftune.train.online_dpo import train_online_dpo
from preftune.train.ppo import train_ppo

pytestmark = pytest.mark.usefixtures("one_thread")

STAGES = ("ppo", "grpo", "online_dpo", "evaluate")
CONFIGS: dict[str, tuple[type, Callable[[Any], None]]] = {
    "ppo": (ppo.PPOConfig, ppo.validate),
    "grpo": (grpo.GRPOConfig, grpo.validate),
    "online_dpo": (online_dpo.OnlineDPOConfig, online_dpo.validate),
    "evaluate": (eval_config.EvalConfig, eval_config.validate),
}
#: Each stage's config at its smallest: two rounds of sampling, more prompts than one generate batch.
SMALL: dict[str, dict[str, Any]] = {
    "ppo": dict(
        iterations=2,
        rollout_batch_size=6,
        mini_batch_size=6,
        ppo_epochs=1,
        max_prompt_length=32,
        max_new_tokens=6,
        forward_batch_size=4,
        kl_blowup=0.0,
        learning_rate=3e-2,
    ),
    "grpo": dict(
        iterations=2,
        prompts_per_iteration=3,
        num_generations=2,
        mini_batch_size=6,
        max_prompt_length=32,
        max_new_tokens=6,
        forward_batch_size=4,
        kl_blowup=0.0,
        learning_rate=3e-2,
    ),
    "online_dpo": dict(
        rounds=2,
        prompts_per_round=3,
        num_generations=2,
        batch_size=2,
        dpo_epochs=1,
        max_prompt_length=32,
        max_new_tokens=6,
        forward_batch_size=4,
        kl_blowup=0.0,
        learning_rate=3e-2,
    ),
    "evaluate": dict(max_new_tokens=6, batch_size=2, max_prompts=5, select_snapshot=False),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("stage_generation")
    sft = make_policy_dir(root / "sft")
    prompts = [{"prompt": f"question {i}" + " and more" * (i % 4)} for i in range(8)]  # lengths differ
    return {
        "sft": sft,
        "reward": make_counting_reward(sft, root / "reward", target=5),
        "prompts": write_jsonl(root / "prompts.jsonl", prompts),
    }


def run_stage(name: str, world: dict[str, str], out: Path, **settings: Any) -> dict[str, float]:
    """One run of stage ``name`` on the tiny world, with ``settings`` over its small config."""
    cls, _ = CONFIGS[name]
    config = cls(**{**SMALL[name], **settings})
    if name == "evaluate":
        generations, report = str(out / "generations.jsonl"), str(out / "report.html")
        return evaluate(world["sft"], world["sft"], world["prompts"], None, generations, report, config)
    train = {"ppo": train_ppo, "grpo": train_grpo, "online_dpo": train_online_dpo}[name]
    return train(
        world["sft"], world["reward"], world["prompts"], str(out / "model"), str(out / "r.html"), config
    )


def spy_on_generate(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every generate batch of every transformers backend: the backend's options and the generation config
    transformers was called with."""
    calls: list[dict[str, Any]] = []
    original = TransformersBackend.generate

    def generate(self: TransformersBackend, prompts: Any, settings: Any, **kw: Any) -> Any:
        inner = self.generate_fn

        def per_batch(model: Any, ids: torch.Tensor, mask: torch.Tensor, config: Any, **extra: Any) -> Any:
            calls.append(
                {
                    "options": self.options,
                    "cache": config.cache_implementation,
                    "lengths": mask.sum(1).tolist(),
                }
            )
            return inner(model, ids, mask, config, **extra)

        self.generate_fn = per_batch
        try:
            return original(self, prompts, settings, **kw)
        finally:
            self.generate_fn = inner

    monkeypatch.setattr(TransformersBackend, "generate", generate)
    return calls


# --------------------------------------------------------------------------------------- config and component


@pytest.mark.parametrize("name", STAGES)
def test_every_sampling_stage_carries_the_generation_settings_with_their_defaults(name: str) -> None:
    cls, _ = CONFIGS[name]
    assert options_of(cls()) == GenerationOptions()
    built = configs_from(
        name, {"kv_cache": "static", "length_bucketing": False, "generation_backend": "vllm"}
    )
    assert options_of(built[0]) == GenerationOptions(
        backend="vllm", kv_cache="static", length_bucketing=False
    )


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_s_validate_refuses_a_compiled_decode_without_a_static_cache(name: str) -> None:
    cls, validate = CONFIGS[name]
    with pytest.raises(ConfigError, match=r"compile_decode needs kv_cache 'static'"):
        validate(cls(compile_decode=True))  # the evaluate config refuses it already when built
    with pytest.raises(ConfigError, match=r"compile_decode needs kv_cache 'static'"):
        configs_from(name, {"compile_decode": True})  # the component's parameters, as the step builds them
    validate(cls(compile_decode=True, kv_cache="static"))


# ------------------------------------------------------------------------------------ options reach generate


@pytest.mark.parametrize("name", STAGES)
def test_the_options_given_reach_every_generate_call_of_the_stage(
    name: str, world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on_generate(monkeypatch)
    run_stage(name, world, tmp_path, kv_cache="static", length_bucketing=False)
    assert len(calls) >= 2  # two rounds (evaluate: the reference and the candidate) in batches
    for call in calls:
        assert call["options"].kv_cache == "static" and call["options"].length_bucketing is False
        assert call["cache"] == "static"  # the static cache is what transformers was asked for


@pytest.mark.parametrize("name", ["ppo", "evaluate"])
def test_by_default_batches_are_cut_by_length(
    name: str, world: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy_on_generate(monkeypatch)
    run_stage(name, world, tmp_path)
    assert all(c["options"] == GenerationOptions() and c["cache"] is None for c in calls)
    first = [c["lengths"] for c in calls[:2]]  # the first round's batches: sorted by length across them
    assert max(first[0]) <= min(first[1])


# ------------------------------------------------------------------------------------------------------ vllm


@pytest.mark.parametrize("name", STAGES)
def test_the_vllm_backend_without_vllm_stops_the_stage_before_anything_is_loaded(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # not importable, whatever this machine has
    loaded: list[str] = []
    for what in ("load_tokenizer", "load_causal_lm", "prepare_for_training"):
        monkeypatch.setattr(modeling, what, lambda *a, _what=what, **k: loaded.append(_what))
    world = {
        "sft": str(tmp_path / "sft"),
        "reward": str(tmp_path / "rm"),
        "prompts": str(tmp_path / "p.jsonl"),
    }
    with pytest.raises(NeedsVLLM, match=r"pip install vllm.*generation_backend=transformers"):
        run_stage(name, world, tmp_path, generation_backend="vllm")
    assert loaded == [] and not (tmp_path / "model").exists()


class FakeEngine:
    """Stands in for VLLMBackend where vLLM cannot run: records how the stage built it and what it was handed,
    and samples with the transformers backend on the weights of the last sync."""

    built: list[FakeEngine] = []
    name = "vllm"

    def __init__(
        self, model_dir: str, options: GenerationOptions, *, owned_dir: str = "", **engine: Any
    ) -> None:
        self.model_dir, self.options, self.owned_dir, self.engine = model_dir, options, owned_dir, engine
        self.synced: list[dict[str, Any]] = []
        self.closed = False
        self.sampler: TransformersBackend | None = None
        FakeEngine.built.append(self)

    def sync(self, model: Any) -> None:
        lora = [p.detach().abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n]
        weights = sum(p.detach().double().sum().item() for p in model.parameters())
        self.synced.append({"peft": vllm_backend.is_peft(model), "lora_b": sum(lora), "weights": weights})
        self.sampler = TransformersBackend(model, GenerationOptions())

    def generate(self, prompts: Any, settings: Any, *, logprobs: bool = False) -> Any:
        assert self.sampler is not None and not self.closed, "generate before sync, or after close"
        return self.sampler.generate(prompts, settings, logprobs=logprobs)

    def close(self) -> None:
        self.closed = True
        shutil.rmtree(self.owned_dir, ignore_errors=True)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> type[FakeEngine]:
    FakeEngine.built = []
    monkeypatch.setattr(stage, "require_vllm", lambda: None)
    monkeypatch.setattr(vllm_backend, "VLLMBackend", FakeEngine)
    return FakeEngine


@pytest.mark.parametrize("name", ["ppo", "grpo", "online_dpo"])
def test_training_builds_one_engine_from_the_sft_model_and_hands_it_the_adapter_every_round(
    name: str, world: dict[str, str], tmp_path: Path, fake_vllm: type[FakeEngine]
) -> None:
    run_stage(name, world, tmp_path, generation_backend="vllm", vllm_gpu_memory_utilization=0.5, lora_r=4)
    (engine,) = fake_vllm.built
    assert engine.model_dir == modeling.resolve(
        world["sft"]
    )  # full weights: started from the directory itself
    assert engine.options.vllm_gpu_memory_utilization == 0.5
    assert engine.engine == {
        "max_model_len": 32 + 6,
        "dtype": "float32",
        "seed": 0,
        "enable_lora": True,
        "max_lora_rank": 8,  # lora_r 4, rounded up to a rank vLLM serves
    }
    assert [s["peft"] for s in engine.synced] == [True, True]  # one sync per round, before its sampling
    assert engine.synced[0]["lora_b"] == 0  # the fresh adapter: the SFT model itself
    assert engine.synced[1]["lora_b"] > 0  # the adapter after the first round's update
    assert engine.closed and not Path(engine.owned_dir).exists()


def test_full_weights_are_handed_over_every_round(
    world: dict[str, str], tmp_path: Path, fake_vllm: type[FakeEngine]
) -> None:
    run_stage("grpo", world, tmp_path, generation_backend="vllm", use_lora=False)
    (engine,) = fake_vllm.built
    assert engine.engine["enable_lora"] is False and "max_lora_rank" not in engine.engine
    first, second = engine.synced
    assert not first["peft"] and first["weights"] != second["weights"]  # the updated weights, not the SFT's


def test_evaluate_syncs_every_policy_it_measures_into_one_engine_from_the_reference(
    world: dict[str, str], tmp_path: Path, fake_vllm: type[FakeEngine]
) -> None:
    run_stage("evaluate", world, tmp_path, generation_backend="vllm")
    (engine,) = fake_vllm.built
    assert engine.model_dir == modeling.resolve(world["sft"]) and engine.engine["enable_lora"] is False
    assert len(engine.synced) >= 2 and not any(s["peft"] for s in engine.synced)
    assert engine.closed


def test_an_adapter_chain_is_merged_for_the_engine_to_start_from(
    world: dict[str, str], tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    base = modeling.load_causal_lm(world["sft"])
    adapted = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapted.save_pretrained(str(tmp_path / "adapter"))
    modeling.load_tokenizer(world["sft"]).save_pretrained(str(tmp_path / "adapter"))
    assert stage.engine_directory(world["sft"], tmp_path / "unused") == modeling.resolve(world["sft"])
    merged_dir = stage.engine_directory(str(tmp_path / "adapter"), tmp_path / "merged")
    assert merged_dir == str(tmp_path / "merged") and not modeling.is_adapter(merged_dir)
    expected = modeling.load_causal_lm(str(tmp_path / "adapter")).state_dict()
    merged = modeling.load_causal_lm(merged_dir).state_dict()
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    assert (
        modeling.load_tokenizer(merged_dir).get_vocab() == modeling.load_tokenizer(world["sft"]).get_vocab()
    )
