"""PPO's four roles (policy, reference, critic, reward) on as few copies of the weights as LoRA allows."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from preftune.config.ppo import PPOConfig
from preftune.model import modeling
from preftune.train.loop import disable_dropout, lora_options
from preftune.train.packed import packed_call


def is_peft(model: Any) -> bool:
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
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        inner = self.model.get_base_model() if is_peft(self.model) else self.model
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()


def adapter_off(model: Any) -> Any:
    """A context with the LoRA adapter of ``model`` (or of the module it wraps) disabled."""
    inner = model.model if isinstance(model, TokenValueModel) else model
    return inner.disable_adapter() if is_peft(inner) else nullcontext()


def token_values(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A value model's outputs at every position of a packed batch, ``(rows, length)``, whatever its kernel."""
    call = packed_call(model, batch)
    return call.unflatten(model(**call.inputs))


def response_values(critic: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The critic's value of the state before each response token (at the position that predicts it)."""
    return token_values(critic, batch)[batch["target_row"], batch["target_src"]]


def load_models(sft_model: str, reward_model: str, config: PPOConfig) -> tuple[Any, Any, Any, Any]:
    """(policy, reference or None, critic, reward or None): None where the adapter-disabled model serves.

    Full fine-tuning holds frozen copies of the SFT and reward models in fp32 like the trained ones, so that at
    step 0 they compute exactly what the policy and critic do (KL 0, values equal to the rewards).
    """
    lora = lora_options(config)
    policy = modeling.prepare_for_training(sft_model, **lora)
    critic = TokenValueModel(modeling.prepare_reward_model(reward_model, **lora))
    reference = reward = None
    if not config.use_lora:
        frozen_options = {
            "trust_remote_code": config.trust_remote_code,
            "dtype": torch.float32,
            "attn_implementation": lora["attn_implementation"],
        }
        reference = modeling.load_causal_lm(sft_model, **frozen_options)
        reward_classifier = modeling.load_reward_model(reward_model, **frozen_options)
        reward = TokenValueModel(reward_classifier)
        for frozen in (reference, reward):
            frozen.requires_grad_(False)
            frozen.eval()
    for model in (policy, critic, reference, reward):
        if model is not None:
            disable_dropout(model)
    policy.config.use_cache = False
    return policy, reference, critic, reward


def check_tokenizers(tokenizer: Any, reward_tokenizer: Any, sft_model: str, reward_model: str) -> None:
    """The critic reads the policy's tokens: the reward model must share the SFT model's tokenizer."""
    if tokenizer.get_vocab() != reward_tokenizer.get_vocab():
        raise ValueError(
            f"the SFT model {sft_model} and the reward model {reward_model} use different tokenizers: the critic "
            "reads the policy's tokens, so the reward model must be trained on the SFT model's tokenizer"
        )


def check_lengths(policy: Any, config: PPOConfig) -> None:
    """A prompt and its response must fit the policy's positions."""
    value = getattr(policy.config, "max_position_embeddings", None)
    limit = int(value) if isinstance(value, int) and value >= 2 else 1 << 20
    if config.max_prompt_length + config.max_new_tokens > limit:
        raise ValueError(
            f"max_prompt_length + max_new_tokens = {config.max_prompt_length + config.max_new_tokens} exceeds "
            f"the model's {limit} positions"
        )
