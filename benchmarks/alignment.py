"""``python -m benchmarks.alignment``: does each method, on its defaults, lift a preference that an outside scorer
measures while the gate still promotes it?

For every task of ``benchmarks.alignment_tasks`` (labels from a scorer this project did not write) and every
method, the real pipeline runs through ``preftune run`` on the task's own base model (``benchmarks.alignment_base``),
with only the settings issue 16 fixes: SFT 3 epochs at lr 3e-3, batch 32, full fine-tuning (``use_lora`` off, for
every stage), 100 held-out prompts in evaluation. Everything else is the pipeline's default. Then the outside
scorer reads the evaluation's own generations: the chosen policy's answers (the one the gate judged) and the SFT
model's, to the same held-out prompts, on subjects no training row mentions.

Reported per run: the scorer's mean for SFT and policy and the lift, KL to SFT (nats per answer), distinct-2
ratio to SFT, the reward model's held-out accuracy (RLHF methods), which point evaluation chose, the gate's
verdict and reasons, and the run's wall time. ``benchmarks/results-alignment.json`` keeps every number;
``--show`` prints its table.

    python -m benchmarks.alignment                      # both tasks, DPO and RLHF (PPO)
    python -m benchmarks.alignment --method grpo --method kto
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.alignment_base import SFT, build_task, write_jsonl
from benchmarks.alignment_tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results-alignment.json"
#: Held-out prompts evaluation generates for (issue 16: the scorer's mean over 100).
EVAL_PROMPTS = 100
#: method -> (pipeline, parameters that pick the method; everything else stays on the pipeline's defaults).
METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "dpo": ("dpo", {}),
    "rlhf": ("rlhf", {"policy_optimizer": "ppo"}),
    "grpo": ("rlhf", {"policy_optimizer": "grpo"}),
    "rloo": ("rlhf", {"policy_optimizer": "rloo"}),
    "kto": ("dpo", {"dpo_method": "kto"}),
    "online_dpo": ("dpo", {"dpo_method": "online_dpo"}),
}
DEFAULT_METHODS = ("dpo", "rlhf")


def task_parameters(built: dict[str, Any], registry: Path, name: str) -> dict[str, str]:
    """The pipeline parameters a task fixes: its data, its base model, issue 16's SFT setting, full weights."""
    files = {name: str(Path(path).resolve()) for name, path in built["files"].items()}
    return {
        "base_model": str(Path(built["base"]).resolve()),
        "sft_data": files["sft"],
        "preference_data": files["pairs"],
        "eval_prompts": files["eval_prompts"],
        "eval_max_prompts": str(EVAL_PROMPTS),
        "sft_epochs": str(SFT["epochs"]),
        "sft_learning_rate": str(SFT["learning_rate"]),
        "sft_batch_size": str(SFT["batch_size"]),
        "use_lora": "false",
        "registry_uri": str(registry),
        "model_name": name,
    }


def run_pipeline(pipeline: str, params: dict[str, str], root: Path, log: Path, *, cache: bool = True) -> Path:
    """One ``preftune run``; returns its run directory (the one new under ``root``)."""
    before = set(root.iterdir()) if root.is_dir() else set()
    cmd = [str(Path(sys.executable).parent / "preftune"), "run", pipeline, "--pipeline-root", str(root)]
    cmd += [] if cache else ["--no-cache"]
    for key, value in params.items():
        cmd += ["--param", f"{key}={value}"]
    with log.open("w", encoding="utf-8") as out:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    new = [p for p in root.iterdir() if p not in before and (p / "summary.json").is_file()]
    if rc != 0 or len(new) != 1:
        raise RuntimeError(f"preftune run {pipeline} failed (rc {rc}); see {log}")
    return new[0]


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _evaluate_dir(run: Path) -> Path:
    """The branch's evaluate step (``evaluate`` or ``evaluate-N`` where the method ran in a dsl.If branch)."""
    found = [p for p in sorted(run.glob("evaluate*")) if (p / "generations").is_file()]
    if len(found) != 1:
        raise RuntimeError(f"{run}: expected one evaluate step with generations, found {found}")
    return found[0]


def score_generations(path: Path, scorer: Callable[[str], float]) -> dict[str, float]:
    """The outside scorer's mean over the policy's and the SFT model's answers to the same held-out prompts."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    policy = [scorer(r["candidate"]) for r in rows]
    sft = [scorer(r["reference"]) for r in rows]
    wins = sum(p > s for p, s in zip(policy, sft, strict=True))
    ties = sum(p == s for p, s in zip(policy, sft, strict=True))
    return {
        "prompts": len(rows),
        "scorer_sft": sum(sft) / len(sft),
        "scorer_policy": sum(policy) / len(policy),
        "scorer_lift": (sum(policy) - sum(sft)) / len(rows),
        "scorer_win_rate": (wins + 0.5 * ties) / len(rows),
    }


def _gate(run: Path) -> dict[str, Any]:
    found = [p / "decision" for p in sorted(run.glob("gate*")) if (p / "decision").is_file()]
    decision = _json(found[0]) if len(found) == 1 else {}
    failed = [c["name"] for c in decision.get("checks", []) if not c.get("passed")]
    return {"promoted": bool(decision.get("promote")), "refused_by": failed}


def measure_run(run: Path, scorer: Callable[[str], float]) -> dict[str, Any]:
    """A finished run's row: outside scorer, KL, diversity, chosen point, gate, reward-model accuracy, time."""
    evaluate = _evaluate_dir(run)
    metrics = _json(evaluate / "metrics")
    summary = _json(run / "summary.json")
    steps = summary.get("steps", {})  # a cached step's metrics are in the summary, not in the run's directory
    reward = steps.get("reward-model", {}).get("metrics") or _json(run / "reward-model" / "metrics")
    return {
        "run": run.name,
        "status": summary.get("status"),
        "seconds": summary.get("duration_seconds"),
        **score_generations(evaluate / "generations", scorer),
        "kl": metrics.get("kl_candidate_reference"),
        "distinct_2_ratio": metrics.get("diversity_ratio_vs_reference"),
        "selected_step": metrics.get("selected_step"),
        "selected_final": bool(metrics.get("selected_final", 1.0)),
        "reward_model_accuracy": reward.get("eval_accuracy"),
        **_gate(run),
    }


def remeasure(row: dict[str, Any], out: Path) -> dict[str, Any]:
    """A results row measured again from its run, still under ``out`` (after a change to what is measured)."""
    run = out / row["task"] / "runs" / row["run"]
    return {"task": row["task"], "method": row["method"], **measure_run(run, TASKS[row["task"]].scorer())}


def prepare(task_name: str, out: Path, seed: int) -> dict[str, Any]:
    """The task's base model and data, plus one pairs file (training and held-out-subject pairs together: the
    pipeline's import holds its own share out)."""
    built = build_task(TASKS[task_name], out, seed=seed)
    files = built["files"]
    if "pairs" not in files:
        rows = []
        for name in ("train_pairs", "eval_pairs"):
            rows += [json.loads(x) for x in Path(files[name]).read_text(encoding="utf-8").splitlines()]
        files["pairs"] = write_jsonl(out / task_name / "data" / "pairs.jsonl", rows)
    return built


def run_task(task_name: str, methods: list[str], out: Path, seed: int) -> list[dict[str, Any]]:
    """Every method on one task, with a registry of this invocation's own (so no earlier champion is in play).

    The first run trains every step afresh (no step of an older code version is reused); the later ones reuse
    its SFT model from the cache. Earlier invocations' runs stay, so their rows can be measured again."""
    built = prepare(task_name, out, seed)
    scorer = TASKS[task_name].scorer()
    root = out / task_name / "runs"
    root.mkdir(parents=True, exist_ok=True)
    registry = root / "registry" / time.strftime("%Y%m%d-%H%M%S")
    rows = []
    for i, method in enumerate(methods):
        pipeline, picks = METHODS[method]
        params = {**task_parameters(built, registry, f"{task_name}-{method}"), **picks}
        began = time.perf_counter()
        print(f"[{task_name}] {method}: preftune run {pipeline} ...", flush=True)
        run = run_pipeline(pipeline, params, root, out / task_name / f"{method}.log", cache=i > 0)
        row = {"task": task_name, "method": method, **measure_run(run, scorer)}
        rows.append(row)
        print(f"[{task_name}] {method}: {time.perf_counter() - began:.0f} s  {format_row(row)}", flush=True)
    return rows


def format_row(row: dict[str, Any]) -> str:
    """One markdown table row."""
    verdict = "promoted" if row["promoted"] else "refused: " + ", ".join(row["refused_by"])
    acc = row.get("reward_model_accuracy")
    return (
        f"| {row['task']} | {row['method']} | {row['scorer_sft']:+.3f} | {row['scorer_policy']:+.3f} "
        f"| {row['scorer_lift']:+.3f} | {row['scorer_win_rate']:.2f} | {row['kl']:.2f} "
        f"| {row['distinct_2_ratio']:.2f}x | {'—' if acc is None else f'{acc:.3f}'} "
        f"| {'final' if row['selected_final'] else 'step ' + str(int(row['selected_step']))} | {verdict} "
        f"| {row['seconds']:.0f} |"
    )


HEADER = (
    "| task | method | scorer, SFT | scorer, policy | lift | policy beats SFT | KL to SFT | distinct-2 vs SFT "
    "| RM held-out acc | chosen point | gate | run s |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"
)


def table(rows: list[dict[str, Any]]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task", choices=sorted(TASKS), action="append", help="task (repeatable; default all)"
    )
    parser.add_argument(
        "--method", choices=sorted(METHODS), action="append", help="method (repeatable; default dpo, rlhf)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / ".bench-cache" / "alignment", help="work directory"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the task data and base model")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON results go")
    parser.add_argument("--show", action="store_true", help="print the committed results' table and stop")
    parser.add_argument(
        "--remeasure", action="store_true", help="measure the results' runs again (kept under --out) and stop"
    )
    args = parser.parse_args(argv)
    if args.show or args.remeasure:
        result = _json(args.results)
        if args.remeasure:
            result["rows"] = [remeasure(row, args.out) for row in result["rows"]]
            args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(table(result["rows"]))
        return
    began = time.perf_counter()
    rows = []
    for task_name in args.task or sorted(TASKS):
        rows += run_task(task_name, args.method or list(DEFAULT_METHODS), args.out, args.seed)
    seconds = time.perf_counter() - began
    result = merge(_json(args.results), rows, seconds, args.seed)
    args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result["rows"]))
    print(f"{len(rows)} runs in {seconds / 60:.1f} min; results in {args.results}")


def merge(earlier: dict[str, Any], rows: list[dict[str, Any]], seconds: float, seed: int) -> dict[str, Any]:
    """The results file with these rows in place of the same (task, method) ones of an earlier run of the same
    settings; rows of other methods are kept, so methods can be benchmarked one invocation at a time."""
    settings = {"sft": SFT, "use_lora": False, "eval_prompts": EVAL_PROMPTS, "seed": seed}
    new = {(r["task"], r["method"]) for r in rows}
    kept = [r for r in earlier.get("rows", []) if (r["task"], r["method"]) not in new]
    if earlier.get("settings") != settings:
        kept = []
    order = {m: i for i, m in enumerate(METHODS)}
    merged = sorted(kept + rows, key=lambda r: (r["task"], order[r["method"]]))
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": seconds + (earlier.get("seconds", 0.0) if kept else 0.0),
        "settings": settings,
        "scorers": {name: task.scorer_name for name, task in TASKS.items()},
        "rows": merged,
    }


if __name__ == "__main__":
    main()
