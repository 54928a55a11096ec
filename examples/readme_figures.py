"""Rewrite the README's figures from real runs, so that they cannot go stale.

After ``make demo`` (and, for the comparison, ``preftune run compare``), run from the repository root::

    .venv/bin/python examples/readme_figures.py            # rewrite README.md in place
    .venv/bin/python examples/readme_figures.py --check    # exit 1 when README.md differs from the runs

It reads the newest successful ``preftune-dpo``, ``preftune-rlhf`` and ``preftune-compare`` runs under
``--runs`` (their ``summary.json``) and replaces what stands between each pair of markers in the README::

    <!-- figures:demo -->        ...  <!-- /figures:demo -->         the demo table (DPO and RLHF runs)
    <!-- figures:compare -->     ...  <!-- /figures:compare -->      the which-method table (compare run)
    <!-- figures:verdict -->     ...  <!-- /figures:verdict -->      the compare run's printed verdict

A block whose runs are missing is left as it is, and said so.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.eval.methods import METHODS, long_label

ROOT = Path(__file__).resolve().parents[1]
Summary = Mapping[str, Any]


def latest_runs(runs: Path) -> dict[str, Summary]:
    """The newest successful run of each pipeline under ``runs``, by pipeline name."""
    from preftune.orchestration.run_dirs import runs_under

    found: dict[str, Summary] = {}
    for run in runs_under(runs):  # oldest first: later ones replace earlier ones
        if run.summary.get("status") == "SUCCEEDED":
            found[run.pipeline] = run.summary
    return found


def _m(summary: Summary, step: str) -> Mapping[str, Any]:
    return summary["steps"][step]["metrics"]


def _p(summary: Summary, name: str) -> Any:
    return summary["parameters"][name]


def _seconds(value: float) -> str:
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _gate(summary: Summary) -> str:
    """PROMOTE / DO NOT PROMOTE with the gate's reasons, and where the version went."""
    import json

    decision = json.loads(summary["steps"]["gate"]["outputs"]["decision"])
    verdict = "PROMOTE" if decision["promote"] else "DO NOT PROMOTE"
    text = f"{verdict} ({'; '.join(decision.get('reasons', []))})"
    promote = summary["steps"].get("promote", {})
    if promote.get("status") == "SUCCEEDED":
        registry = str(_p(summary, "registry_uri"))
        if Path(registry).is_relative_to(ROOT):
            registry = str(Path(registry).relative_to(ROOT))
        text += f" -> `{registry}`, version {promote['metrics']['version']:.0f}"
    return text


def _data_rows(dpo: Summary) -> list[list[str]]:
    ingest, pairs = _m(dpo, "ingest"), _m(dpo, "preference-import")
    data = (
        f"{ingest['rows_input']:.0f} SFT rows -> {ingest['rows_train']:.0f} train + {ingest['rows_eval']:.0f} eval, "
        f"{ingest['rows_rejected']:.0f} rejected; {pairs['rows_input']:.0f} pairs -> {pairs['pairs_train']:.0f} "
        f"train + {pairs['pairs_eval']:.0f} eval, {pairs['rows_rejected']:.0f} rejected"
    )
    sft = _m(dpo, "sft")
    lora = f"LoRA r={_p(dpo, 'lora_r')}" if _p(dpo, "use_lora") else "full weights"
    return [
        ["both", "ingest / preference import", data],
        [
            "both",
            f"SFT ({lora}, {_p(dpo, 'sft_epochs')} epochs)",
            f"eval loss {sft['eval_loss']:.3f}, perplexity {sft['eval_perplexity']:.2f}",
        ],
    ]


def _evaluate_text(evaluation: Mapping[str, Any]) -> str:
    parts = []
    if "win_rate_vs_reference" in evaluation:
        parts.append(
            f"win rate vs SFT {evaluation['win_rate_vs_reference']:.2f} (length-controlled "
            f"{evaluation['lc_win_rate_vs_reference']:.2f}), mean judge reward "
            f"{evaluation['judge_reward_candidate']:.2f} vs {evaluation['judge_reward_reference']:.2f} for SFT "
            "(same prompts and sampling)"
        )
    parts.append(f"KL(policy ‖ SFT) {evaluation['kl_candidate_reference']:.2f} nats per response")
    parts.append(
        f"distinct-2 {evaluation['distinct_2_candidate']:.2f} vs {evaluation['distinct_2_reference']:.2f} for SFT"
    )
    parts.append(f"{evaluation['frontier_points']:.0f} points on the reward-vs-KL chart")
    return ", ".join(parts)


def _dpo_rows(dpo: Summary) -> list[list[str]]:
    train = _m(dpo, "dpo")
    return [
        [
            f"DPO ({_seconds(dpo['duration_seconds'])} in all)",
            f"DPO ({_p(dpo, 'dpo_loss')}, beta {_p(dpo, 'dpo_beta')}, lr {_p(dpo, 'dpo_learning_rate'):g})",
            f"first-step loss {train['first_step_loss']:.4f} (ln 2 = 0.6931), held-out implicit-reward accuracy "
            f"{train['eval_reward_accuracy']:.3f}",
        ],
        ["", "evaluate", _evaluate_text(_m(dpo, "evaluate"))],
        ["", "gate -> promote", _gate(dpo)],
    ]


def _rlhf_rows(rlhf: Summary) -> list[list[str]]:
    reward, ppo = _m(rlhf, "reward-model"), _m(rlhf, "ppo")
    iterations = int(ppo.get("iterations", _p(rlhf, "ppo_iterations")))
    k = max(1, math.ceil(iterations * 0.2))  # preftune.train.ppo.report.head_tail: the first and last 20%
    shared = "; its SFT step came from the DPO run's cache" if rlhf["steps"]["sft"].get("cached") else ""
    return [
        [
            f"RLHF ({_seconds(rlhf['duration_seconds'])} in all{shared})",
            f"reward model ({_p(rlhf, 'reward_objective')})",
            f"held-out pair accuracy {reward['first_eval_accuracy']:.3f} before training, "
            f"{reward['eval_accuracy']:.3f} after",
        ],
        [
            "",
            f"PPO ({iterations} iterations)",
            f"mean reward {ppo['reward_first']:.2f} over the first {k} iterations -> {ppo['reward_last']:.2f} over "
            f"the last {k}, KL max {ppo['kl_max']:.2f} nats (bound {_p(rlhf, 'ppo_max_kl'):g}), "
            f"{ppo['early_stops']:.0f} early stop{'' if ppo['early_stops'] == 1 else 's'} of an epoch at the "
            "approx-KL limit",
        ],
        ["", "evaluate (reward model as judge)", _evaluate_text(_m(rlhf, "evaluate"))],
        ["", "gate -> promote", _gate(rlhf)],
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one character per column, ``r`` for right-aligned."""
    marks = ["---:" if (align[i : i + 1] == "r") else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def demo_block(runs: Mapping[str, Summary]) -> str:
    """The demo table: the DPO and RLHF runs of ``make demo``."""
    dpo, rlhf = runs["preftune-dpo"], runs["preftune-rlhf"]
    total = dpo["duration_seconds"] + rlhf["duration_seconds"]
    cpus = dpo.get("machine", {}).get("cpus", "?")
    intro = (
        f"`make demo` on the bundled 1.2M-parameter model and data ({cpus} CPU cores, defaults, one run each; "
        f"{_seconds(total)} in all, set-up already done):"
    )
    rows = _data_rows(dpo) + _dpo_rows(dpo) + _rlhf_rows(rlhf)
    return intro + "\n\n" + table(["pipeline", "step", "result"], rows)


def compare_block(runs: Mapping[str, Summary]) -> str:
    """The which-method table: the compare run's figures, one column per method it compared."""
    compare = runs["preftune-compare"]
    m = _m(compare, "compare")
    methods = [x for x in METHODS if f"{x}_judge_reward" in m]
    sft = compare["steps"]["sft"]
    sft_note = "cached" if sft.get("cached") else f"{sft.get('seconds') or 0:.0f} s"

    def each(label: str, key: str, fmt: Callable[[float], str]) -> list[str]:
        return [label, *(fmt(m[f"{x}_{key}"]) for x in methods)]

    rows = [
        each(f"wall time after the shared SFT step ({sft_note})", "wall_seconds", lambda v: f"{v:.0f} s"),
        each("tokens processed in training", "train_tokens", lambda v: f"{v:,.0f}"),
        each("peak memory", "peak_memory_mb", lambda v: f"{v:.0f} MiB"),
        each("mean judge reward", "judge_reward", lambda v: f"{v:.2f}"),
        [
            "win rate vs SFT (length-controlled)",
            *(f"{m[f'{x}_win_rate_vs_sft']:.2f} ({m[f'{x}_lc_win_rate_vs_sft']:.2f})" for x in methods),
        ],
        each(
            f"head to head vs the others, length-controlled ({m['head_to_head_prompts']:.0f} prompts)",
            "head_to_head",
            lambda v: f"{v:.2f}",
        ),
        each("KL to SFT, nats per response", "kl_to_sft", lambda v: f"{v:.2f}"),
        each("distinct-2", "distinct_2", lambda v: f"{v:.2f}"),
        each("mean answer length, tokens", "mean_length", lambda v: f"{v:.1f}"),
    ]
    intro = (
        f"On the bundled data, defaults, `methods={compare['parameters'].get('methods', 'dpo,rlhf')}` "
        f"({_seconds(compare['duration_seconds'])} in all):"
    )
    header = ["figure", *(long_label(x) for x in methods)]
    return intro + "\n\n" + table(header, rows, "l" + "r" * len(methods))


def verdict_block(runs: Mapping[str, Summary]) -> str:
    """The verdict the compare run printed, quoted."""
    sentences = runs["preftune-compare"]["steps"]["compare"]["outputs"]["Output"].strip()
    return "The verdict it printed: *" + " ".join(sentences.splitlines()) + "*"


BLOCKS: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Summary]], str]]] = {
    "demo": (("preftune-dpo", "preftune-rlhf"), demo_block),
    "compare": (("preftune-compare",), compare_block),
    "verdict": (("preftune-compare",), verdict_block),
}


def rewrite(text: str, runs: Mapping[str, Summary]) -> tuple[str, list[str]]:
    """``text`` with every block whose runs exist regenerated; and a note per block left alone."""
    notes = []
    for name, (needs, render) in BLOCKS.items():
        pattern = re.compile(rf"(<!-- figures:{name} -->\n)(.*?)(\n<!-- /figures:{name} -->)", re.DOTALL)
        if not pattern.search(text):
            notes.append(f"{name}: no <!-- figures:{name} --> markers in the README")
            continue
        missing = [n for n in needs if n not in runs]
        if missing:
            notes.append(f"{name}: left as it is (no successful {', '.join(missing)} run)")
            continue
        body = render(runs)
        text = pattern.sub(lambda match, body=body: match.group(1) + body + match.group(3), text)
    return text, notes


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or check) the README; 0 when it matches the runs, 1 when --check finds it stale."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", default=str(ROOT / "runs"), help="pipeline root of the runs (default: ./runs)"
    )
    parser.add_argument("--readme", default=str(ROOT / "README.md"), help="the file to rewrite")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when the README differs")
    args = parser.parse_args(argv)
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    new, notes = rewrite(text, latest_runs(Path(args.runs)))
    for note in notes:
        print(note, file=sys.stderr)
    if args.check:
        print("README figures are up to date" if new == text else f"{readme}: figures differ from the runs")
        return 0 if new == text else 1
    if new != text:
        readme.write_text(new, encoding="utf-8")
    print(f"{readme}: figures {'rewritten' if new != text else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
