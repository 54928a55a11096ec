"""Issue 14's architecture matrix: every common architecture, in bf16 and fp32 checkpoints, under every attention
kernel it offers on this machine, scores, trains and saves as it must.

Tiny random models from transformers' own configs (tests/tiny_models.py, examples/make_arch_bases.py): llama, qwen2,
qwen3, mistral, gemma2, gemma3_text, phi3, olmo2 and gpt_neox, with sliding windows of 8 tokens where the family has
them, so the test documents (20-60 tokens) cross every window.

- (a) packed and prefix-shared log-probs (per token), rewards and values equal one-at-a-time scoring of each
  sequence alone (no padding, transformers' own masks) under eager and sdpa, and under a flash-attention
  emulation (varlen by position ids, as transformers drives flash_attn on a GPU). Bounds: fp32 within 1e-5;
  bf16 within ``BF16_BOUND`` = 0.05 (bf16 keeps 8 bits of mantissa: a log-prob or reward of magnitude ~5 is
  resolved to ~0.02, and a different batch layout changes the order of bf16 accumulations).
- (b) one optimisation step of SFT, reward model, DPO and PPO (full fine-tuning at lr 5e-7, where bf16 weights
  would round every update away) from a bf16 checkpoint under bf16 autocast changes the same weights, in the same
  direction, as the fp32 run from the same checkpoint; PPO's KL to the reference is exactly 0 at step 0.
- (c) every artifact kind round-trips: an SFT adapter, a DPO adapter stacked on it, full weights fine-tuned on top
  of an adapter (every weight trainable and fp32), a reward adapter with its score head, full reward weights, and a
  resumable checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import (
    ARCHITECTURES,
    PAIR_CORPUS,
    make_arch_dir,
    make_tokenizer,
    pair_rows,
    save_model_dir,
    write_jsonl,
)
from transformers import AttentionInterface, AutoConfig
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from preftune.model import attention, modeling
from preftune.model.losses import token_logprobs
from preftune.model.precision import resolve_precision
from preftune.model.scoring import score_sequences
from preftune.model.templating import pad_id, tokenize_pair
from preftune.train.batching import FIRST_ANSWER, PROMPT, PackedPairCollator, pack_documents
from preftune.train.packed import fused_head_weight, scored_logprobs
from preftune.train.ppo.models import TokenValueModel, response_values
from preftune.train.reward import PackedRewardCollator, pair_rewards

#: Largest difference allowed between two bf16 computations of one log-prob, reward or value (see the docstring).
BF16_BOUND = 0.05
FP32_BOUND = 1e-5
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: A CPU emulation of flash_attn's varlen kernel, registered with transformers (and with preftune as a varlen
#: kernel: a name with "flash" in it would make transformers fetch a real flash kernel) below.
FLASH = "varlen_emulation"


def flash_varlen_emulation(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """What transformers' flash path computes with no mask and one flattened row: causal attention within each
    run of position ids starting at 0 (``prepare_fa_kwargs_from_position_ids``, as flash_attn_varlen_func gets
    it), with the layer's sliding window and logit soft-capping."""
    assert attention_mask is None, "a flash kernel gets no mask"
    positions = kwargs["position_ids"]
    assert positions.shape[0] == 1 and query.shape[0] == 1, "flash varlen needs one flattened row"
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(positions)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.empty_like(query)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        q, k, v = (t[:, :, start:end].float() for t in (query, key, value))
        scores = (q @ k.transpose(-1, -2)) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        n = end - start
        distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        allowed = distance >= 0
        if sliding_window:
            allowed &= distance < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, start:end] = (torch.softmax(scores, dim=-1) @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(FLASH, flash_varlen_emulation)
attention.VARLEN_KERNELS.add(FLASH)


@pytest.fixture(autouse=True)
def no_charts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reports' charts are not what this file checks, and drawing them is most of a tiny stage's time."""
    from preftune.report import charts

    def blank(fig: Any) -> str:
        charts._pyplot().close(fig)
        return ""

    monkeypatch.setattr(charts, "_png", blank)


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer(PAIR_CORPUS)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory, tok: Any) -> Any:
    """``bases(arch, dtype)``: the arch's random checkpoint saved in that dtype, built once per module."""
    root = tmp_path_factory.mktemp("arch-bases")
    built: dict[tuple[str, str], str] = {}

    def get(arch: str, dtype: str) -> str:
        if (arch, dtype) not in built:
            built[arch, dtype] = make_arch_dir(root / f"{arch}-{dtype}", arch, tok, dtype=DTYPES[dtype])
        return built[arch, dtype]

    return get


def _features(tok: Any) -> list[dict[str, Any]]:
    rows = pair_rows(3)
    rows[0]["prompt"][0]["content"] = "question 0: the sky is blue, two plus two is four, tell me why"
    features = []
    for i, row in enumerate(rows):
        feature = tokenize_pair(tok, row["prompt"], row["chosen"], row["rejected"], 96)
        features.append({**feature, "index": i, "margin": math.nan})
    return features


def _has_sdpa(arch: str) -> bool:
    """Whether transformers offers sdpa for the architecture (not Gemma-2 since transformers 5: its logit
    soft-capping has no sdpa form)."""
    from transformers import AutoModelForCausalLM

    config = AutoConfig.for_model(arch)
    return bool(AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa)


def _kernels(arch: str) -> list[str]:
    return ["eager", "sdpa", FLASH] if _has_sdpa(arch) else ["eager", FLASH]


MATRIX_A = [(a, d, k) for a in ARCHITECTURES for d in DTYPES for k in _kernels(a)]


def _alone_logprobs(model: Any, prompt: list[int], answer: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + answer])
    logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1]
    return token_logprobs(logits, torch.tensor([answer]))[0]


def _alone_values(critic: Any, prompt: list[int], answer: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + answer])
    values = critic(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None])
    return values[0, len(prompt) - 1 : len(prompt) - 1 + len(answer)]


def _check(got: torch.Tensor, want: torch.Tensor, bound: float, what: str) -> None:
    diff = float((got.float() - want.float()).abs().max())
    assert diff <= bound, f"{what}: packed and one-at-a-time differ by {diff:.3g} (bound {bound})"


@pytest.mark.parametrize(("arch", "dtype", "kernel"), MATRIX_A)
def test_packed_scoring_equals_one_at_a_time(
    arch: str, dtype: str, kernel: str, tok: Any, bases: Any
) -> None:
    """(a) log-probs per token (DPO's prefix-shared pairs, PPO's packed responses), rewards and values."""
    precision = resolve_precision(dtype)
    bound = BF16_BOUND if precision.mixed else FP32_BOUND
    features = _features(tok)
    policy = modeling.load_causal_lm(
        bases(arch, dtype), dtype=precision.frozen_dtype, attn_implementation=kernel
    )
    reward = modeling.prepare_reward_model(
        bases(arch, dtype), use_lora=False, dtype=precision.frozen_dtype, attn_implementation=kernel
    ).to(precision.frozen_dtype)
    critic = TokenValueModel(reward)
    shared = (
        kernel != FLASH
    )  # flash kernels cannot keep a shared prompt's answers apart (refused, test below)
    answers = {i: f["chosen_ids"] for i, f in enumerate(features)}
    answers.update({len(features) + i: f["rejected_ids"] for i, f in enumerate(features)})
    with torch.no_grad(), precision.autocast("cpu"):
        # DPO: pairs packed into rows of 128 tokens, each prompt run once for both answers (sdpa, eager)
        batch = PackedPairCollator(tok, prefix_sharing=shared, pack_length=128)(features)
        assert int(batch["doc_row"].max()) < len(batch["doc_row"]) - 1, "documents share rows"
        packed = scored_logprobs(policy.eval(), batch, fused_head=False)
        alone = torch.cat(
            [
                _alone_logprobs(policy, features[s % len(features)]["prompt_ids"], answers[s])[p].reshape(1)
                for s, p in zip(batch["target_segment"].tolist(), batch["target_pos"].tolist(), strict=True)
            ]
        )
        _check(packed, alone, bound, f"{arch} {dtype} {kernel} log-probs")
        if fused_head_weight(policy) is not None:  # the LM head on the scored positions only, in chunks
            fused = scored_logprobs(policy, batch, fused_head=True, chunk_size=16)
            _check(fused, alone, bound, f"{arch} {dtype} {kernel} log-probs, fused head")
        # the reward model on prefix-shared pairs, read where it pools each answer alone
        rewards = torch.cat(pair_rewards(reward.eval(), _reward_batch(tok, reward, features, shared)))
        seqs = [f["prompt_ids"] + f["chosen_ids"] for f in features]
        seqs += [f["prompt_ids"] + f["rejected_ids"] for f in features]
        _check(
            rewards,
            torch.tensor(score_sequences(reward, seqs, batch_size=1)),
            bound,
            f"{arch} {dtype} {kernel} rewards",
        )
        # PPO: prompt + response documents packed into rows, the critic's value before every response token
        docs = [
            [(f["prompt_ids"], PROMPT, -1), (f["chosen_ids"], FIRST_ANSWER, k)]
            for k, f in enumerate(features)
        ]
        values = response_values(critic.eval(), pack_documents(docs, pad_id(tok), 128))
        alone_values = torch.cat([_alone_values(critic, f["prompt_ids"], f["chosen_ids"]) for f in features])
        _check(values, alone_values, bound, f"{arch} {dtype} {kernel} values")


def _reward_batch(
    tok: Any, reward: Any, features: list[dict[str, Any]], shared: bool
) -> dict[str, torch.Tensor]:
    return PackedRewardCollator(tok, reward.config.pad_token_id, prefix_sharing=shared, pack_length=128)(
        features
    )


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if not _has_sdpa(a)])
def test_a_kernel_the_model_lacks_is_refused_with_a_clear_error(arch: str, tok: Any, bases: Any) -> None:
    with pytest.raises(ValueError, match="does not support an attention implementation through"):
        modeling.load_causal_lm(bases(arch, "fp32"), attn_implementation="sdpa")


def test_flash_kernels_refuse_prefix_sharing_naming_model_and_setting(tok: Any, bases: Any) -> None:
    from preftune.train.packed import check_kernel

    policy = modeling.load_causal_lm(bases("qwen2", "fp32"), attn_implementation=FLASH)
    check_kernel(policy, "cpu", packed=True, prefix_sharing=False)  # packing through position ids is fine
    with pytest.raises(
        ValueError, match=r"qwen2.*attn_implementation='varlen_emulation'.*prefix_sharing=False"
    ):
        check_kernel(policy, "cpu", packed=True, prefix_sharing=True)
    batch = PackedPairCollator(tok, prefix_sharing=True, pack_length=128)(_features(tok))
    with pytest.raises(ValueError, match="prefix_sharing"):  # and never a silent wrong mask at forward time
        scored_logprobs(policy, batch, fused_head=False)


# ------------------------------------------------------------------------------------------ (b) one step


def _stage_runs(tmp: Path, tok: Any, base: str) -> dict[str, Any]:
    """Each stage's one-step run from ``base`` (full fine-tuning, lr 5e-7): a function of (out dir, precision)."""
    from preftune.train.dpo import DPOConfig, train_dpo
    from preftune.train.ppo import PPOConfig, train_ppo
    from preftune.train.reward import RewardConfig, train_reward_model
    from preftune.train.sft import SFTConfig, train_sft

    reward = modeling.prepare_reward_model(base, use_lora=False).to(torch.bfloat16)
    reward_dir = save_model_dir(reward, tok, tmp / "reward-base")
    pairs = write_jsonl(tmp / "pairs.jsonl", pair_rows(4))
    sft = write_jsonl(
        tmp / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in pair_rows(4)]
    )
    report = str(tmp / "report.html")
    step = dict(
        max_steps=1, batch_size=4, eval_batch_size=4, use_lora=False, learning_rate=5e-7, warmup_ratio=0.0
    )
    ppo = dict(iterations=1, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, use_lora=False)
    ppo.update(learning_rate=5e-7, critic_learning_rate=5e-7, max_new_tokens=4, max_prompt_length=64)
    return {
        "sft": (base, lambda out, p: train_sft(base, sft, sft, out, report, SFTConfig(precision=p, **step))),
        "reward": (
            reward_dir,
            lambda out, p: train_reward_model(
                base, pairs, pairs, out, report, RewardConfig(precision=p, **step)
            ),
        ),
        "dpo": (
            base,
            lambda out, p: train_dpo(base, pairs, pairs, out, report, DPOConfig(precision=p, **step)),
        ),
        "ppo": (
            base,
            lambda out, p: train_ppo(base, reward_dir, pairs, out, report, PPOConfig(precision=p, **ppo)),
        ),
    }


def _delta(start: str, out: str) -> torch.Tensor:
    before, after = (
        load_file(str(Path(start) / "model.safetensors")),
        load_file(str(Path(out) / "model.safetensors")),
    )
    assert all(t.dtype == torch.float32 for t in after.values()), "trained weights are fp32 master weights"
    return torch.cat([(after[k].float() - before[k].float()).flatten() for k in sorted(before)])


class Replay:
    """PPO's sampler, recording what the fp32 run draws and handing the bf16 run the same tokens: the two runs
    sample in different precisions, and one different token would change the update's direction."""

    def __init__(self) -> None:
        self.drawn: list[torch.Tensor] = []
        self.replaying = False

    def __call__(self, model: Any, input_ids: torch.Tensor, attention_mask: Any, config: Any) -> torch.Tensor:
        from preftune.model.sampling import generate

        if self.replaying:
            return self.drawn.pop(0)
        self.drawn.append(generate(model, input_ids, attention_mask, config))
        return self.drawn[-1]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_one_step_in_bf16_changes_the_weights_as_fp32_does(
    arch: str, tok: Any, bases: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(b) from a bf16 checkpoint: bf16 autocast and fp32 master weights against an fp32 run."""
    from preftune.train.ppo import rollout

    replay = Replay()
    monkeypatch.setattr(rollout, "generate", replay)
    for stage, (start, run) in _stage_runs(tmp_path, tok, bases(arch, "bf16")).items():
        deltas, metrics = {}, {}
        for precision in ("fp32", "bf16"):
            out = str(tmp_path / f"{stage}-{precision}")
            replay.replaying = precision == "bf16"
            metrics[precision] = run(out, precision)
            deltas[precision] = _delta(start, out)
        fp32, bf16 = deltas["fp32"], deltas["bf16"]
        changed = int((fp32 != 0).sum())
        assert changed > 0.5 * fp32.numel(), f"{arch} {stage}: the fp32 step moves most weights"
        # a bf16 master copy would have rounded nearly all of these 5e-7 updates away (a gradient can still be 0 in
        # one precision and not the other, so one in a thousand may differ)
        same = int(((bf16 != 0) & (fp32 != 0)).sum())
        assert same >= 0.999 * changed, (
            f"{arch} {stage}: the bf16 run changes {same} of the {changed} weights"
        )
        agree = float((fp32.sign() == bf16.sign()).float().mean())
        cosine = float(torch.nn.functional.cosine_similarity(fp32, bf16, dim=0))
        assert agree > 0.98 and cosine > 0.97, (
            f"{arch} {stage}: direction agrees {agree:.3f}, cosine {cosine:.3f}"
        )
        if stage == "ppo":
            assert metrics["bf16"]["kl_max"] == 0.0, (
                "the frozen reference computes as the policy does at step 0"
            )


# ----------------------------------------------------------------------------------------- (c) artifacts


def _perturb(model: torch.nn.Module, names: tuple[str, ...] = ("lora_B",)) -> None:
    """Give freshly initialised adapters (whose B is 0) and heads something to save."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and any(n in name for n in names):
                param.add_(torch.randn_like(param) * 0.05)


def _save(model: Any, tok: Any, out: Path, parent: str, stage: str) -> str:
    modeling.save_model(model, tok, str(out), stage=stage, parent_uri=parent, parameters={}, data={})
    return str(out)


def _same(a: torch.Tensor, b: torch.Tensor, bound: float, what: str) -> None:
    scale = max(1.0, float(b.float().abs().max()))
    diff = float((a.float() - b.float()).abs().max())
    assert diff <= bound * scale, f"{what}: saved and loaded outputs differ by {diff:.3g}"


@pytest.mark.parametrize(("arch", "dtype"), [(a, d) for a in ARCHITECTURES for d in DTYPES])
def test_every_artifact_kind_round_trips(arch: str, dtype: str, tok: Any, bases: Any, tmp_path: Path) -> None:
    precision = resolve_precision(dtype)
    frozen, base = precision.frozen_dtype, bases(arch, dtype)
    # merging a LoRA delta into bf16 weights rounds it once; compare at bf16's resolution
    bound = BF16_BOUND if precision.mixed else FP32_BOUND
    ids = torch.tensor([_features(tok)[0]["prompt_ids"] + _features(tok)[0]["chosen_ids"]])

    def logits(model: Any) -> torch.Tensor:
        with torch.no_grad(), precision.autocast("cpu"):
            return model.eval()(input_ids=ids).logits

    def rewards(model: Any) -> torch.Tensor:
        return torch.tensor(score_sequences(model, ids.tolist()))

    sft = modeling.prepare_for_training(base, use_lora=True, lora_r=4, lora_alpha=8, dtype=frozen)
    _perturb(sft)
    sft_dir = _save(sft, tok, tmp_path / "sft", base, "sft")
    _same(logits(modeling.load_causal_lm(sft_dir, dtype=frozen)), logits(sft), bound, f"{arch} SFT adapter")

    dpo = modeling.prepare_for_training(sft_dir, use_lora=True, lora_r=4, lora_alpha=8, dtype=frozen)
    _perturb(dpo)
    dpo_dir = _save(dpo, tok, tmp_path / "dpo", sft_dir, "dpo")
    _same(
        logits(modeling.load_causal_lm(dpo_dir, dtype=frozen)), logits(dpo), bound, f"{arch} stacked adapters"
    )

    full = modeling.prepare_for_training(sft_dir, use_lora=False, dtype=frozen)
    trainable = [p for p in full.parameters() if p.requires_grad]
    assert len(trainable) == len(list(full.parameters())) and {p.dtype for p in trainable} == {torch.float32}
    full_dir = _save(full, tok, tmp_path / "full", sft_dir, "dpo")
    _same(
        logits(modeling.load_causal_lm(full_dir, dtype=torch.float32)),
        logits(full),
        FP32_BOUND,
        f"{arch} full",
    )

    scorer = modeling.prepare_reward_model(sft_dir, use_lora=True, lora_r=4, lora_alpha=8, dtype=frozen)
    assert {p.dtype for p in scorer.parameters() if p.requires_grad} == {torch.float32}, "LoRA and score head"
    _perturb(scorer, ("lora_B", "score"))
    reward_dir = _save(scorer, tok, tmp_path / "reward", sft_dir, "reward")
    with precision.autocast("cpu"):
        _same(
            rewards(modeling.load_reward_model(reward_dir, dtype=frozen)),
            rewards(scorer),
            bound,
            f"{arch} RM",
        )

    full_rm = modeling.prepare_reward_model(sft_dir, use_lora=False)
    full_rm_dir = _save(full_rm, tok, tmp_path / "reward-full", sft_dir, "reward")
    _same(rewards(modeling.load_reward_model(full_rm_dir)), rewards(full_rm), FP32_BOUND, f"{arch} full RM")

    _checkpoint_round_trip(
        tmp_path / "checkpoints",
        sft,
        lambda: modeling.prepare_for_training(base, use_lora=True, lora_r=4, lora_alpha=8, dtype=frozen),
    )


def _checkpoint_round_trip(uri: Path, model: Any, fresh: Any) -> None:
    from preftune.train.checkpoint import Checkpointer
    from preftune.train.loop import make_accelerator, make_optimizer

    accelerator = make_accelerator("fp32")
    checkpointer = Checkpointer(str(uri), 1, accelerator, stage="sft")
    checkpointer.save(1, modules={"m": model}, optimizers={"m": make_optimizer(model, 1e-3, 0.0)}, state={})
    restored = fresh()
    assert checkpointer.restore(
        modules={"m": restored}, optimizers={"m": make_optimizer(restored, 1e-3, 0.0)}
    )
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in restored.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, saved[name]), name
