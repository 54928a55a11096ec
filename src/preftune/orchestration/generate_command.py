"""``preftune generate MODEL --prompt ...``: try a model by answering prompts with it.

MODEL is whatever names a model here: a model directory, ``s3://`` URI or hub id; a local run (its directory,
or its id under ``--pipeline-root``), meaning the policy it trained and evaluated; or ``registry:NAME`` (the
champion) / ``registry:NAME@N`` (version N) of the registry under ``--registry``. Prompts are rendered with the
model's chat template and answered with the same sampling code as the evaluate step.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from preftune.orchestration import run_dirs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments."""
    parser.add_argument(
        "model", metavar="MODEL", help="model directory, s3:// URI, hub id, run, or registry:NAME[@N]"
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="a user message to answer (repeatable)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default: 0.7)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--pipeline-root", default="runs", help="where run ids are looked up (default: ./runs)"
    )
    parser.add_argument(
        "--registry", default="runs/registry", help="registry for registry:NAME (default: ./runs/registry)"
    )


def _check(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.temperature < float("inf"):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")


def policy_of_run(summary: Mapping[str, Any]) -> str:
    """The model a run trained and evaluated: the evaluate step's candidate (or the last trained model)."""
    steps = summary.get("steps", {})
    producer = steps.get("evaluate", {}).get("inputs_from", {}).get("candidate")
    for name in (producer, "dpo", "ppo", "sft"):
        uri = steps.get(name or "", {}).get("artifacts", {}).get("model")
        if uri and steps[name]["status"] == "SUCCEEDED":
            return str(uri)
    raise ValueError(f"run {summary.get('run_id', '?')} has no trained model (did it finish?)")


def resolve_model(ref: str, pipeline_root: str, registry_uri: str) -> str:
    """Where MODEL's weights are (see the module docstring)."""
    if ref.startswith("registry:"):
        from preftune.io import registry

        name, _, version = ref.removeprefix("registry:").partition("@")
        if not version:
            uri = registry.resolve_champion(registry_uri, name)
            if not uri:
                raise ValueError(f"{name} has no champion in {registry_uri}")
            return uri
        found = [
            v for v in registry.list_versions(registry_uri, name) if str(v["version"]) == version.lstrip("v")
        ]
        if not found:
            raise ValueError(f"{name} has no version {version} in {registry_uri}")
        return str(found[0]["uri"])
    for candidate in (Path(ref).expanduser(), Path(pipeline_root).expanduser() / ref):
        run = run_dirs.read_run(candidate) if candidate.is_dir() else None
        if run is not None:
            return policy_of_run(run.summary)
    return ref


def run(args: argparse.Namespace) -> int:
    """Answer the prompts; 0, or 2 with a message when the model or a setting cannot be used."""
    try:
        _check(args)
        uri = resolve_model(args.model, args.pipeline_root, args.registry)
    except ValueError as err:
        print(f"preftune generate: error: {err}", file=sys.stderr)
        return 2
    import torch

    from preftune.model.modeling import load_causal_lm, load_tokenizer
    from preftune.model.sampling import generate_responses
    from preftune.model.templating import render_prompt

    try:
        tokenizer = load_tokenizer(uri)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_causal_lm(uri).to(device).eval()
        rendered = [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in args.prompt]
    except (OSError, ValueError) as err:
        print(f"preftune generate: error: cannot load {uri}: {err}", file=sys.stderr)
        return 2
    answers = generate_responses(
        model,
        tokenizer,
        rendered,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=8,
        desc="generate",
    )
    print(f"model: {uri}")
    for prompt, answer in zip(args.prompt, answers.texts, strict=True):
        print(f"\n> {prompt}\n{answer}")
    return 0
