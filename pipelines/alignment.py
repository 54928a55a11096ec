"""The preference-learning steps every pipeline trains from the SFT model and the imported pairs.

Each pipeline maps its own parameter names onto the component's (``dpo_beta`` -> ``beta``) and passes them as
``settings``; the wiring of inputs, the step's name and its cluster settings live here once.
"""

from typing import Any

from kfp import dsl

from preftune.components import dpo_op, ppo_op, reward_model_op
from preftune.pipelines.cluster import training_step


def dpo_step(sft: dsl.PipelineTask, pairs: dsl.PipelineTask, **settings: Any) -> dsl.PipelineTask:
    """DPO against the SFT model on the train pairs, scored on the held-out ones."""
    task = dpo_op(
        sft_model=sft.outputs["model"],
        train_pairs=pairs.outputs["train_pairs"],
        eval_pairs=pairs.outputs["eval_pairs"],
        **settings,
    )
    return training_step(task.set_display_name("DPO"))


def reward_model_step(sft: dsl.PipelineTask, pairs: dsl.PipelineTask, **settings: Any) -> dsl.PipelineTask:
    """A reward model initialised from the SFT model, trained on the train pairs."""
    task = reward_model_op(
        sft_model=sft.outputs["model"],
        train_pairs=pairs.outputs["train_pairs"],
        eval_pairs=pairs.outputs["eval_pairs"],
        **settings,
    )
    return training_step(task.set_display_name("Reward model"))


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
