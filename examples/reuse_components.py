"""A pipeline of your own that reuses preftune's reward model and evaluate components.

The scenario: you already have a fine-tuned model (the candidate) and the model it started from (the reference),
plus preference feedback. You want a judge trained on that feedback and a report of how the candidate compares
to the reference under it, without running preftune's whole RLHF pipeline.

Two ways to get the components, both shown:
- from Python, with preftune installed: ``from preftune.components import reward_model_op``;
- from the compiled YAML, with only kfp installed: ``components.load_component_from_file(...)``.

Run it locally (kfp.local, one subprocess per step) from the repository root::

    .venv/bin/python examples/reuse_components.py

Without ``--candidate`` it first makes one, by fine-tuning the bundled tiny model for a few steps with the
ingest and sft components (a stand-in for "your fine-tuned model"), then compares it with the bundled model
under a judge trained on the bundled feedback, and prints the judge's verdict and the evaluation's metrics.
Give your own models with ``--reference DIR --candidate DIR``, or compile the pipeline for Kubeflow::

    .venv/bin/python examples/reuse_components.py --compile judge_pipeline.yaml
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from kfp import compiler, components, dsl

from preftune.components import ingest_op, preference_import_op, reward_model_op, sft_op

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


@dsl.pipeline(
    name="make-a-candidate", description="Fine-tune a model briefly: a stand-in candidate to judge."
)
def candidate_pipeline(base_model: str, sft_data: str, max_steps: int = 60):
    """Ingest SFT data and fine-tune ``base_model`` on it for ``max_steps`` steps.

    Args:
        base_model: URI of the model to fine-tune.
        sft_data: URI of SFT data (prompt and completion rows).
        max_steps: Optimisation steps.
    """
    rows = ingest_op(source=sft_data)
    sft_op(
        base_model=base_model,
        train_data=rows.outputs["train_data"],
        eval_data=rows.outputs["eval_data"],
        max_steps=max_steps,
    )


def make_candidate(base_model: str, sft_data: str, max_steps: int, pipeline_root: str) -> str:
    """Run :func:`candidate_pipeline` locally; returns the fine-tuned model's directory."""
    from preftune.orchestration.runner import run_pipeline

    summary = run_pipeline(
        candidate_pipeline,
        {"base_model": base_model, "sft_data": sft_data, "max_steps": max_steps},
        pipeline_root,
    )
    if summary["status"] != "SUCCEEDED":
        raise SystemExit(f"making the candidate failed: see {summary['index']}")
    return summary["steps"]["sft"]["artifacts"]["model"]


def verdict(metrics: dict) -> str:
    """The evaluation's answer in one sentence."""
    return (
        f"The judge prefers the candidate on {metrics['win_rate_vs_reference']:.0%} of prompts "
        f"({metrics['lc_win_rate_vs_reference']:.0%} length-controlled, {metrics['judge_ties_vs_reference']:.0f} "
        f"ties); mean judge reward {metrics['judge_reward_candidate']:.2f} vs {metrics['judge_reward_reference']:.2f};"
        f" KL(candidate || reference) {metrics['kl_candidate_reference']:.2f} nats per response."
    )


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pipeline-root", default="runs", help="where local runs are written (default: ./runs)"
    )
    parser.add_argument("--compile", metavar="YAML", help="compile to this file instead of running")
    parser.add_argument("--reference", default=str(HERE / "tiny-llama"), help="reference model directory")
    parser.add_argument("--candidate", help="candidate model directory (default: fine-tune one first)")
    parser.add_argument(
        "--feedback", default=str(HERE / "data" / "preferences.jsonl"), help="preference feedback"
    )
    parser.add_argument(
        "--eval-prompts", default=str(HERE / "data" / "eval_prompts.jsonl"), help="held-out prompts"
    )
    parser.add_argument(
        "--sft-data", default=str(HERE / "data" / "sft.jsonl"), help="data for the stand-in candidate"
    )
    parser.add_argument(
        "--candidate-steps", type=int, default=60, help="steps of the stand-in candidate's SFT"
    )
    parser.add_argument(
        "--reward-max-steps", type=int, default=-1, help="reward model steps (-1 = one epoch)"
    )
    parser.add_argument("--eval-max-prompts", type=int, default=32, help="prompts to evaluate on")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the example locally (or compile it); returns the judge run's summary."""
    args = _arguments(argv)
    if args.compile:
        compiler.Compiler().compile(judge_pipeline, args.compile)
        print(f"wrote {args.compile}")
        return {}
    from preftune.orchestration.runner import format_summary, run_pipeline

    candidate = args.candidate or make_candidate(
        args.reference, args.sft_data, args.candidate_steps, args.pipeline_root
    )
    summary = run_pipeline(
        judge_pipeline,
        {
            "reference_model": args.reference,
            "candidate_model": candidate,
            "feedback": args.feedback,
            "eval_prompts": args.eval_prompts,
            "reward_max_steps": args.reward_max_steps,
            "eval_max_prompts": args.eval_max_prompts,
        },
        args.pipeline_root,
    )
    print()
    print(format_summary(summary))
    if summary["status"] == "SUCCEEDED":
        print()
        print(verdict(summary["steps"]["evaluate"]["metrics"]))
    return summary


if __name__ == "__main__":
    main()
