"""``preftune import-preferences SOURCE``: the preference import outside a pipeline, for trying data out.

Writes ``train.jsonl``, ``eval.jsonl``, ``rejected.jsonl``, ``report.html``, ``expectation_suite.json`` and
``metrics.json`` into ``--out`` (never read as input, even inside SOURCE) and prints the row accounting and the
count per rejection reason. Exit codes: 0 done (rows may have been rejected); 1 more rows rejected than
``--max-rejected-fraction`` allows (outputs written); 2 the input or the parameters were refused (a message
naming the file and line, no traceback); 3 an internal error (a bug: the message and its trace).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from preftune.data import formats, pairing, preferences


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's arguments; the same names and defaults as the preference-import component's parameters."""
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="jsonl / json / csv / tsv / parquet file, directory or s3:// prefix, a datasets save_to_disk "
        "directory, or hf://<dataset id>[@revision][?config=NAME&split=NAME]",
    )
    parser.add_argument(
        "--format",
        default="auto",
        choices=("auto", *formats.FORMATS),
        help="feedback format (default: auto, recognised per file from its columns)",
    )
    parser.add_argument("--out", default="preferences", help="output directory (default: ./preferences)")
    parser.add_argument(
        "--ranked-pairs",
        default="all",
        choices=pairing.RANKED_MODES,
        help="ranked lists: pair every better response with every worse one, or adjacent rank levels only",
    )
    parser.add_argument(
        "--min-score-gap",
        type=float,
        default=preferences.DEFAULT_MIN_SCORE_GAP,
        help="ratings: smallest normalised (z-score) difference that makes a pair (default: %(default)s)",
    )
    parser.add_argument(
        "--max-pairs-per-prompt",
        type=int,
        default=preferences.DEFAULT_MAX_PAIRS_PER_PROMPT,
        help="ranked lists, ratings and binary feedback: most pairs per prompt, 0 = no cap (default: %(default)s)",
    )
    parser.add_argument("--since", default="", help="only date=YYYY-MM-DD partitions on or after this day")
    parser.add_argument(
        "--max-rejected-fraction",
        type=float,
        default=preferences.DEFAULT_MAX_REJECTED_FRACTION,
        help="fail (exit 1) when a larger share of rows is rejected (default: %(default)s)",
    )
    parser.add_argument(
        "--truncation-chars",
        type=int,
        default=preferences.DEFAULT_TRUNCATION_CHARS,
        help="report the share of pairs longer than this many characters, 0 = off (default: %(default)s)",
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="share of prompts held out (default: 0.1)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the split and of pair capping (default: 0)"
    )
    parser.add_argument("--min-chars", type=int, default=1, help="shortest accepted text (default: 1)")
    parser.add_argument("--max-chars", type=int, default=8000, help="longest accepted text (default: 8000)")
    parser.add_argument(
        "--expectation-suite",
        default="",
        metavar="URI",
        help="expectation suites to validate with (an edited expectation_suite.json); default: the built-in ones",
    )


def _import(args: argparse.Namespace, out: Path, paths: dict[str, Path]) -> dict[str, float]:
    return preferences.import_preferences(
        args.source,
        str(paths["train"]),
        str(paths["eval"]),
        str(paths["rejected"]),
        str(out / "report.html"),
        format=args.format,
        ranked_pairs=args.ranked_pairs,
        min_score_gap=args.min_score_gap,
        max_pairs_per_prompt=args.max_pairs_per_prompt,
        since=args.since,
        max_rejected_fraction=args.max_rejected_fraction,
        truncation_chars=args.truncation_chars,
        eval_fraction=args.eval_fraction,
        seed=args.seed,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        expectation_suite_uri=args.expectation_suite,
        suite_path=str(out / "expectation_suite.json"),
        exclude=[str(out / "metrics.json"), str(out)],
    )


def run(args: argparse.Namespace) -> int:
    """Run the import; print the accounting and per-reason counts. Returns the exit code."""
    out = Path(args.out)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "eval", "rejected")}
    status = 0
    metrics: dict[str, float]
    try:
        metrics = _import(args, out, paths)
    except preferences.RejectedFractionError as err:
        print(f"preftune import-preferences: error: {err}", file=sys.stderr)
        metrics, status = err.metrics, 1
    except (ValueError, OSError) as err:  # DataFormatError is a ValueError; FileNotFoundError an OSError
        print(f"preftune import-preferences: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: say so, with its trace, and never exit 1 (too many rejected)
        logging.getLogger(__name__).exception("internal error")
        print(
            f"preftune import-preferences: internal error (a bug, please report it): {err!r}", file=sys.stderr
        )
        return 3
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(
        f"rows: {metrics['rows_input']:g} in, {metrics['rows_used']:g} used, {metrics['rows_rejected']:g} rejected; "
        f"pairs: {metrics['pairs_train']:g} train, {metrics['pairs_eval']:g} eval"
    )
    _print_rejections(paths["rejected"])
    written = [*paths.values(), out / "report.html", out / "expectation_suite.json", out / "metrics.json"]
    print("wrote " + ", ".join(str(p) for p in written))
    return status


def _print_rejections(path: Path) -> None:
    """Rejected rows per reason, most common first (from the rejected-rows file, so it works after a failure)."""
    if not path.is_file():
        return
    counts: dict[str, int] = {}
    with path.open(encoding="utf-8") as rows:
        for line in rows:
            for reason in json.loads(line)["reasons"]:
                counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        print("rejected: none")
        return
    print("rejected rows by reason:")
    for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {reason:<24} {count}")
