"""The preference-learning steps every pipeline trains from the SFT model and the imported pairs.

Each pipeline maps its own parameter names onto the component's (``dpo_beta`` -> ``beta``) and passes them as
``settings``; the wiring of inputs, the step's name and its cluster settings live here once.
"""

from typing import Any

from kfp import dsl

from preftune.components import (
    dpo_op,
    grpo_op,
    kto_op,
    online_dpo_op,
    ppo_op,
    refuse_choice_op,
    reward_model_op,
)
from preftune.pipelines.cluster import data_step, training_step


def dpo_step(sft: dsl.PipelineTask, pairs: dsl.PipelineTask, **settings: Any) -> dsl.PipelineTask:
    """DPO against the SFT model on the train pairs, scored on the held-out ones."""
    task = dpo_op(
        sft_model=sft.outputs["model"],
        train_pairs=pairs.outputs["train_pairs"],
        eval_pairs=pairs.outputs["eval_pairs"],
        **settings,
    )
    return training_step(task.set_display_name("DPO"))


def reward_model_step(
    sft: dsl.PipelineTask, pairs: dsl.PipelineTask, display_name: str = "Reward model", **settings: Any
) -> dsl.PipelineTask:
    """A reward model initialised from the SFT model, trained on the train pairs (or the share of them its
    ``pair_subset`` setting picks: the policy's reward model, or the held-out judge)."""
    task = reward_model_op(
        sft_model=sft.outputs["model"],
        train_pairs=pairs.outputs["train_pairs"],
        eval_pairs=pairs.outputs["eval_pairs"],
        **settings,
    )
    return training_step(task.set_display_name(display_name))


def ppo_step(
    sft: dsl.PipelineTask, reward: dsl.PipelineTask, pairs: dsl.PipelineTask, **settings: Any
) -> dsl.PipelineTask:
    """PPO from the SFT model against the reward model, on the prompts of the train pairs."""
    task = ppo_op(
        sft_model=sft.outputs["model"],
        reward_model=reward.outputs["model"],
        prompts=pairs.outputs["train_pairs"],
        **settings,
    )
    return training_step(task.set_display_name("PPO"))


def grpo_step(
    sft: dsl.PipelineTask, reward: dsl.PipelineTask, pairs: dsl.PipelineTask, **settings: Any
) -> dsl.PipelineTask:
    """GRPO, Dr. GRPO or RLOO (``estimator``) from the SFT model against the reward model, on the train prompts."""
    task = grpo_op(
        sft_model=sft.outputs["model"],
        reward_model=reward.outputs["model"],
        prompts=pairs.outputs["train_pairs"],
        **settings,
    )
    name = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO"}.get(
        settings.get("estimator", "grpo"), "GRPO"
    )
    return training_step(task.set_display_name(name))


def kto_step(sft: dsl.PipelineTask, pairs: dsl.PipelineTask, **settings: Any) -> dsl.PipelineTask:
    """KTO against the SFT model on the import's unpaired thumbs and ratings (and the pairs of the other
    prompts), scored on the held-out pairs."""
    task = kto_op(
        sft_model=sft.outputs["model"],
        train_pairs=pairs.outputs["train_pairs"],
        eval_pairs=pairs.outputs["eval_pairs"],
        train_unpaired=pairs.outputs["train_unpaired"],
        **settings,
    )
    return training_step(task.set_display_name("KTO"))


def online_dpo_step(
    sft: dsl.PipelineTask, reward: dsl.PipelineTask, pairs: dsl.PipelineTask, **settings: Any
) -> dsl.PipelineTask:
    """Online DPO from the SFT model, the reward model ranking its answers to the train prompts each round."""
    task = online_dpo_op(
        sft_model=sft.outputs["model"],
        reward_model=reward.outputs["model"],
        prompts=pairs.outputs["train_pairs"],
        **settings,
    )
    return training_step(task.set_display_name("Online DPO"))


def refuse_other_choice(parameter: str, value: Any, allowed: tuple[str, ...]) -> dsl.PipelineTask:
    """The ``dsl.Else`` of a method choice: a step that fails the run when the parameter's value has no branch
    (a run from the Kubeflow UI is not checked before it starts), naming the parameter and the values allowed."""
    task = refuse_choice_op(parameter=parameter, value=value, allowed=",".join(allowed))
    return data_step(task.set_display_name(f"Unknown {parameter}"))
