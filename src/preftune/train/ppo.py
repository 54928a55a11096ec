"""RLHF's last stage: optimise the SFT policy against a reward model with PPO, held near the SFT model by a KL penalty.

Models, and how few copies of the weights they need (with LoRA, the default):

- **policy**: the merged SFT model with a fresh LoRA adapter; **reference**: the same weights with the adapter
  disabled (``disable_adapter()``), so the reference is exactly the SFT model and is not held twice.
- **critic** (value model): the reward model with its own LoRA adapter (the score head is trained in full, in
  ``modules_to_save``); per-token values are the score head applied to every position's final hidden state.
  **reward**: the same weights with the adapter disabled, which restores the original score head too. One copy
  serves both.
- Without LoRA (``use_lora=False``) the policy and critic are trained in full, and frozen copies of the SFT
  model and of the reward model are loaded beside them: about twice the weights, plus AdamW's two moment
  buffers on every trained weight (so roughly 4x the policy's and 4x the reward model's parameters in memory
  instead of a bit over 1x each).

One iteration:

1. **Rollout**: take ``rollout_batch_size`` prompts (deduplicated, cycled in a seeded order), render them with
   the chat template, and sample one response each with KV-cached ``generate`` (left padding, ``temperature``,
   ``top_p``, ``max_new_tokens``, stop at eos). Tokens after the first eos are masked out.
2. **Score**: log-probs of the sampled tokens under the policy (old) and the reference, per-token values under
   the critic, and the reward model's score of each response, computed on exactly the reward model's training
   input: the rendered prompt + the response text + eos (responses that ran out of tokens without eos get eos
   too, and optionally ``missing_eos_penalty``). ``score_clip`` bounds the score.
3. **Shape**: per-token reward = ``-kl_coef * (log pi - log ref)`` on every response token, plus the score at
   the last one (losses.shape_rewards). GAE (``gamma``, ``lam``) gives advantages and returns; advantages are
   whitened over the batch.
4. **Update**: ``ppo_epochs`` passes over shuffled minibatches of ``mini_batch_size`` sequences, minimising the
   clipped policy loss + ``vf_coef`` x the clipped value loss. The policy and the critic have separate AdamW
   optimisers (``learning_rate``, ``critic_learning_rate``): their weights are disjoint, so the sum's gradient
   reaches each model as its own loss's gradient, and ``vf_coef`` only scales the critic's gradient before
   ``max_grad_norm`` clipping (Adam itself is insensitive to a constant scale). Before each minibatch's step, the
   approximate KL between the rollout policy and the current one is measured on it; past ``max_approx_kl`` the
   iteration's remaining updates are skipped (an early stop, logged).
5. **KL control**: the controller (fixed, or adaptive after Ziegler et al. 2019) sees the batch's KL.

If the rollout KL (mean per-sequence sum of ``log pi - log ref``) passes ``kl_blowup``, training stops before
that iteration's update, with a warning in the log and the report: the policy has run away from the reference
and further updates would only optimise the reward model's blind spots.

Log-probabilities use the sampling distribution (logits / ``temperature``) for the policy and the reference
alike; ``top_p`` truncation is not modelled (keep it 1 for an exact ratio). Scoring and updates run on packed
rows (``pack_length``): each prompt + response without padding, isolated by a block-diagonal attention mask, with
position ids from 0 as ``generate`` gave them, so every token sees what it saw when sampled; the LM head runs on
response positions only (chunked, never the ``(tokens, vocab)`` logits of a batch in the update).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.config.ppo import PPOConfig, validate
from preftune.data.records import to_messages
from preftune.io import storage
from preftune.model import modeling
from preftune.model.losses import (
    gae,
    masked_moments,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)
from preftune.model.sampling import eos_ids_of, generation_config
from preftune.model.templating import _prompt_keep, eos_id, pad_id, render_prompt
from preftune.report import html as reports
from preftune.train.batching import FIRST_ANSWER, PROMPT, DataError, pack_documents, read_rows
from preftune.train.checkpoint import Checkpointer, NonFiniteLossError, chain_digest, finite_everywhere
from preftune.train.kl_control import make_kl_controller
from preftune.train.loop import (
    History,
    Meter,
    config_rows,
    disable_dropout,
    lora_options,
    make_accelerator,
    make_optimizer,
    progress,
    resource_metrics,
    trainable_parameters,
)
from preftune.train.packed import fused_head_weight, packed_inputs, scored_hidden, scored_logprobs
from preftune.train.snapshots import Snapshots

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


# ------------------------------------------------------------------------------------------------------ prompts


def load_prompts(path: str) -> list[Messages]:
    """Unique prompts (as chat messages) of a JSONL file or directory of rows with a ``prompt`` field.

    The prompt may be text (one user message) or chat messages. In the RLHF pipeline these are the preference
    import's train pairs, where one prompt often has several pairs: duplicates are dropped, first one kept.
    """
    prompts: list[Messages] = []
    seen: set[str] = set()
    for file, row, record in read_rows(path):
        if "prompt" not in record:
            raise DataError(f"{file}: row {row}: field 'prompt': missing")
        try:
            messages = to_messages(record["prompt"], file, row, "prompt")
        except ValueError as exc:
            raise DataError(f"{file}: row {row}: field 'prompt': {exc}") from None
        if not messages or not any(m["content"].strip() for m in messages):
            raise DataError(f"{file}: row {row}: field 'prompt': empty prompt")
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            prompts.append(messages)
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


class PromptCycler:
    """Hands out prompt indices in a seeded random order, reshuffling after each full pass."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self.order.pop(0))
        return out


def _prompt_text(messages: Messages) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# ------------------------------------------------------------------------------------------------------ models


def _peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class TokenValueModel(torch.nn.Module):
    """A one-scalar reward model read at every position: the score head on each final hidden state.

    Wraps a sequence classifier (optionally a PeftModel around one). The HF classifier pools only the last
    non-pad token; the critic needs a value per token, the reward model the value at the last one.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        inner = self.model.get_base_model() if _peft(self.model) else self.model
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()


def _adapter_off(model: Any) -> Any:
    """A context with the LoRA adapter of ``model`` (or of the module it wraps) disabled."""
    inner = model.model if isinstance(model, TokenValueModel) else model
    return inner.disable_adapter() if _peft(inner) else nullcontext()


@dataclass
class Rollout:
    """One iteration's samples and everything PPO needs about them; per-token tensors are ``(B, R)``."""

    query_ids: torch.Tensor  # (B, P) left-padded rendered prompts
    query_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) sampled tokens, padded after the first eos
    response_mask: torch.Tensor  # (B, R) 1 up to and including the first eos
    prompts: list[Messages]
    texts: list[str]
    ended: torch.Tensor  # (B,) True where the response ended with eos
    prompt_tokens: list[list[int]] = field(default_factory=list)  # each prompt's ids, unpadded
    response_tokens: list[list[int]] = field(default_factory=list)  # each response up to its first eos
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    entropy: torch.Tensor | None = None

    def packed(self, rows: list[int], pad: int, pack_length: int) -> dict[str, torch.Tensor]:
        """The sequences ``rows`` (prompt + response, unpadded) packed by ``batching.pack_documents``; every
        response token is scored. ``flat`` indexes each scored token in the flattened ``(B, R)`` tensors."""
        docs = [
            [(self.prompt_tokens[r], PROMPT, -1), (self.response_tokens[r], FIRST_ANSWER, k)]
            for k, r in enumerate(rows)
        ]
        batch = pack_documents(docs, pad, pack_length)
        width = self.response_ids.shape[1]
        batch["flat"] = (
            torch.tensor(rows, dtype=torch.long)[batch["target_segment"]] * width + batch["target_pos"]
        )
        device = self.response_ids.device
        return {k: v.to(device) for k, v in batch.items()}


def _logprobs_and_entropy(
    model: Any, batch: dict[str, torch.Tensor], temperature: float, fused: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the sampled tokens of a packed batch under the sampling distribution
    (logits / ``temperature``), no gradients; the LM head runs on response positions only, in chunks."""
    targets = batch["target_ids"]
    if fused:
        hidden, weight = scored_hidden(model, batch), fused_head_weight(model)
    else:
        out = model(**packed_inputs(batch), use_cache=False).logits
        hidden, weight = out[batch["target_row"], batch["target_src"]], None
    logps, ents = [], []
    for start in range(0, hidden.shape[0], _HEAD_CHUNK):
        chunk = hidden[start : start + _HEAD_CHUNK]
        logits = chunk @ weight.t() if weight is not None else chunk
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        logps.append(logp.gather(-1, targets[start : start + _HEAD_CHUNK, None])[:, 0])
        ents.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(logps), torch.cat(ents)


#: Scored positions whose vocabulary logits exist at once in the no-grad scoring pass.
_HEAD_CHUNK = 1024


def _response_values(critic: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The critic's value of the state before each response token (at the position that predicts it)."""
    return critic(**packed_inputs(batch))[batch["target_row"], batch["target_src"]]


def _scatter(flat: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape.numel(), dtype=torch.float32, device=values.device)
    out[flat] = values.float()
    return out.view(shape)


# ----------------------------------------------------------------------------------------------------- rollouts


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def generate_rollout(
    policy: Any,
    tokenizer: Any,
    prompts: list[Messages],
    prompt_ids: list[list[int]],
    config: PPOConfig,
    eos_ids: list[int],
    device: torch.device,
) -> Rollout:
    """Sample one response per prompt with the policy (KV cache, left padding, stop at eos)."""
    pad = pad_id(tokenizer)
    gen_config = generation_config(
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        eos_ids=eos_ids,
        pad_id=pad,
    )
    width = max(len(ids) for ids in prompt_ids)
    query = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    query_mask = torch.zeros_like(query)
    for i, ids in enumerate(prompt_ids):
        query[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        query_mask[i, width - len(ids) :] = 1
    policy.eval()
    responses: list[list[int]] = []
    for part in _chunks(len(prompt_ids), config.forward_batch_size):
        out = policy.generate(
            input_ids=query[part].to(device),
            attention_mask=query_mask[part].to(device),
            generation_config=gen_config,
        )
        responses += out[:, width:].cpu().tolist()
    eos = set(eos_ids)
    bodies, lengths, ended = [], [], []
    for row in responses:
        end = next((k for k, token in enumerate(row) if token in eos), None)
        lengths.append(len(row) if end is None else end + 1)
        bodies.append(row if end is None else row[:end])
        ended.append(end is not None)
    length = max(lengths)
    response = torch.full((len(responses), length), pad, dtype=torch.long)
    response_mask = torch.zeros_like(response)
    for i, (row, n) in enumerate(zip(responses, lengths, strict=True)):
        response[i, :n] = torch.tensor(row[:n], dtype=torch.long)
        response_mask[i, :n] = 1
    return Rollout(
        query_ids=query.to(device),
        query_mask=query_mask.to(device),
        response_ids=response.to(device),
        response_mask=response_mask.to(device),
        prompts=prompts,
        texts=[tokenizer.decode(b, skip_special_tokens=True) for b in bodies],
        ended=torch.tensor(ended, dtype=torch.bool, device=device),
        prompt_tokens=[list(ids) for ids in prompt_ids],
        response_tokens=[row[:n] for row, n in zip(responses, lengths, strict=True)],
    )


@torch.no_grad()
def score_responses(
    reward: TokenValueModel,
    tokenizer: Any,
    prompts: list[Messages],
    texts: list[str],
    batch_size: int,
    device: torch.device,
    *,
    pack_length: int = 256,
) -> torch.Tensor:
    """The reward model's score of each response, on its training input: rendered prompt + response + eos.

    The score head is read where a transformers sequence classifier pools, and so where the reward model was
    trained to score: the last token whose id differs from the model's ``config.pad_token_id`` (the closing eos
    when pad and eos differ, else the last response token). ``reward`` must be in its frozen state (adapter
    disabled) when this is called. ``batch_size`` sequences at a time are packed into rows of up to
    ``pack_length`` tokens (``batching.pack_documents``; 0 = one per row).
    """
    eos, pad = eos_id(tokenizer), pad_id(tokenizer)
    inner = reward.model.get_base_model() if _peft(reward.model) else reward.model
    pool_pad = getattr(inner.config, "pad_token_id", None)
    rows, reads = [], []
    for messages, text in zip(prompts, texts, strict=True):
        prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]
        row = list(prompt_ids) + list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
        rows.append(row)
        reads.append(max((k for k, token in enumerate(row) if token != pool_pad), default=len(row) - 1))
    scores = []
    for part in _chunks(len(rows), batch_size):
        batch = pack_documents([[(row, PROMPT, -1)] for row in rows[part]], pad, pack_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        values = reward(**packed_inputs(batch))
        read = batch["doc_start"] + torch.tensor(reads[part], device=device)
        scores.append(values[batch["doc_row"], read])
    return torch.cat(scores)


@torch.no_grad()
def score_rollout(
    rollout: Rollout,
    policy: Any,
    reference: Any,
    critic: Any,
    reward: Any,
    tokenizer: Any,
    config: PPOConfig,
) -> None:
    """Fill in the rollout's old and reference log-probs, entropy, values and scores (no gradients).

    Each chunk of ``forward_batch_size`` sequences is packed once (no padding) and goes through the policy, the
    reference and the critic; the LM heads run on response positions only.
    """
    device = rollout.query_ids.device
    n = rollout.query_ids.shape[0]
    pad = pad_id(tokenizer)
    shape = rollout.response_ids.shape
    flat, logprobs, ref_logprobs, values, entropy = [], [], [], [], []
    policy.eval()
    critic.eval()
    ref_model = policy if reference is None else reference
    fused, ref_fused = fused_head_weight(policy) is not None, fused_head_weight(ref_model) is not None
    for part in _chunks(n, config.forward_batch_size):
        batch = rollout.packed(list(range(n))[part], pad, config.pack_length)
        flat.append(batch["flat"])
        lp, ent = _logprobs_and_entropy(policy, batch, config.temperature, fused)
        logprobs.append(lp)
        entropy.append(ent)
        with _adapter_off(policy) if reference is None else nullcontext():
            # the policy's arithmetic: before any update the two agree bit for bit (KL exactly 0)
            ref_logprobs.append(_logprobs_and_entropy(ref_model, batch, config.temperature, ref_fused)[0])
        values.append(_response_values(critic, batch))
    index = torch.cat(flat)
    rollout.logprobs = _scatter(index, torch.cat(logprobs), shape)
    rollout.ref_logprobs = _scatter(index, torch.cat(ref_logprobs), shape)
    rollout.entropy = _scatter(index, torch.cat(entropy), shape)
    rollout.values = _scatter(index, torch.cat(values), shape)
    scorer = critic if reward is None else reward
    with _adapter_off(critic) if reward is None else nullcontext():
        scores = score_responses(
            scorer,
            tokenizer,
            rollout.prompts,
            rollout.texts,
            config.forward_batch_size,
            device,
            pack_length=config.pack_length,
        )
    if config.missing_eos_penalty:
        scores = scores - config.missing_eos_penalty * (~rollout.ended).float()
    if config.score_clip is not None:
        scores = scores.clamp(-config.score_clip, config.score_clip)
    rollout.scores = scores


# --------------------------------------------------------------------------------------------------- training


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the masked tokens (1 = perfect critic, <= 0 = useless)."""
    _, var_returns = masked_moments(returns, mask)
    _, var_error = masked_moments(returns - values, mask)
    if var_returns <= 0:
        return float("nan")
    return float(1.0 - var_error / var_returns)


def _load_models(sft_model: str, reward_model: str, config: PPOConfig) -> tuple[Any, Any, Any, Any]:
    """(policy, reference or None, critic, reward or None): None where the adapter-disabled model serves."""
    lora = lora_options(config)
    policy = modeling.prepare_for_training(sft_model, **lora)
    critic = TokenValueModel(modeling.prepare_reward_model(reward_model, **lora))
    reference = reward = None
    if not config.use_lora:
        reference = modeling.load_causal_lm(sft_model, trust_remote_code=config.trust_remote_code)
        reward = TokenValueModel(
            modeling.load_reward_model(reward_model, trust_remote_code=config.trust_remote_code)
        )
        for frozen in (reference, reward):
            frozen.requires_grad_(False)
            frozen.eval()
    for model in (policy, critic, reference, reward):
        if model is not None:
            disable_dropout(model)
    policy.config.use_cache = False
    return policy, reference, critic, reward


def _check_tokenizers(tokenizer: Any, reward_tokenizer: Any, sft_model: str, reward_model: str) -> None:
    if tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ValueError(
            f"the SFT model {sft_model} and the reward model {reward_model} use different tokenizers: the critic "
            "reads the policy's tokens, so the reward model must be trained on the SFT model's tokenizer"
        )


def _max_positions(model: Any) -> int:
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value >= 2 else 1 << 20


def _head_tail(values: list[float], share: float = 0.2) -> tuple[float, float]:
    """Means of the first and of the last ``share`` of a series (at least one point each)."""
    k = max(1, math.ceil(len(values) * share))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def train_ppo(
    sft_model: str,
    reward_model: str,
    prompts: str,
    model_dir: str,
    report_path: str,
    config: PPOConfig,
    *,
    sft_model_uri: str | None = None,
    model_uri: str | None = None,
    snapshot_dir: str | None = None,
) -> dict[str, float]:
    """Optimise the SFT policy against a reward model with PPO and save it as a model artifact.

    Args:
        sft_model: The SFT model (local directory, s3:// URI or hub id): the starting policy and the reference.
        reward_model: The reward model (a sequence classifier artifact, or a LoRA adapter with its score head);
            it scores responses and initialises the critic. It must share the SFT model's tokenizer.
        prompts: JSONL file or directory of rows with a ``prompt`` (text or chat messages), e.g. the preference
            import's train pairs; duplicate prompts are dropped.
        model_dir: Where to write the policy artifact. With LoRA only the PPO adapter is saved, stacked on the
            SFT artifact.
        report_path: Where to write the HTML report (file).
        config: Hyper-parameters.
        sft_model_uri: The SFT artifact's URI for the lineage and the adapter's base (defaults to ``sft_model``).
        model_uri: Where ``model_dir`` will be published (recorded in the lineage chain).
        snapshot_dir: Where to keep ``config.num_checkpoints`` intermediate policies, saved after the updates
            of evenly spaced iterations (preftune.train.snapshots); None keeps none.

    Returns:
        Metrics: ``reward_first`` / ``reward_last`` (mean reward-model score of the responses in the first / last
        20% of iterations, at least one), ``reward_gain`` (last - first), ``kl_last`` and ``kl_max`` (rollout
        KL to the SFT model per response, nats), ``entropy_last`` (mean per-token entropy of the policy on its
        samples), ``clip_fraction_mean`` (share of tokens clipped, over all updates), ``value_loss_last``,
        ``explained_variance_last``, ``response_length_last`` (tokens, eos included), ``iterations`` (run),
        ``early_stops`` (iterations whose updates stopped on max_approx_kl), ``kl_blowups`` (1 when training
        stopped on kl_blowup), ``train_seconds``, ``rollout_seconds`` (time in generation) and
        ``rollout_tokens_per_second`` (sampled tokens per second of generation).
    """
    began = time.perf_counter()
    validate(config)
    prompt_rows = load_prompts(prompts)  # bad input fails before any model is loaded
    modeling.set_seed(config.seed)
    accelerator = make_accelerator(config.mixed_precision)
    device = accelerator.device
    tokenizer = modeling.load_tokenizer(sft_model, trust_remote_code=config.trust_remote_code)
    reward_tokenizer = modeling.load_tokenizer(reward_model, trust_remote_code=config.trust_remote_code)
    _check_tokenizers(tokenizer, reward_tokenizer, sft_model, reward_model)

    policy, reference, critic, reward = _load_models(sft_model, reward_model, config)
    limit = _max_positions(policy)
    if config.max_prompt_length + config.max_new_tokens > limit:
        raise ValueError(
            f"max_prompt_length + max_new_tokens = {config.max_prompt_length + config.max_new_tokens} exceeds "
            f"the model's {limit} positions"
        )
    eos_ids = eos_ids_of(tokenizer, policy)
    encoded, truncated = [], 0
    for messages in prompt_rows:
        ids = list(tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])
        encoded.append(_prompt_keep(ids, config.max_prompt_length, tokenizer.bos_token_id))
        truncated += len(encoded[-1]) < len(ids)

    policy_opt = make_optimizer(policy, config.learning_rate, config.weight_decay)
    critic_opt = make_optimizer(critic, config.critic_learning_rate, config.weight_decay)
    policy, critic, policy_opt, critic_opt = accelerator.prepare(policy, critic, policy_opt, critic_opt)
    if reference is not None:
        reference, reward = reference.to(device), reward.to(device)
    unwrapped_policy = accelerator.unwrap_model(policy)
    fused_policy = fused_head_weight(policy) is not None
    pad = pad_id(tokenizer)
    # the trained weights only: clipping need not walk the frozen ones on every step
    policy_params, critic_params = trainable_parameters(policy), trainable_parameters(critic)
    controller = make_kl_controller(config.kl_controller, config.kl_coef, config.target_kl, config.kl_horizon)
    reduce = (lambda t: accelerator.reduce(t, "sum")) if accelerator.num_processes > 1 else None

    # each process samples its own share of the prompts, in one seeded order for all
    cycler = PromptCycler(len(prompt_rows), config.seed)
    per_process = max(1, config.rollout_batch_size // accelerator.num_processes)

    snapshots = Snapshots(
        snapshot_dir if accelerator.is_main_process else None,
        config.iterations,
        config.num_checkpoints,
        stage="ppo",
    )
    history = History()
    samples: dict[int, list[dict[str, Any]]] = {}
    iteration, early_stops, blowups = 0, 0, 0
    blowup_note = ""
    rollout_seconds, rollout_tokens, train_tokens = 0.0, 0, 0
    all_clip: list[float] = []
    data_order = ""
    checkpointer = Checkpointer(config.checkpoint_uri, config.checkpoint_every, accelerator, stage="ppo")
    trained = {
        "modules": {"policy": policy, "critic": critic},
        "optimizers": {"policy": policy_opt, "critic": critic_opt},
    }
    if accelerator.process_index > 0:
        # every rank was seeded alike so that they start from the same weights; from here each samples from its
        # own stream (rank 0 keeps the one-process stream), or they would reuse the same draws on their prompts
        modeling.set_seed(config.seed + accelerator.process_index)
    restored = checkpointer.restore(**trained)  # a resumed rank gets its own stream back
    if restored is not None:
        state = restored.state
        iteration, early_stops = restored.step, state["early_stops"]
        rollout_seconds, rollout_tokens = state["rollout_seconds"], state["rollout_tokens"]
        train_tokens = state["train_tokens"]
        all_clip, data_order = state["all_clip"], state["data_order"]
        history = History.from_state(state["history"])
        samples = {int(k): v for k, v in state["samples"].items()}
        controller.load_state_dict(state["controller"])
        cycler.order = list(state["cycler_order"])
        cycler.generator.set_state(restored.tensors["cycler"])
        log.info("ppo: resumed from %s (iteration %d)", restored.uri, iteration)
    resumed_from = iteration
    snapshots.keep_until(iteration)

    def save_checkpoint() -> str:
        state = {
            "early_stops": early_stops,
            "rollout_seconds": rollout_seconds,
            "rollout_tokens": rollout_tokens,
            "train_tokens": train_tokens,
            "all_clip": all_clip,
            "data_order": data_order,
            "history": history.state_dict(),
            "samples": {str(k): v for k, v in samples.items()},
            "controller": controller.state_dict(),
            "cycler_order": cycler.order,
        }
        return checkpointer.save(
            iteration, **trained, state=state, tensors={"cycler": cycler.generator.get_state()}
        )

    bar = progress(config.iterations, "ppo", accelerator)
    bar.update(iteration)
    start = time.perf_counter()
    while iteration < config.iterations:
        iteration += 1
        indices = cycler.take(per_process * accelerator.num_processes)
        data_order = chain_digest(data_order, torch.tensor(indices))
        mine = indices[
            accelerator.process_index * per_process : (accelerator.process_index + 1) * per_process
        ]
        batch_prompts = [prompt_rows[i] for i in mine]

        t0 = time.perf_counter()
        rollout = generate_rollout(
            unwrapped_policy, tokenizer, batch_prompts, [encoded[i] for i in mine], config, eos_ids, device
        )
        rollout_seconds += time.perf_counter() - t0
        rollout_tokens += int(rollout.response_mask.sum())
        train_tokens += int(rollout.query_mask.sum() + rollout.response_mask.sum())  # no padding
        # no gradients here: the modules under DDP's wrapper, whose adapters can be switched off for the
        # reference and the reward
        score_rollout(
            rollout, unwrapped_policy, reference, accelerator.unwrap_model(critic), reward, tokenizer, config
        )
        mask = rollout.response_mask.float()

        kl_coef = controller.value
        rewards, kl = shape_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
        advantages, returns = gae(rewards, rollout.values, mask, gamma=config.gamma, lam=config.lam)
        if config.whiten_advantages:
            advantages = whiten(advantages, mask, reduce=reduce)

        seq_kl = kl.sum(dim=1)
        stats = accelerator.gather_for_metrics(
            torch.stack(
                [
                    rollout.scores,
                    seq_kl,
                    mask.sum(dim=1),
                    rollout.ended.float(),
                    (rollout.entropy.sum(dim=1) / mask.sum(dim=1).clamp(min=1)),
                    rewards.sum(dim=1),
                ],
                dim=1,
            )
        )
        score, rollout_kl, length, eos_rate, entropy, total_reward = stats.float().mean(dim=0).tolist()
        logged: dict[str, float] = {
            "score": score,
            "reward": total_reward,
            "kl": rollout_kl,
            "kl_coef": kl_coef,
            "entropy": entropy,
            "response_length": length,
            "eos_rate": eos_rate,
            "explained_variance": explained_variance(rollout.values, returns, mask),
        }
        if iteration == 1 or iteration == config.iterations:
            samples[iteration] = [
                {"iteration": iteration, "prompt": _prompt_text(p), "response": t, "score": float(s)}
                for p, t, s in zip(rollout.prompts, rollout.texts, rollout.scores.tolist(), strict=True)
            ][: config.samples_shown]

        if config.kl_blowup > 0 and rollout_kl > config.kl_blowup:
            blowups += 1
            blowup_note = (
                f"Training stopped at iteration {iteration}: the rollout KL to the SFT model, {rollout_kl:.2f} "
                f"nats per response, passed kl_blowup = {config.kl_blowup}. The policy saved is the one that "
                "produced these rollouts; lower learning_rate or raise kl_coef."
            )
            log.warning(blowup_note)
            samples[iteration] = [
                {"iteration": iteration, "prompt": _prompt_text(p), "response": t, "score": float(s)}
                for p, t, s in zip(rollout.prompts, rollout.texts, rollout.scores.tolist(), strict=True)
            ][: config.samples_shown]
            history.log_train(iteration, {**logged, "kl_blowup": 1.0})
            bar.update(1)
            break

        meter = Meter()
        stopped = False
        nonfinite: float | None = None
        ppo_steps = 0
        n = rollout.query_ids.shape[0]
        mini = max(1, config.mini_batch_size // accelerator.num_processes)
        # Flattened (B, R) views: a packed minibatch reads its scored tokens' entries through batch["flat"].
        old_logprobs, old_values = rollout.logprobs.view(-1), rollout.values.view(-1)
        flat_advantages, flat_returns = advantages.reshape(-1), returns.reshape(-1)
        policy.train()
        critic.train()
        for _ in range(config.ppo_epochs):
            order = torch.randperm(n).tolist()
            for start_row in range(0, n, mini):
                batch = rollout.packed(order[start_row : start_row + mini], pad, config.pack_length)
                index = batch["flat"]
                tokens = torch.ones_like(index, dtype=torch.float32)
                new_logprobs = scored_logprobs(
                    policy, batch, fused_head=fused_policy, temperature=config.temperature
                )
                policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
                    new_logprobs, old_logprobs[index], flat_advantages[index], tokens, config.clip_range
                )
                mean_kl = float(accelerator.reduce(approx_kl.detach(), "mean"))
                if config.max_approx_kl > 0 and mean_kl > config.max_approx_kl:
                    stopped = True
                    meter.add(approx_kl=mean_kl)
                    break
                new_values = _response_values(critic, batch)
                value_loss, value_clip = ppo_value_loss(
                    new_values, old_values[index], flat_returns[index], tokens, config.clip_range_value
                )
                loss = policy_loss + config.vf_coef * value_loss
                if not finite_everywhere(loss, accelerator):
                    nonfinite, stopped = float(loss.detach()), True  # the update is not applied
                    break
                accelerator.backward(loss)
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(policy_params, config.max_grad_norm)
                    accelerator.clip_grad_norm_(critic_params, config.max_grad_norm)
                policy_opt.step()
                critic_opt.step()
                policy_opt.zero_grad()
                critic_opt.zero_grad()
                ppo_steps += 1
                meter.add(
                    policy_loss=float(policy_loss.detach()),
                    value_loss=float(value_loss.detach()),
                    clip_fraction=float(clip_fraction),
                    value_clip_fraction=float(value_clip),
                    approx_kl=mean_kl,
                )
                all_clip.append(float(clip_fraction))
            if stopped:
                break
        early_stops += int(stopped)
        controller.update(rollout_kl, config.rollout_batch_size)
        logged.update(meter.means())
        logged.update({"early_stop": float(stopped), "ppo_steps": float(ppo_steps)})
        if nonfinite is not None:
            logged["nonfinite_loss"] = 1.0
        history.log_train(iteration, logged)
        if nonfinite is not None:
            where = f"ppo: the loss is {nonfinite} in iteration {iteration} after {ppo_steps} updates (not applied)"
            if not checkpointer.uri:
                raise NonFiniteLossError(f"{where}; no checkpoint_uri is set, so nothing was saved")
            uri = save_checkpoint()
            raise NonFiniteLossError(
                f"{where}; the policy and critic before that update are saved in {uri}. Lower the learning "
                "rates, raise kl_coef, or clip scores (score_clip)"
            )
        if snapshots.due(iteration):
            snapshots.save(
                iteration,
                unwrapped_policy,
                tokenizer,
                parent_uri=sft_model_uri or sft_model,
                parameters={**dataclasses.asdict(config), "reward_model": reward_model},
                values=logged,
            )
        if checkpointer.due(iteration) and iteration < config.iterations:
            save_checkpoint()
        bar.update(1)
        bar.set_postfix(
            score=f"{score:.3f}", kl=f"{rollout_kl:.2f}", len=f"{length:.1f}", stop="y" if stopped else "n"
        )
        log.info("ppo iteration %d: %s", iteration, json.dumps({k: round(v, 5) for k, v in logged.items()}))
    bar.close()
    train_seconds = time.perf_counter() - start

    rows = history.train
    reward_first, reward_last = _head_tail([r["score"] for r in rows])
    last = rows[-1]
    metrics = {
        "reward_first": reward_first,
        "reward_last": reward_last,
        "reward_gain": reward_last - reward_first,
        "kl_last": last["kl"],
        "kl_max": max(r["kl"] for r in rows),
        "entropy_last": last["entropy"],
        "clip_fraction_mean": sum(all_clip) / len(all_clip) if all_clip else 0.0,
        "value_loss_last": next((r["value_loss"] for r in reversed(rows) if "value_loss" in r), float("nan")),
        "explained_variance_last": last["explained_variance"],
        "response_length_last": last["response_length"],
        "iterations": float(len(rows)),
        "early_stops": float(early_stops),
        "kl_blowups": float(blowups),
        "train_seconds": train_seconds,
        "rollout_seconds": rollout_seconds,
        "rollout_tokens_per_second": rollout_tokens / rollout_seconds if rollout_seconds > 0 else 0.0,
        "resumed_from_iteration": float(resumed_from),
        **resource_metrics(began, accelerator, train_tokens),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(policy)
        unwrapped.eval()
        modeling.save_model(
            unwrapped,
            tokenizer,
            model_dir,
            stage="ppo",
            parent_uri=sft_model_uri or sft_model,
            parameters={**dataclasses.asdict(config), "reward_model": reward_model},
            data={"prompts": storage.sha256_of(prompts), "data_order": data_order},
            metrics=metrics,
            artifact_uri=model_uri,
        )
        sample_rows = [row for it in sorted(samples) for row in samples[it]]
        reports.write(
            report_path,
            _report(metrics, history, config, sample_rows, len(prompt_rows), truncated, blowup_note),
        )
    return metrics


# ------------------------------------------------------------------------------------------------------- report

_CURVES: dict[str, str] = {
    "score": "Mean reward-model score of the sampled responses",
    "reward": "Mean shaped reward per response (score - kl_coef x KL)",
    "kl": "KL to the SFT model per response (nats, mean of sum log pi - log ref)",
    "kl_coef": "KL coefficient",
    "entropy": "Policy entropy per token on its samples (nats)",
    "response_length": "Mean response length (tokens, eos included)",
    "eos_rate": "Share of responses that ended with eos",
    "policy_loss": "Clipped policy loss",
    "value_loss": "Clipped value loss",
    "clip_fraction": "Share of tokens whose ratio was clipped",
    "value_clip_fraction": "Share of tokens whose value was clipped",
    "approx_kl": "Approx. KL(rollout policy || updated policy) per token",
    "explained_variance": "Critic explained variance of the returns",
    "early_stop": "Updates stopped early on max_approx_kl (1 = yes)",
    "ppo_steps": "Optimisation steps in the iteration",
}


def _report(
    metrics: dict[str, float],
    history: History,
    config: PPOConfig,
    samples: list[dict[str, Any]],
    prompts: int,
    truncated: int,
    blowup_note: str,
) -> str:
    intro = (
        f"PPO for {int(metrics['iterations'])} iterations of {config.rollout_batch_size} rollouts on {prompts} "
        f"unique prompts: mean reward-model score {metrics['reward_first']:.3f} -> {metrics['reward_last']:.3f} "
        f"(first vs last 20% of iterations), KL to the SFT model {metrics['kl_last']:.3f} nats per response at "
        f"the end (max {metrics['kl_max']:.3f}); updates stopped early in {int(metrics['early_stops'])} "
        f"iteration(s). {blowup_note}"
    )
    sections: list[tuple[str, str]] = [("Metrics", reports.key_values(metrics))]
    names = [k for k in _CURVES if any(k in r for r in history.train)]
    names += sorted({k for r in history.train for k in r} - set(_CURVES) - {"step"})
    for name in names:
        sections.append(
            (
                name,
                reports.line_chart(
                    {name: history.series("train", name)}, _CURVES.get(name, name), "iteration"
                ),
            )
        )
    sections += [
        (
            "Sample responses (first and last iterations)",
            reports.table(samples, ["iteration", "prompt", "response", "score"]),
        ),
        ("Iterations", reports.table(history.train)),
        ("Data", reports.key_values({"unique prompts": prompts, "prompts truncated": truncated})),
        ("Configuration", reports.table(config_rows(config))),
    ]
    return reports.page("PPO training", sections, intro=intro)
