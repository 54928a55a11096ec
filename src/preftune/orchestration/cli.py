"""The ``preftune`` command: run pipelines locally and compile them for Kubeflow."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from preftune import __version__
from preftune.data import import_command
from preftune.launch import platform
from preftune.orchestration import kfp_api

#: Metrics printed after a local run, by pipeline task name.
HEADLINE_METRICS = {
    "ingest": ["rows_input", "rows_train", "rows_eval", "rows_rejected"],
    "preference-import": ["rows_input", "rows_used", "rows_rejected", "pairs_train", "pairs_eval"],
    "sft": ["train_loss", "eval_loss", "eval_perplexity"],
    "dpo": ["first_step_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"],
    "reward-model": ["first_eval_accuracy", "eval_accuracy", "eval_mean_margin"],
    "ppo": ["reward_first", "reward_last", "kl_last", "kl_max", "early_stops"],
    "evaluate": [
        "win_rate_vs_reference",
        "lc_win_rate_vs_reference",
        "win_rate_vs_champion",
        "lc_win_rate_vs_champion",
        "judge_reward_candidate",
        "judge_reward_reference",
        "kl_candidate_reference",
        "implicit_reward_accuracy",
        "distinct_2_candidate",
        "distinct_2_reference",
        "mean_length_candidate",
        "frontier_points",
    ],
    "promote": ["version"],
    "compare": ["rlhf_win_rate_vs_dpo", "dpo_win_rate_vs_rlhf", "head_to_head_ties", "head_to_head_prompts"],
}
HEADLINE_METRICS["evaluate-2"] = HEADLINE_METRICS["evaluate"]  # the compare pipeline's second evaluation


def _parameter_help(pipeline: Any) -> str:
    """Every parameter with its type, default, allowed values (from the configs of the steps it feeds) and help."""
    from preftune.orchestration.parameters import pipeline_parameters

    lines = ["pipeline parameters (set with --param NAME=VALUE):", ""]
    for p in pipeline_parameters(pipeline).values():
        allowed = f", allowed: {p.allowed}" if p.allowed else ""
        lines.append(f"  {p.name} ({p.type}, default: {p.default!r}{allowed})")
        lines += textwrap.wrap(p.description, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _add_compile_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image",
        help=f"runtime image stamped into every component (default: ${platform.IMAGE_ENV} "
        f"or {platform.DEFAULT_IMAGE})",
    )
    parser.add_argument(
        "--accelerator-type",
        help=f"accelerator resource training steps request (default: {platform.DEFAULT_ACCELERATOR_TYPE})",
    )
    parser.add_argument(
        "--accelerator-count",
        type=int,
        help=f"accelerators per training step, 0 for CPU only (default: {platform.DEFAULT_ACCELERATOR_COUNT})",
    )
    parser.add_argument(
        "--s3-secret",
        help=f"Kubernetes Secret with the S3 credentials (default: {platform.DEFAULT_S3_SECRET})",
    )
    parser.add_argument(
        "--s3-secret-keys",
        metavar="KEY=ENV[,KEY=ENV]",
        help="which Secret keys become which environment variables (default: AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY under the same names)",
    )


def _apply_compile_settings(argv: Sequence[str]) -> None:
    """Compile settings become environment variables before the components are imported."""
    pre = argparse.ArgumentParser(add_help=False)
    _add_compile_settings(pre)
    known, _ = pre.parse_known_args(list(argv))
    if known.image:
        os.environ[platform.IMAGE_ENV] = known.image
    if known.accelerator_type:
        os.environ[platform.ACCELERATOR_TYPE_ENV] = known.accelerator_type
    if known.accelerator_count is not None:
        os.environ[platform.ACCELERATOR_COUNT_ENV] = str(known.accelerator_count)
    if known.s3_secret:
        os.environ[platform.S3_SECRET_ENV] = known.s3_secret
    if known.s3_secret_keys:
        os.environ[platform.S3_SECRET_KEYS_ENV] = known.s3_secret_keys


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (imports the pipelines to describe their parameters)."""
    from preftune.pipelines import PIPELINES

    parser = argparse.ArgumentParser(
        prog="preftune",
        description="Align language models with human preferences (RLHF and DPO) on Kubeflow Pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a pipeline on this machine with KFP's local runner",
        description="Run a pipeline on this machine with KFP's local runner (one subprocess per step).",
    )
    pipelines = run.add_subparsers(dest="pipeline", required=True, metavar="PIPELINE")
    for name, pipeline in PIPELINES.items():
        sub = pipelines.add_parser(
            name,
            help=(pipeline.description or "").split(":")[0],
            description=pipeline.description,
            epilog=_parameter_help(pipeline),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument(
            "--param",
            "-p",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="set a pipeline parameter (repeatable); see the list below",
        )
        sub.add_argument(
            "--pipeline-root",
            default="runs",
            help="directory where runs and their artifacts are written (default: ./runs)",
        )

    imp = commands.add_parser(
        "import-preferences",
        help="import collected feedback as preference pairs, outside a pipeline",
        description="Read feedback in any supported format, validate it, and write train/eval pairs, rejected "
        "rows (with reasons) and an HTML report. Prints the count of each rejection reason.",
    )
    import_command.add_arguments(imp)

    kfp_api.add_submit_arguments(
        commands.add_parser(
            "submit",
            help="upload a compiled pipeline to Kubeflow (a new version if it exists) and start a run",
            description="Upload pipelines/<name>.yaml to a Kubeflow Pipelines host and start a run.",
        )
    )
    kfp_api.add_schedule_arguments(
        commands.add_parser(
            "schedule",
            help="create a recurring run (6-field cron, no catch-up, one run at a time)",
            description="Upload pipelines/<name>.yaml and create a recurring run on a Kubeflow Pipelines host.",
        )
    )

    comp = commands.add_parser(
        "compile",
        help="compile components and pipelines to their committed YAML",
        description="Write components/<stage>/component.yaml and pipelines/<name>.yaml.",
    )
    comp.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if a committed YAML is missing or stale",
    )
    comp.add_argument("--root", help="source checkout to write into (default: where preftune runs from)")
    _add_compile_settings(comp)
    return parser


def _run(args: argparse.Namespace) -> int:
    from preftune.orchestration.parameters import ParameterError, parse_assignments
    from preftune.orchestration.runner import format_summary, run_pipeline
    from preftune.pipelines import PIPELINES

    pipeline = PIPELINES[args.pipeline]
    try:
        overrides = parse_assignments(pipeline, args.param)
    except ParameterError as err:
        print(f"preftune run {args.pipeline}: error: {err}", file=sys.stderr)
        return 2
    summary = run_pipeline(pipeline, overrides, args.pipeline_root)
    print()
    print(format_summary(summary, HEADLINE_METRICS))
    return 0 if summary["status"] == "SUCCEEDED" else 1


def _compile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from preftune.orchestration import compilation

    root = Path(args.root).resolve() if args.root else None
    if args.check:
        stale = compilation.stale(root)
        for path in stale:
            print(f"stale: {path} (run `preftune compile`)", file=sys.stderr)
        if not stale:
            print("all compiled YAML files are up to date")
        return 1 if stale else 0
    compilation.compile_all(root)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``preftune`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _apply_compile_settings(argv)
    args = build_parser().parse_args(argv)
    handlers = {
        "run": _run,
        "compile": _compile,
        "import-preferences": import_command.run,
        "submit": kfp_api.run_submit,
        "schedule": kfp_api.run_schedule,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
