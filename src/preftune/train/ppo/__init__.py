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

The package, in the order an iteration runs: prompts.py (the prompts and their seeded order), models.py (the
four roles on two copies of the weights), rollout.py (steps 1-2), advantages.py (step 3), update.py (step 4),
trainer.py (one iteration for the engine's RL loop, preftune.train.engine.iterations, and step 5), state.py
(what a checkpoint keeps), driver.py (``train_ppo``) and report.py (metrics and the HTML report).
"""

from preftune.config.ppo import PPOConfig
from preftune.train.ppo.advantages import Advantages, explained_variance, shaped_advantages
from preftune.train.ppo.driver import train_ppo
from preftune.train.ppo.models import TokenValueModel, adapter_off, load_models
from preftune.train.ppo.prompts import PromptCycler, load_prompts
from preftune.train.ppo.rollout import Rollout, generate_rollout, score_responses, score_rollout
from preftune.train.ppo.state import PPOState
from preftune.train.ppo.trainer import PPOTrainer
from preftune.train.ppo.update import ppo_update

__all__ = [
    "Advantages",
    "PPOConfig",
    "PPOState",
    "PPOTrainer",
    "PromptCycler",
    "Rollout",
    "TokenValueModel",
    "adapter_off",
    "explained_variance",
    "generate_rollout",
    "load_models",
    "load_prompts",
    "ppo_update",
    "score_responses",
    "score_rollout",
    "shaped_advantages",
    "train_ppo",
]
