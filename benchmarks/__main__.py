"""``python -m benchmarks [--quick]``: preftune vs TRL, alternating fresh subprocesses, medians, table + JSON + PNG.

Each measurement runs in its own subprocess (``benchmarks.worker``) so peak RSS is that run's alone; ours and
TRL's alternate so background load hits both alike. The correctness gate runs first: when our losses do not
match TRL's within 1e-5 (fp32, identical model batches) no speed-up is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (task, kwargs, goal ratio for tokens/s, goal for memory ratio or None, FLOPs multiplier of N per token)
FULL = {
    "dpo-lora": ("dpo", {"pairs": 512, "use_lora": True}, 1.5, 0.8),
    "dpo-full": ("dpo", {"pairs": 512, "use_lora": False}, 1.5, 0.8),
    "reward-lora": ("reward", {"pairs": 512, "use_lora": True}, 1.3, None),
    "sft-lora": ("sft", {"examples": 512, "use_lora": True}, 1.2, None),
    "dpo-full-20m": ("dpo", {"pairs": 128, "use_lora": False, "model": "20m"}, 1.5, 0.8),
}
QUICK = {
    "dpo-lora": ("dpo", {"pairs": 96, "use_lora": True}, 1.5, 0.8),
    "dpo-full": ("dpo", {"pairs": 96, "use_lora": False}, 1.5, 0.8),
    "reward-lora": ("reward", {"pairs": 96, "use_lora": True}, 1.3, None),
    "sft-lora": ("sft", {"examples": 96, "use_lora": True}, 1.2, None),
}
#: DPO lever ablations (ours only), on the tiny model with LoRA.
ABLATIONS = {
    "all levers (default)": {},
    "no prefix sharing": {"prefix_sharing": False},
    "no packing": {"pack_length": 0},
    "no fused head": {"fused_head": False},
    "all off (2B padded rows)": {"prefix_sharing": False, "pack_length": 0, "fused_head": False},
}


def worker(spec: dict[str, Any], timeout: int = 900) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("PREFTUNE_BENCH_THREADS", "1"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {spec} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def flops(task: str, r: dict[str, Any], ceiling: dict[str, Any]) -> float:
    """Model FLOPs of one run (no attention-score term): DPO 6·N (policy fwd+bwd) + 2·N (reference fwd) per
    useful token for the body, the LM head only on scored tokens; reward and SFT 6·N per useful token."""
    body = ceiling["matmul_params"] - ceiling["head_params"]
    head = ceiling["head_params"]
    if task == "dpo":
        return 8.0 * body * r["useful_tokens"] + 8.0 * head * r["scored_tokens"]
    if task == "reward":
        return 6.0 * body * r["useful_tokens"]
    return 6.0 * (body + head) * r["useful_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, for a check in under 5 minutes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--no-ablations", action="store_true")
    args = parser.parse_args()
    scenarios = QUICK if args.quick else FULL
    if args.only:
        scenarios = {k: v for k, v in scenarios.items() if k in args.only.split(",")}
    started = time.time()

    print("correctness gate (fp32, identical model batches) ...", flush=True)
    gate = {k: v for k, v in worker({"task": "correctness", "impl": "both"}).items() if isinstance(v, dict)}
    for name, g in gate.items():
        print(
            f"  {name}: max |ours - TRL| = {g.get('max_abs_diff', float('nan')):.2e} -> "
            f"{'OK' if g.get('ok') else 'FAIL ' + str(g.get('error', ''))}"
        )

    models = sorted({kwargs.get("model", "tiny") for _, kwargs, _, _ in scenarios.values()})
    ceilings = {m: worker({"task": "ceiling", "impl": "", "model": m}) for m in models}
    for m, c in ceilings.items():
        print(f"  matmul ceiling ({m} shapes, 1024 tokens): {c['ceiling_flops'] / 1e9:.1f} GFLOP/s")

    rows = []
    for name, (task, kwargs, goal, mem_goal) in scenarios.items():
        runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
        for i in range(args.repeats):
            for impl in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):
                runs[impl].append(worker({"task": task, "impl": impl, **kwargs}))
            print(
                f"  {name}: run {i + 1}/{args.repeats} ours {runs['ours'][-1]['seconds']:.2f}s "
                f"trl {runs['trl'][-1]['seconds']:.2f}s",
                flush=True,
            )
        row = summarise(name, task, kwargs, goal, mem_goal, runs, ceilings[kwargs.get("model", "tiny")], gate)
        rows.append(row)

    ablations = []
    if not (args.no_ablations or args.quick):
        n = 96 if args.quick else 512
        for label, levers in ABLATIONS.items():
            results = [
                worker({"task": "dpo", "impl": "ours", "pairs": n, "use_lora": True, "levers": levers})
                for _ in range(3 if args.quick else args.repeats)
            ]
            tps = statistics.median(r["useful_tokens"] / r["seconds"] for r in results)
            rss = statistics.median(r["peak_rss_mb"] for r in results)
            ablations.append({"levers": label, "config": levers, "tokens_per_s": tps, "peak_rss_mb": rss})
            print(f"  ablation {label}: {tps:.0f} tok/s, {rss:.0f} MiB", flush=True)

    out = {
        "quick": args.quick,
        "repeats": args.repeats,
        "threads": int(os.environ.get("PREFTUNE_BENCH_THREADS", "1")),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "gate": gate,
        "ceilings": ceilings,
        "rows": rows,
        "dpo_ablations": ablations,
        "seconds": time.time() - started,
    }
    (HERE / "results.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    print_table(rows, ablations)
    plot(rows, HERE / "results.png")
    print(f"wrote {HERE / 'results.json'} and {HERE / 'results.png'} in {out['seconds']:.0f}s")


def summarise(name, task, kwargs, goal, mem_goal, runs, ceiling, gate) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": name, "task": task, "settings": kwargs}
    for impl, results in runs.items():
        tps = [r["useful_tokens"] / r["seconds"] for r in results]
        units = results[0].get("pairs") or results[0].get("examples")
        row[impl] = {
            "tokens_per_s": statistics.median(tps),
            "items_per_s": statistics.median(units / r["seconds"] for r in results),
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "mfu": statistics.median(
                flops(task, r, ceiling) / r["seconds"] / ceiling["ceiling_flops"] for r in results
            ),
            "all_tokens_per_s": tps,
        }
    gate_key = "dpo" if task == "dpo" else "reward" if task == "reward" else None
    row["correct"] = gate[gate_key]["ok"] if gate_key else None
    if row["correct"] is False:
        row["speedup"] = None  # refuse: the losses do not match TRL's
    else:
        row["speedup"] = row["ours"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
    row["memory_ratio"] = row["ours"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
    row["goal_speedup"], row["goal_memory_ratio"] = goal, mem_goal
    row["met"] = (
        row["speedup"] is not None
        and row["speedup"] >= goal
        and (mem_goal is None or row["memory_ratio"] <= mem_goal)
    )
    return row


def print_table(rows, ablations) -> None:
    head = (
        f"{'scenario':<14}{'ours tok/s':>11}{'TRL tok/s':>11}{'speed-up':>10}{'ours items/s':>13}"
        f"{'ours RSS':>10}{'TRL RSS':>9}{'mem':>6}{'MFU ours':>9}{'MFU TRL':>9}  goal"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        speed = "REFUSED" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        goal = f">={r['goal_speedup']}x" + (
            f", mem<={r['goal_memory_ratio']}" if r["goal_memory_ratio"] else ""
        )
        print(
            f"{r['scenario']:<14}{r['ours']['tokens_per_s']:>11.0f}{r['trl']['tokens_per_s']:>11.0f}{speed:>10}"
            f"{r['ours']['items_per_s']:>13.1f}{r['ours']['peak_rss_mb']:>10.0f}{r['trl']['peak_rss_mb']:>9.0f}"
            f"{r['memory_ratio']:>6.2f}{r['ours']['mfu']:>9.1%}{r['trl']['mfu']:>9.1%}  {goal} "
            f"{'MET' if r['met'] else 'MISSED'}"
        )
    if ablations:
        print("\nDPO levers (ours, tiny model, LoRA):")
        for a in ablations:
            print(f"  {a['levers']:<28}{a['tokens_per_s']:>9.0f} tok/s {a['peak_rss_mb']:>7.0f} MiB")


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["scenario"] for r in rows]
    x = range(len(rows))
    axes[0].bar([i - 0.2 for i in x], [r["ours"]["tokens_per_s"] for r in rows], 0.4, label="preftune")
    axes[0].bar([i + 0.2 for i in x], [r["trl"]["tokens_per_s"] for r in rows], 0.4, label="TRL 1.16")
    axes[0].set_yscale("log")
    axes[0].set_title("Useful tokens / s (median)")
    axes[1].bar([i - 0.2 for i in x], [r["ours"]["peak_rss_mb"] for r in rows], 0.4, label="preftune")
    axes[1].bar([i + 0.2 for i in x], [r["trl"]["peak_rss_mb"] for r in rows], 0.4, label="TRL 1.16")
    axes[1].set_title("Peak RSS (MiB, median)")
    for ax in axes:
        ax.set_xticks(list(x), names, rotation=20)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
