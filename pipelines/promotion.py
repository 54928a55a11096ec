"""The tail both pipelines share: evaluate against the SFT model and the champion, gate, promote."""

from typing import Any

from kfp import dsl

from preftune.components import champion_op, evaluate_op, gate_op, promote_op
from preftune.pipelines.cluster import data_step, training_step


def evaluate_policy(
    policy: dsl.PipelineTask,
    sft: dsl.PipelineTask,
    pairs: dsl.PipelineTask,
    display_name: str,
    *,
    judge: dsl.PipelineTask | None = None,
    judge_uri: str | None = None,
    heldout_judge: dsl.PipelineTask | None = None,
    **settings: Any,
) -> dsl.PipelineTask:
    """The evaluate step of a trained policy against its SFT model, on the held-out pairs, with its training
    snapshots to choose from; ``judge`` is a reward model step of the pipeline, ``judge_uri`` one given by URI
    (which wins when set); ``heldout_judge`` a reward model step trained on prompts the judge never saw;
    ``settings`` are the evaluate component's other parameters."""
    judged: dict[str, Any] = {} if judge is None else {"judge": judge.outputs["model"]}
    if judge_uri is not None:
        judged["judge_uri"] = judge_uri
    if heldout_judge is not None:
        judged["heldout_judge"] = heldout_judge.outputs["model"]
    evaluation = evaluate_op(
        candidate=policy.outputs["model"],
        reference=sft.outputs["model"],
        eval_pairs=pairs.outputs["eval_pairs"],
        checkpoints=policy.outputs["checkpoints"],
        **judged,
        **settings,
    )
    return training_step(evaluation.set_display_name(display_name))


def evaluate_and_promote(
    policy: dsl.PipelineTask,
    sft: dsl.PipelineTask,
    pairs: dsl.PipelineTask,
    *,
    eval_prompts: str,
    registry_uri: str,
    model_name: str,
    max_new_tokens: int,
    max_prompts: int,
    seed: int,
    min_win_rate_vs_champion: float,
    max_kl: float,
    min_diversity_ratio: float,
    length_controlled: bool,
    min_judge_confirmation: float = 0.5,
    judge: dsl.PipelineTask | None = None,
    judge_uri: str = "",
    heldout_judge: dsl.PipelineTask | None = None,
    heldout_judge_uri: str = "",
    beta: float = 0.1,
    max_length: int = 256,
    precision: str = "auto",
    attn_implementation: str = "auto",
    report_to: str = "none",
) -> None:
    """Evaluate the policy, decide by the gate, and publish it to the registry only when the gate passes.

    The evaluate step chooses the candidate among the final policy and the training snapshots, inside the
    gate's own bounds; the gate judges that one and promote publishes it (the step's ``selected`` model). With
    an empty ``registry_uri`` there is no champion and nothing is published; the gate still reports whether the
    candidate would have passed. ``max_length`` truncates the held-out pairs as training did;
    ``precision``, ``attn_implementation`` and ``report_to`` are those of the training steps.
    """
    current = data_step(
        champion_op(registry_uri=registry_uri, model_name=model_name).set_display_name("Current champion")
    )
    current.set_caching_options(False)  # the champion moves between runs: always look it up
    evaluation = evaluate_policy(
        policy,
        sft,
        pairs,
        "Evaluate against SFT and champion",
        judge=judge,
        judge_uri=None if judge is not None else judge_uri,
        heldout_judge=heldout_judge,
        heldout_judge_uri=heldout_judge_uri,
        eval_prompts=eval_prompts,
        champion_uri=current.output,
        max_new_tokens=max_new_tokens,
        beta=beta,
        max_prompts=max_prompts,
        seed=seed,
        max_length=max_length,
        precision=precision,
        attn_implementation=attn_implementation,
        report_to=report_to,
        max_kl=max_kl,
        min_diversity_ratio=min_diversity_ratio,
        min_judge_confirmation=min_judge_confirmation,
    )

    verdict = data_step(
        gate_op(
            evaluation=evaluation.outputs["metrics"],
            champion_uri=current.output,
            min_win_rate_vs_champion=min_win_rate_vs_champion,
            max_kl=max_kl,
            min_diversity_ratio=min_diversity_ratio,
            min_judge_confirmation=min_judge_confirmation,
            length_controlled=length_controlled,
        ).set_display_name("Promotion gate")
    )
    passed = dsl.If(verdict.outputs["Output"] == True, name="gate-passed")  # noqa: E712 - a KFP condition
    with passed, dsl.If(registry_uri != "", name="registry-set"):
        publish = promote_op(
            candidate=evaluation.outputs["selected"],
            registry_uri=registry_uri,
            model_name=model_name,
            decision=verdict.outputs["decision"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        data_step(publish.set_display_name("Promote to registry"))
