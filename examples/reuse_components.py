"""A pipeline of your own that reuses preftune's reward model and evaluate components.

The scenario: you already have a fine-tuned model (the candidate) and the model it started from (the reference),
plus preference feedback. You want a judge trained on that feedback and a report of how the candidate compares
to the reference under it, without running preftune's whole RLHF pipeline.

Two ways to get the components, both shown:
- from Python, with preftune installed: ``from preftune.components import reward_model_op``;
- from the compiled YAML, with only kfp installed: ``components.load_component_from_file(...)``.

Run it locally (kfp.local, one subprocess per step)::

    python examples/reuse_components.py --pipeline-root runs

or compile it for Kubeflow::

    python examples/reuse_components.py --compile judge_pipeline.yaml
"""

import argparse
from pathlib import Path

from kfp import compiler, components, dsl

from preftune.components import preference_import_op, reward_model_op

HERE = Path(__file__).resolve().parent
# The evaluate component straight from its compiled YAML, as a team without preftune installed would load it.
evaluate_op = components.load_component_from_file(
    str(HERE.parent / "components" / "evaluate" / "component.yaml")
)


@dsl.pipeline(name="judge-my-model", description="Train a judge on feedback and compare two models under it.")
def judge_pipeline(
    reference_model: str,
    candidate_model: str,
    feedback: str,
    eval_prompts: str,
    reward_max_steps: int = -1,
    eval_max_prompts: int = 32,
):
    """Train a reward model on feedback, then evaluate a candidate against its reference with it as the judge.

    Args:
        reference_model: URI of the reference model directory (the model the candidate started from).
        candidate_model: URI of the candidate model directory.
        feedback: URI of preference feedback in any format the preference import reads.
        eval_prompts: URI of held-out prompts (JSONL rows with a prompt).
        reward_max_steps: Stop reward model training after this many steps (-1 = one epoch).
        eval_max_prompts: Evaluate at most this many prompts.
    """
    reference = dsl.importer(artifact_uri=reference_model, artifact_class=dsl.Model, reimport=False)
    candidate = dsl.importer(artifact_uri=candidate_model, artifact_class=dsl.Model, reimport=False)
    pairs = preference_import_op(source=feedback)
    judge = reward_model_op(
        sft_model=reference.output,
        train_pairs=pairs.outputs["train_pairs"],
        eval_pairs=pairs.outputs["eval_pairs"],
        max_steps=reward_max_steps,
    )
    evaluate_op(
        candidate=candidate.output,
        reference=reference.output,
        eval_prompts=eval_prompts,
        eval_pairs=pairs.outputs["eval_pairs"],
        judge=judge.outputs["model"],
        max_prompts=eval_max_prompts,
    )


def main() -> None:
    """Run the example locally on the bundled model and data, or compile it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline-root", default="runs", help="where local runs are written")
    parser.add_argument("--compile", metavar="YAML", help="compile to this file instead of running")
    args = parser.parse_args()
    if args.compile:
        compiler.Compiler().compile(judge_pipeline, args.compile)
        print(f"wrote {args.compile}")
        return
    from preftune.orchestration.runner import format_summary, run_pipeline

    model = str(HERE / "tiny-llama")
    summary = run_pipeline(
        judge_pipeline,
        {
            "reference_model": model,
            "candidate_model": model,
            "feedback": str(HERE / "data" / "preferences.jsonl"),
            "eval_prompts": str(HERE / "data" / "eval_prompts.jsonl"),
        },
        args.pipeline_root,
    )
    print(format_summary(summary))


if __name__ == "__main__":
    main()
