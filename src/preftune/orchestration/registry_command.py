"""``preftune registry list``: a model registry's models, their versions and which one is the champion."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from preftune.io import registry

#: Figures shown for each version, from the evaluation it was promoted on: (metric, label).
_FIGURES = (
    ("win_rate_vs_reference", "win vs SFT"),
    ("lc_win_rate_vs_champion", "lc win vs champion"),
    ("kl_candidate_reference", "KL"),
    ("diversity_ratio_vs_reference", "diversity"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments: ``registry list [MODEL ...] [--registry URI]``."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="every model, its versions (newest last) and its champion",
        description="List each model of the registry with its versions, when each was promoted, from which "
        "run, its headline evaluation figures, and which version is the champion.",
    )
    listing.add_argument("models", nargs="*", metavar="MODEL", help="only these models (default: all)")
    listing.add_argument(
        "--registry",
        default="runs/registry",
        help="registry root: a local directory, s3://bucket/prefix or mlflow+http://host:port (default: ./runs/registry, where make demo "
        "promotes)",
    )


def _figures(metrics: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{label} {metrics[key]:.3g}" for key, label in _FIGURES if isinstance(metrics.get(key), int | float)
    )


def _source(version: Mapping[str, Any]) -> str:
    """The run a version came from: its run id, or the directory of the step that trained it."""
    uri = str(version.get("source_uri", ""))
    parts = uri.rstrip("/").split("/")
    return parts[-3] if len(parts) >= 3 else uri


def describe_model(registry_uri: str, name: str) -> list[str]:
    """A model's lines: its champion, then one line per visible version."""
    versions = registry.list_versions(registry_uri, name)
    champion = registry.current_champion(registry_uri, name)
    current = champion.get("version") if champion else None
    lines = [f"{name}: {len(versions)} version(s), champion: {f'v{current}' if current else 'none yet'}"]
    for version in versions:
        mark = "*" if version["version"] == current else " "
        when = str(version.get("promoted_at", "")).replace("T", " ").split("+")[0]
        lines.append(
            f"  {mark} v{version['version']:<4} {when:<19}  from {_source(version)}  {_figures(version.get('metrics', {}))}"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    """Print the registry; 0, or 2 when it cannot be read or a named model is not in it."""
    try:
        names = args.models or registry.list_models(args.registry)
    except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: RegistryError and MLflow's errors
        print(f"preftune registry list: error: {args.registry}: {err}", file=sys.stderr)
        return 2
    if not names:
        print(f"no models in {args.registry}")
        return 0
    for name in names:
        try:
            print("\n".join(describe_model(args.registry, name)))
        except (OSError, ValueError, RuntimeError) as err:
            print(f"preftune registry list: error: {name}: {err}", file=sys.stderr)
            return 2
    print("(* = champion)")
    return 0
