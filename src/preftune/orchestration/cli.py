"""The ``preftune`` command: run pipelines locally, look at runs, models and the registry, compile and submit.

Starting it is cheap: the pipelines (and kfp) are imported only for ``preftune run``, and torch only by commands
that load a model (``generate``) or run one, so ``--help`` and parameter errors come back at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from preftune import __version__
from preftune.data import import_command
from preftune.launch import platform
from preftune.orchestration import kfp_api
from preftune.orchestration.help_format import Parser, WrappedHelp
from preftune.orchestration.run_summary import HEADLINE_METRICS

__all__ = ["HEADLINE_METRICS", "build_parser", "main"]


def _parameter_help(pipeline: Any) -> str:
    """Every parameter with its type, default, allowed values (from the configs of the steps it feeds) and help;
    one line each, which the help formatter wraps to the terminal with the indent kept."""
    from preftune.orchestration.parameters import pipeline_parameters

    lines = ["pipeline parameters (set with --param NAME=VALUE):", ""]
    for p in pipeline_parameters(pipeline).values():
        allowed = f", allowed: {p.allowed}" if p.allowed else ""
        lines.append(f"  {p.name} ({p.type}, default: {p.default!r}{allowed})")
        lines.append("      " + " ".join(p.description.split()))
    return "\n".join(lines)


def _add_compile_settings(parser: argparse.ArgumentParser) -> None:
    """One flag per compile-time setting (preftune.launch.platform.SETTINGS); each sets its variable."""
    for setting in platform.SETTINGS:
        if setting.switch:
            parser.add_argument(setting.flag, action="store_true", default=None, help=setting.help)
        else:
            parser.add_argument(setting.flag, metavar="VALUE", help=f"{setting.help} [${setting.env}]")


def _apply_compile_settings(argv: Sequence[str]) -> None:
    """Compile settings become environment variables before the components are imported; a value no cluster
    would accept is refused here, before anything is compiled."""
    pre = argparse.ArgumentParser(add_help=False)
    _add_compile_settings(pre)
    known, _ = pre.parse_known_args(list(argv))
    for setting in platform.SETTINGS:
        value = getattr(known, setting.dest)
        if value is not None:
            os.environ[setting.env] = "1" if value is True else value
    try:
        platform.compiled_environment()
    except platform.SettingError as err:
        print(f"preftune: error: {err}", file=sys.stderr)
        sys.exit(2)


def _add_run_command(commands: Any, with_pipelines: bool) -> None:
    """``preftune run PIPELINE``: one subcommand per pipeline, each listing its parameters in its help."""
    run = commands.add_parser(
        "run",
        help="run a pipeline on this machine with KFP's local runner",
        description="Run a pipeline on this machine with KFP's local runner (one subprocess per step). Each run "
        "gets its own directory under --pipeline-root, with summary.json, index.html (every report and metric) "
        "and the step logs; steps with the same inputs as an earlier run's come from the cache.",
    )
    pipelines = run.add_subparsers(dest="pipeline", required=True, metavar="PIPELINE", parser_class=Parser)
    if not with_pipelines:
        return
    from preftune.pipelines import PIPELINES

    for name, pipeline in PIPELINES.items():
        sub = pipelines.add_parser(
            name,
            help=(pipeline.description or "").split(":")[0],
            description=pipeline.description,
            epilog=_parameter_help(pipeline),
            formatter_class=WrappedHelp,
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
        sub.add_argument(
            "--resume",
            metavar="RUN",
            help="finish an interrupted or failed run (its directory, or its id under --pipeline-root): finished "
            "steps are reused and the interrupted one continues from its last checkpoint",
        )
        sub.add_argument(
            "--no-cache",
            dest="cache",
            action="store_false",
            help="do not reuse the steps of earlier runs with the same inputs (this run's own steps are still "
            "reused by --resume)",
        )
        _add_verbose(sub)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show every step's output and the libraries' INFO logs",
    )


def build_parser(with_pipelines: bool = True) -> argparse.ArgumentParser:
    """The argument parser; ``with_pipelines`` imports the pipelines (and kfp) to describe their parameters,
    which only ``preftune run`` needs."""
    from preftune.orchestration import generate_command, registry_command, runs_command

    parser = Parser(
        prog="preftune",
        description="Align language models with human preferences (RLHF and DPO) on Kubeflow Pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show every step's output and the libraries' INFO logs"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_run_command(commands, with_pipelines)
    runs_command.add_arguments(
        commands.add_parser(
            "runs",
            help="list the local runs under a pipeline root, with status and headline metrics",
            description="List the runs under --pipeline-root, oldest first: status (RUNNING, SUCCEEDED, FAILED, "
            "INTERRUPTED), when, how long, and each run's headline figures.",
        )
    )
    registry_command.add_arguments(
        commands.add_parser(
            "registry",
            help="list a model registry's models, their versions and champions",
            description="Inspect a model registry (a local directory or s3://bucket/prefix).",
        )
    )
    generate_command.add_arguments(
        commands.add_parser(
            "generate",
            help="try a model: answer prompts with a trained policy, a registry version or any model",
            description="Answer each --prompt with a model: a model directory, s3:// URI or hub id, a run (its "
            "trained policy), or a registry model (registry:NAME, its champion; registry:NAME@N, version N).",
        )
    )

    imp = commands.add_parser(
        "import-preferences",
        help="import collected feedback as preference pairs, outside a pipeline",
        description="Read feedback in any supported format, validate it, and write train/eval pairs, rejected "
        "rows (with reasons) and an HTML report. Prints the count of each rejection reason.",
    )
    import_command.add_arguments(imp)
    _add_verbose(imp)

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
    """Refuse bad parameters and unusable directories before anything runs; then run, and summarise."""
    from preftune.orchestration.parameters import ParameterError, parse_assignments
    from preftune.orchestration.runner import RunDirError, format_summary, run_pipeline
    from preftune.pipelines import PIPELINES

    pipeline = PIPELINES[args.pipeline]
    try:
        overrides = parse_assignments(pipeline, args.param)
        summary = run_pipeline(
            pipeline,
            overrides,
            args.pipeline_root,
            resume=args.resume,
            cache=args.cache,
            verbose=args.verbose,
        )
    except (ParameterError, RunDirError) as err:
        print(f"preftune run {args.pipeline}: error: {err}", file=sys.stderr)
        return 2
    print()
    print(format_summary(summary, HEADLINE_METRICS))
    return {"SUCCEEDED": 0, "INTERRUPTED": 130}.get(summary["status"], 1)


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


def _configure_logging(verbose: bool) -> None:
    """Libraries' INFO logs (great-expectations, kfp, ...) only with -v; warnings and errors always."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _first_command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``preftune`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _apply_compile_settings(argv)
    args = build_parser(with_pipelines=_first_command(argv) == "run").parse_args(argv)
    _configure_logging(args.verbose)
    from preftune.orchestration import generate_command, registry_command, runs_command

    handlers = {
        "run": _run,
        "runs": runs_command.run,
        "registry": registry_command.run,
        "generate": generate_command.run,
        "compile": _compile,
        "import-preferences": import_command.run,
        "submit": kfp_api.run_submit,
        "schedule": kfp_api.run_schedule,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
