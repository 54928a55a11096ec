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
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import data_import

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> (task, kwargs, goal ratio for tokens/s or None, goal for memory ratio or None)
FULL = {
    "dpo-lora": ("dpo", {"pairs": 512, "use_lora": True}, 1.5, 0.8),
    "dpo-full": ("dpo", {"pairs": 512, "use_lora": False}, 1.5, 0.8),
    "reward-lora": ("reward", {"pairs": 512, "use_lora": True}, 1.3, None),
    "sft-lora": ("sft", {"examples": 512, "use_lora": True}, 1.2, None),
    "dpo-full-20m": ("dpo", {"pairs": 128, "use_lora": False, "model": "20m"}, 1.5, 0.8),
    # both sides with activation checkpointing (TRL's own default), the memory-saving setting
    "dpo-full-20m-ckpt": (
        "dpo",
        {"pairs": 128, "use_lora": False, "model": "20m", "levers": {"gradient_checkpointing": True}},
        1.5,
        0.8,
    ),
    "ppo-lora": ("ppo", {"iterations": 8, "use_lora": True}, None, None),
    # issue 19: GRPO, RLOO and KTO against TRL's trainers; sampled (GRPO, RLOO) or trained (KTO) tokens/s
    "grpo-lora": ("grpo", {"estimator": "grpo", "iterations": 8, "use_lora": True}, 1.5, 1.0),
    "rloo-lora": ("grpo", {"estimator": "rloo", "iterations": 8, "use_lora": True}, 1.5, 1.0),
    "kto-lora": ("kto", {"pairs": 256, "use_lora": True}, 1.5, 1.0),
    "kto-full": ("kto", {"pairs": 256, "use_lora": False}, 1.5, 1.0),
    **{
        f"{name}-125m-t{threads}": (task, {**kwargs, "model": "125m", "threads": threads}, goal, mem_goal)
        for threads in (1, 2)
        for name, (task, kwargs, goal, mem_goal) in {
            # issue 22: a Llama of ~125M parameters (hidden 768, 12 layers, 32k vocabulary), full fine-tuning
            "sft-full": ("sft", {"examples": 64, "use_lora": False}, 1.5, 0.7),
            "reward-full": ("reward", {"pairs": 64, "use_lora": False}, 1.5, 0.7),
            "dpo-full": ("dpo", {"pairs": 64, "use_lora": False}, 2.0, 0.7),
            "ppo": ("ppo", {"iterations": 2, "use_lora": True}, None, None),
            # issue 22 with issue 19's goal; LoRA, as PPO's row: 2 iterations of 4 prompts x 4 answers
            "grpo-lora": ("grpo", {"iterations": 2, "prompts": 4, "use_lora": True}, 1.5, 1.0),
        }.items()
    },
}
#: Measurements per side of the slow 125M rows (the others: --repeats).
REPEATS = {name: 3 for name in FULL if "-125m-" in name}
QUICK = {
    "dpo-lora": ("dpo", {"pairs": 96, "use_lora": True}, 1.5, 0.8),
    "dpo-full": ("dpo", {"pairs": 96, "use_lora": False}, 1.5, 0.8),
    "reward-lora": ("reward", {"pairs": 96, "use_lora": True}, 1.3, None),
    "sft-lora": ("sft", {"examples": 96, "use_lora": True}, 1.2, None),
    "ppo-lora": ("ppo", {"iterations": 2, "use_lora": True}, None, None),
    "grpo-lora": ("grpo", {"estimator": "grpo", "iterations": 2, "use_lora": True}, 1.5, 1.0),
    "rloo-lora": ("grpo", {"estimator": "rloo", "iterations": 2, "use_lora": True}, 1.5, 1.0),
    "kto-lora": ("kto", {"pairs": 48, "use_lora": True}, 1.5, 1.0),
    "kto-full": ("kto", {"pairs": 48, "use_lora": False}, 1.5, 1.0),
}
#: PPO goals (issue 7): generation's share of an iteration, and our rollout against a bare generate.
#: Issue 22 raised the rollout goal to 0.95x.
PPO_GENERATION_SHARE_GOAL, PPO_ROLLOUT_RATIO_GOAL = 0.7, 0.95
#: Issue 22: an iteration's time outside generation at most this many times its FLOPs at the matmul ceiling.
PPO_UPDATE_BOUND_GOAL = 1.5
#: MFU goals by scenario: DPO full fine-tuning of the ~20M model (issue 7) and of the ~125M one (issue 22).
MFU_GOALS = {"dpo-full-20m": 0.5, "dpo-full-125m-t1": 0.6, "dpo-full-125m-t2": 0.6}
#: DPO lever ablations (ours only), on the tiny model with LoRA.
ABLATIONS = {
    "all levers (default)": {},
    "no prefix sharing": {"prefix_sharing": False},
    "no packing": {"pack_length": 0},
    "no fused head": {"fused_head": False},
    "all off (2B padded rows)": {"prefix_sharing": False, "pack_length": 0, "fused_head": False},
}


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("PREFTUNE_BENCH_THREADS", "1"),
    }


def side(spec: dict[str, Any]) -> str:
    """Whose libraries a measurement runs on: TRL's runs and the gate (which runs both) on TRL's side."""
    return "trl" if spec["impl"] in ("trl", "both") else "ours"


class ForkServer:
    """One side's ``benchmarks.forkserver`` parent: imports once, forks a fresh child per measurement."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.forkserver", name],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )

    def _line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.log.seek(0)
            raise RuntimeError(f"{self.name} fork server stopped or hung:\n{self.log.read()[-3000:]}")
        return line.rstrip("\n")

    def run(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        if not hasattr(self, "ready"):
            while self._line(timeout) != "READY":
                pass
            self.ready = True
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        kind, _, payload = self._line(timeout).partition(" ")
        if kind != "RESULT":
            failure = json.loads(payload)
            raise RuntimeError(f"worker {spec} failed (rc {failure['status']}):\n{failure['log']}")
        return json.loads(payload)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


#: Fork servers by side, when ``--fork`` is on (started on first use).
SERVERS: dict[str, ForkServer] = {}
FORK = False


def worker(spec: dict[str, Any], timeout: int = 900) -> dict[str, Any]:
    """One measurement in a fresh process: forked from that side's fork server (``--fork``), or started as
    ``python -m benchmarks.worker`` (imports paid in every process)."""
    if FORK:
        name = side(spec)
        if name not in SERVERS:
            SERVERS[name] = ForkServer(name)
        return SERVERS[name].run(spec, timeout)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker {spec} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def selected(name: str, wanted: list[str]) -> bool:
    """Whether scenario ``name`` is asked for: by its name, or by a dash-separated part of it (``125m``)."""
    return name in wanted or any(part in wanted for part in name.split("-"))


def ceiling_key(kwargs: dict[str, Any]) -> str:
    """Which matmul ceiling a scenario's MFU is against: its model's shapes at its thread count."""
    threads = kwargs.get("threads", int(os.environ.get("PREFTUNE_BENCH_THREADS", "1")))
    return f"{kwargs.get('model', 'tiny')}@{threads}"


def rollout_vs_generate(model: str, processes: int, threads: int | None = None) -> dict[str, Any]:
    """Our rollout's sampled tokens/s against a bare ``generate`` on the same batch: ``processes`` fresh workers,
    each alternating the two 7 times; the median over all pairs."""
    spec = {"task": "ppo", "impl": "rollout", "model": model, "repeats": 7}
    results = [worker({**spec, **({"threads": threads} if threads else {})}) for _ in range(processes)]
    ratios = [r for res in results for r in res["ratios"]]
    out = {
        "ratio": statistics.median(ratios),
        "ours_tokens_per_s": statistics.median(r["ours_tokens_per_s"] for r in results),
        "bare_tokens_per_s": statistics.median(r["bare_tokens_per_s"] for r in results),
        "same_tokens": all(r["same_tokens"] for r in results),
        "ratios": ratios,
    }
    print(
        f"  ppo rollout vs bare generate: {out['ratio']:.2f}x ({out['ours_tokens_per_s']:.0f} vs "
        f"{out['bare_tokens_per_s']:.0f} tok/s, same samples: {out['same_tokens']})",
        flush=True,
    )
    return out


def flops(task: str, r: dict[str, Any], ceiling: dict[str, Any]) -> float | None:
    """Model FLOPs of one run (no attention-score term): DPO 6·N (policy fwd+bwd) + 2·N (reference fwd) per
    useful token for the body, the LM head only on scored tokens; reward and SFT 6·N per useful token."""
    body = ceiling["matmul_params"] - ceiling["head_params"]
    head = ceiling["head_params"]
    if task == "dpo":
        return 8.0 * body * r["useful_tokens"] + 8.0 * head * r["scored_tokens"]
    if task == "reward":
        return 6.0 * body * r["useful_tokens"]
    if task in ("ppo", "grpo"):
        return None  # generation, several scoring passes and training: no single-model MFU
    if task == "kto":
        return None  # the mismatched answers' passes sit outside the useful tokens: no formula stated
    return 6.0 * (body + head) * r["useful_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small data, for a check in under 5 minutes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated scenario names or parts of names ('125m': the ~125M rows, 't2': the 2-thread "
        "ones); 'import' is the preference import at scale",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --only (full sizes): also merge the rows run into the committed results.json, replacing rows "
        "of the same names and keeping the others, with this run's machine and load noted under 'merged'",
    )
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument(
        "--fork",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fork each measurement from a parent that imported that side's libraries once (default: on with "
        "--quick, off for the full run, where every measurement is a plain `python -m benchmarks.worker`)",
    )
    parser.add_argument(
        "--show", action="store_true", help="print the table of the committed results.json and run nothing"
    )
    args = parser.parse_args()
    if args.show:
        results = json.loads((HERE / "results.json").read_text(encoding="utf-8"))
        print(
            f"{'quick' if results['quick'] else 'full'} run, {results['seconds']:.0f} s, {results['machine']}"
        )
        print_table(results["rows"], results["dpo_ablations"])
        return
    only = set(args.only.split(",")) if args.only else set()
    if only == {"import"}:  # the preference import at scale alone (benchmarks/data_import.py)
        data_import.main(["--quick"] if args.quick else [])
        return
    global FORK
    FORK = args.quick if args.fork is None else args.fork
    if FORK:  # both parents import at once, one per core, while nothing is measured yet
        SERVERS.update({name: ForkServer(name) for name in ("ours", "trl")})
    try:
        run(args)
    finally:
        for server in SERVERS.values():
            server.close()
    if not only or "import" in only:
        data_import.main(["--quick"] if args.quick else [])


def alternate(
    name: str, task: str, kwargs: dict[str, Any], repeats: int, started: float
) -> dict[str, list[dict[str, Any]]]:
    """``repeats`` measurements per side, ours and TRL's alternating which goes first, so load hits both alike."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    for i in range(repeats):
        for impl in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):
            runs[impl].append(worker({"task": task, "impl": impl, **kwargs}))
        print(
            f"  {name}: run {i + 1}/{repeats} ours {runs['ours'][-1]['seconds']:.2f}s "
            f"trl {runs['trl'][-1]['seconds']:.2f}s  [{time.time() - started:.0f}s elapsed]",
            flush=True,
        )
    return runs


def run(args: argparse.Namespace) -> None:
    scenarios = QUICK if args.quick else FULL
    if args.only:
        scenarios = {k: v for k, v in scenarios.items() if selected(k, args.only.split(","))}
        if not scenarios:
            raise SystemExit(f"--only {args.only}: no such scenario (known: {', '.join(FULL)})")
    started, load_start = time.time(), os.getloadavg()
    print(
        f"load average {load_start[0]:.2f}; fresh process per run: "
        f"{'forked from a per-side parent that imported its libraries once' if FORK else 'python -m'}",
        flush=True,
    )
    print("correctness gate (fp32, identical model batches) ...", flush=True)
    gate = {k: v for k, v in worker({"task": "correctness", "impl": "both"}).items() if isinstance(v, dict)}
    for name, g in gate.items():
        print(
            f"  {name}: max |ours - TRL| = {g.get('max_abs_diff', float('nan')):.2e} -> "
            f"{'OK' if g.get('ok') else 'FAIL ' + str(g.get('error', ''))}"
        )

    ceilings = {}
    for key in sorted({ceiling_key(kwargs) for _, kwargs, _, _ in scenarios.values()}):
        model, threads = key.split("@")
        ceilings[key] = worker({"task": "ceiling", "impl": "", "model": model, "threads": int(threads)})
        print(
            f"  matmul ceiling ({model} shapes, {threads} thread(s), 1024 tokens): "
            f"{ceilings[key]['ceiling_flops'] / 1e9:.1f} GFLOP/s"
        )

    rows = []
    for name, (task, kwargs, goal, mem_goal) in scenarios.items():
        if task in ("ppo", "grpo"):  # cached models are built here, not inside a measured process
            worker({"task": task, "impl": "prepare", "model": kwargs.get("model", "tiny")})
        runs = alternate(name, task, kwargs, min(args.repeats, REPEATS.get(name, args.repeats)), started)
        row = summarise(name, task, kwargs, goal, mem_goal, runs, ceilings[ceiling_key(kwargs)], gate)
        if task == "ppo":
            processes = 1 if args.quick or "threads" in kwargs else 3
            row["rollout"] = rollout_vs_generate(
                kwargs.get("model", "tiny"), processes, kwargs.get("threads")
            )
        row["goals"] = goals(row)
        row["met"] = all(met for _, met in row["goals"])
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
        "forked": FORK,
        "repeats": args.repeats,
        "threads": int(os.environ.get("PREFTUNE_BENCH_THREADS", "1")),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": load_start[0],
            "load_average_end": os.getloadavg()[0],
        },
        "gate": gate,
        "ceilings": ceilings,
        "rows": rows,
        "dpo_ablations": ablations,
        "seconds": time.time() - started,
    }
    write_results(args, out)


def write_results(args: argparse.Namespace, out: dict[str, Any]) -> None:
    """Only a full run of every scenario replaces the committed results; a quick or partial one goes beside
    them, and ``--merge`` then also puts a partial run's rows into the committed results."""
    rows = out["rows"]
    stem = "results-quick" if args.quick else "results-partial" if args.only else "results"
    (HERE / f"{stem}.json").write_text(json.dumps(out, indent=2), encoding="utf-8")
    print_table(rows, out["dpo_ablations"])
    plot(rows, HERE / f"{stem}.png")
    print(f"wrote {HERE / f'{stem}.json'} and {HERE / f'{stem}.png'} in {out['seconds']:.0f}s")
    if args.merge and args.only and not args.quick:
        merged = merge(json.loads((HERE / "results.json").read_text(encoding="utf-8")), out)
        (HERE / "results.json").write_text(json.dumps(merged, indent=2), encoding="utf-8")
        plot(merged["rows"], HERE / "results.png")
        print(f"merged {len(rows)} row(s) into {HERE / 'results.json'} and {HERE / 'results.png'}")


def merge(committed: dict[str, Any], partial: dict[str, Any]) -> dict[str, Any]:
    """``committed`` with ``partial``'s rows in place of rows of the same names (new ones appended in the order
    of :data:`FULL`), its ceilings and gate entries added, and its run noted under ``merged`` (scenarios,
    machine with load average, repeats, seconds), so the top-level run description stays the full run's."""
    fresh = {r["scenario"]: r for r in partial["rows"]}
    rows = [fresh.pop(r["scenario"], r) for r in committed["rows"]]
    order = list(FULL)
    rows += sorted(fresh.values(), key=lambda r: order.index(r["scenario"]) if r["scenario"] in order else 0)
    note = {k: partial[k] for k in ("machine", "repeats", "threads", "forked", "seconds")}
    return {
        **committed,
        "gate": {**partial["gate"], **committed["gate"]},
        "ceilings": {**committed["ceilings"], **partial["ceilings"]},
        "rows": rows,
        "merged": [
            *committed.get("merged", []),
            {"scenarios": [r["scenario"] for r in partial["rows"]], **note},
        ],
    }


def summarise(name, task, kwargs, goal, mem_goal, runs, ceiling, gate) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": name, "task": task, "settings": kwargs}
    for impl, results in runs.items():
        tps = [r["useful_tokens"] / r["seconds"] for r in results]
        units = results[0].get("pairs") or results[0].get("examples")
        mfus = [flops(task, r, ceiling) for r in results]
        row[impl] = {
            "tokens_per_s": statistics.median(tps),
            "items_per_s": statistics.median(units / r["seconds"] for r in results),
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in results),
            "mfu": None
            if None in mfus
            else statistics.median(
                f / r["seconds"] / ceiling["ceiling_flops"] for f, r in zip(mfus, results, strict=True)
            ),
            "all_tokens_per_s": tps,
        }
        if task in ("ppo", "grpo"):
            for key in ("seconds_per_iteration", "generation_share"):
                row[impl][key] = statistics.median(r[key] for r in results)
        if task == "ppo" and impl == "ours" and "scored_tokens" in results[0]:
            row["update_bound"] = ppo_update_bound(results, ceiling)
        if task in ("grpo", "kto"):  # sampled answers / trained examples: equal on both sides by design
            row[impl]["examples"] = statistics.median(r["examples"] for r in results)
    gate_key = "dpo" if task == "dpo" else "reward" if task == "reward" else None
    row["correct"] = gate[gate_key]["ok"] if gate_key else None
    if row["correct"] is False:
        row["speedup"] = None  # refuse: the losses do not match TRL's
    else:
        row["speedup"] = row["ours"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
    row["memory_ratio"] = row["ours"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
    row["goal_speedup"], row["goal_memory_ratio"] = goal, mem_goal
    return row


def ppo_update_flops(r: dict[str, Any], ceiling: dict[str, Any]) -> float:
    """Model FLOPs of a PPO run outside generation, a lower bound: per scored token (prompt + response) the
    scoring passes -- policy, reference, critic and reward model forward, 2·N each -- and per PPO epoch policy and
    critic forward and backward with LoRA (2·N + 2·N each: the frozen weights get no weight gradients); the LM
    head only on response tokens (policy and reference forward, and the policy's backward)."""
    body = ceiling["matmul_params"] - ceiling["head_params"]
    head = ceiling["head_params"]
    scored, sampled, epochs = r["scored_tokens"], r["sampled_tokens"], r["ppo_epochs"]
    scoring = 4 * 2.0 * body * scored + 2 * 2.0 * head * sampled
    update = 2 * 4.0 * body * scored + 4.0 * head * sampled
    return scoring + epochs * update


def ppo_update_bound(results: list[dict[str, Any]], ceiling: dict[str, Any]) -> dict[str, float]:
    """Issue 22's second rollout goal: the non-generation time of our runs against the time their FLOPs take at
    the measured matmul ceiling (the median run's ratio)."""
    ratios = []
    for r in results:
        bound = ppo_update_flops(r, ceiling) / ceiling["ceiling_flops"]
        ratios.append(((r["seconds"] - r["generation_seconds"]) / bound, bound))
    ratio, bound = sorted(ratios)[len(ratios) // 2]
    return {"ratio": ratio, "bound_seconds": bound}


def goals(row: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each goal of a row, with whether it is met: a row can meet its speed goal and miss its MFU goal."""
    if row["task"] == "ppo":
        return [
            (
                f"gen share>={PPO_GENERATION_SHARE_GOAL:.0%}",
                row["ours"]["generation_share"] >= PPO_GENERATION_SHARE_GOAL,
            ),
            (f"rollout>={PPO_ROLLOUT_RATIO_GOAL}x", row["rollout"]["ratio"] >= PPO_ROLLOUT_RATIO_GOAL),
        ] + (
            [
                (
                    f"non-gen<={PPO_UPDATE_BOUND_GOAL}x FLOPs bound",
                    row["update_bound"]["ratio"] <= PPO_UPDATE_BOUND_GOAL,
                )
            ]
            if "update_bound" in row
            else []
        )
    out = [
        (f">={row['goal_speedup']}x", row["speedup"] is not None and row["speedup"] >= row["goal_speedup"])
    ]
    if row["goal_memory_ratio"]:
        out.append((f"mem<={row['goal_memory_ratio']}", row["memory_ratio"] <= row["goal_memory_ratio"]))
    if row["scenario"] in MFU_GOALS:
        goal = MFU_GOALS[row["scenario"]]
        out.append((f"MFU>={goal:.0%}", (row["ours"]["mfu"] or 0.0) >= goal))
    return out


def print_table(rows, ablations) -> None:
    head = (
        f"{'scenario':<20}{'ours tok/s':>11}{'TRL tok/s':>11}{'speed-up':>10}{'ours items/s':>13}"
        f"{'ours RSS':>10}{'TRL RSS':>9}{'mem':>6}{'MFU ours':>9}{'MFU TRL':>9}  goal"
    )
    print("\n" + head + "\n" + "-" * len(head))

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    for r in rows:
        speed = "REFUSED" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        goal = ", ".join(f"{name} {'MET' if met else 'MISSED'}" for name, met in goals(r))
        print(
            f"{r['scenario']:<20}{r['ours']['tokens_per_s']:>11.0f}{r['trl']['tokens_per_s']:>11.0f}{speed:>10}"
            f"{r['ours']['items_per_s']:>13.1f}{r['ours']['peak_rss_mb']:>10.0f}{r['trl']['peak_rss_mb']:>9.0f}"
            f"{r['memory_ratio']:>6.2f}{pct(r['ours']['mfu']):>9}{pct(r['trl']['mfu']):>9}  {goal}"
        )
    for r in rows:
        if r["task"] != "ppo":
            continue
        ours, trl, rollout = r["ours"], r["trl"], r["rollout"]
        print(
            f"\n{r['scenario']} (TRL = RLOOTrainer; tok/s = sampled tokens per second of the training loop, "
            "items = sampled sequences):\n"
            f"  seconds per iteration  ours {ours['seconds_per_iteration']:.2f}  TRL "
            f"{trl['seconds_per_iteration']:.2f}  ratio TRL/ours "
            f"{trl['seconds_per_iteration'] / ours['seconds_per_iteration']:.2f}x\n"
            f"  generation share       ours {ours['generation_share']:.1%}  TRL {trl['generation_share']:.1%}"
            f"  (goal >= {PPO_GENERATION_SHARE_GOAL:.0%})\n"
            f"  rollout vs bare generate {rollout['ratio']:.2f}x ({rollout['ours_tokens_per_s']:.0f} vs "
            f"{rollout['bare_tokens_per_s']:.0f} tok/s; goal >= {PPO_ROLLOUT_RATIO_GOAL}x)"
        )
        if "update_bound" in r:
            bound = r["update_bound"]
            print(
                f"  outside generation      {bound['ratio']:.2f}x its FLOPs at the matmul ceiling "
                f"({bound['bound_seconds']:.2f} s; goal <= {PPO_UPDATE_BOUND_GOAL}x)"
            )
    print_group_rl(rows)
    if ablations:
        print("\nDPO levers (ours, tiny model, LoRA):")
        for a in ablations:
            print(f"  {a['levers']:<28}{a['tokens_per_s']:>9.0f} tok/s {a['peak_rss_mb']:>7.0f} MiB")


def print_group_rl(rows: list[dict[str, Any]]) -> None:
    """The GRPO / RLOO rows' detail: answers sampled per side, seconds per iteration, generation share."""
    for r in rows:
        if r["task"] != "grpo":
            continue
        ours, trl = r["ours"], r["trl"]
        print(
            f"\n{r['scenario']} (tok/s = sampled tokens per second of the training loop; answers sampled: ours "
            f"{ours['examples']:.0f}, TRL {trl['examples']:.0f}):\n"
            f"  seconds per iteration  ours {ours['seconds_per_iteration']:.2f}  TRL "
            f"{trl['seconds_per_iteration']:.2f}\n"
            f"  generation share       ours {ours['generation_share']:.1%}  TRL {trl['generation_share']:.1%}"
        )


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
