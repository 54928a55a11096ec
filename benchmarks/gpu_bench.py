"""The GPU scenarios of ``benchmarks/gpu.sh``: preftune against TRL in bf16 at 0.5B- and 1.5B-like shapes.

    python -m benchmarks.gpu_bench --out benchmarks/gpu-bench.json        # on a CUDA machine
    python -m benchmarks.gpu_bench --dry-run --out /tmp/gpu-bench.json    # the plan checked, tiny runs on CPU
    python -m benchmarks.gpu_bench --merge a.json b.json ... --out benchmarks/results-gpu.json

:data:`SCENARIOS`: DPO, reward model and SFT (full fine-tuning, bf16 autocast, fp32 trainable weights) on random
Llamas of Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes (``benchmarks.common.SHAPES``), each against TRL as it
ships and against TRL with Liger kernels (``use_liger_kernel``; DPO and SFT use its fused losses, the reward model
gets its patched RMSNorm / SwiGLU / RoPE). Every measurement is a fresh ``python -m benchmarks.worker``, sides
alternating, median of ``--repeats``; reported: useful tokens/s, peak GPU memory (``max_memory_allocated``),
speed-up and memory ratio against each TRL variant, MFU against the GPU's measured bf16 matmul ceiling.

GRPO has no benchmark scenario yet (``benchmarks/`` has no GRPO module): the plan lists it as missing.

``--dry-run`` checks, on a CPU, what the GPU run depends on: every scenario's shape resolves to a model of the
size it is named for (built on the meta device, no memory), every measurement spec is well formed, and a tiny
version of each (ours, TRL, and TRL + Liger where liger-kernel is installed) runs in this process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import common

#: (task, model, settings) of each GPU scenario; size bounds of each shape, in parameters.
SCENARIOS: dict[str, tuple[str, str, dict[str, Any]]] = {
    f"{task}-full-{size}": (task, size, {"use_lora": False, unit: 512, "precision": "bf16"})
    for task, unit in (("dpo", "pairs"), ("reward", "pairs"), ("sft", "examples"))
    for size in ("0.5b", "1.5b")
}
SIZES = {"0.5b": (0.4e9, 0.7e9), "1.5b": (1.3e9, 1.9e9)}
#: The TRL variants every scenario is measured against.
TRL_VARIANTS = {"trl": False, "trl+liger": True}
MISSING = {
    "grpo": "no GRPO benchmark scenario exists in benchmarks/ yet (add a module and a SCENARIOS entry)"
}
#: Goals at these sizes (issue 22's 125M goals, the GPU run judged by the same bar).
GOALS = {"dpo": 2.0, "reward": 1.5, "sft": 1.5}
MEMORY_GOAL = 0.7


def specs(name: str) -> dict[str, dict[str, Any]]:
    """The worker specs of scenario ``name``, by side: ours and each TRL variant."""
    task, model, settings = SCENARIOS[name]
    out = {"ours": {"task": task, "impl": "ours", "model": model, **settings}}
    for variant, liger in TRL_VARIANTS.items():
        out[variant] = {"task": task, "impl": "trl", "model": model, **settings, "liger": liger}
    return out


def shape_size(model: str) -> dict[str, Any]:
    """Parameter counts of benchmark model ``model``, built on the meta device (no weights allocated)."""
    import torch
    from transformers import LlamaForCausalLM

    config = common.shape_config(model)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return {
        "params": params,
        "matmul_params": common.matmul_params(config),
        "head_params": config.hidden_size * config.vocab_size,
        "vocab": config.vocab_size,
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
    }


def gpu_ceiling(model: str, tokens: int = 4096) -> dict[str, Any]:
    """bf16 matmul FLOP/s on this GPU at the model's layer shapes (torch.utils.benchmark), FLOP-weighted."""
    import torch
    from torch.utils import benchmark

    config = common.shape_config(model)
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    layers = config.num_hidden_layers
    total_flops = total_seconds = 0.0
    for k, n, count in [
        (h, q, layers),
        (h, kv, 2 * layers),
        (q, h, layers),
        (h, i, 2 * layers),
        (i, h, layers),
    ] + [(h, v, 1)]:
        x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        timer = benchmark.Timer(
            stmt="torch.nn.functional.linear(x, w)", globals={"x": x, "w": w, "torch": torch}
        )
        seconds = timer.blocked_autorange(min_run_time=0.5).median
        total_flops += 2.0 * tokens * k * n * count
        total_seconds += seconds * count
    size = shape_size(model)
    return {"ceiling_flops": total_flops / total_seconds, **size}


def summarise(name: str, runs: dict[str, list[dict[str, Any]]], ceiling: dict[str, Any]) -> dict[str, Any]:
    """Medians per side, ratios against each TRL variant, MFU and the goals judged."""
    from benchmarks.__main__ import flops

    task = SCENARIOS[name][0]
    row: dict[str, Any] = {"scenario": name, "task": task, "model": SCENARIOS[name][1]}
    for side, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            row[side] = {"error": results[-1]["error"] if results else "not run"}
            continue
        mfu = (
            [flops(task, r, ceiling) / r["seconds"] / ceiling["ceiling_flops"] for r in ok] if ceiling else []
        )
        row[side] = {
            "tokens_per_s": statistics.median(r["useful_tokens"] / r["seconds"] for r in ok),
            "seconds": statistics.median(r["seconds"] for r in ok),
            "peak_gpu_mb": statistics.median(
                r["peak_gpu_mb"] if "peak_gpu_mb" in r else r["peak_rss_mb"] for r in ok
            ),
            "mfu": statistics.median(mfu) if mfu else None,
            "runs": len(ok),
        }
    goals = []
    for variant in TRL_VARIANTS:
        if "tokens_per_s" in row.get("ours", {}) and "tokens_per_s" in row.get(variant, {}):
            speedup = row["ours"]["tokens_per_s"] / row[variant]["tokens_per_s"]
            memory = row["ours"]["peak_gpu_mb"] / row[variant]["peak_gpu_mb"]
            row[f"speedup_vs_{variant}"], row[f"memory_ratio_vs_{variant}"] = speedup, memory
            goals.append((f"vs {variant} >={GOALS[task]}x", speedup >= GOALS[task]))
            goals.append((f"vs {variant} mem<={MEMORY_GOAL}", memory <= MEMORY_GOAL))
    row["goals"] = goals
    return row


def measure(names: list[str], repeats: int) -> dict[str, Any]:
    """Every scenario of ``names`` on this GPU: fresh worker processes, sides alternating, ``repeats`` rounds."""
    import torch

    from benchmarks.__main__ import worker

    rows, ceilings = [], {}
    for name in names:
        model = SCENARIOS[name][1]
        common.model_dir(model)  # the random checkpoint is written once, before any measured process
        if model not in ceilings:
            ceilings[model] = gpu_ceiling(model)
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in ("ours", *TRL_VARIANTS)}
        order = list(runs)
        for i in range(repeats):
            for side in order if i % 2 == 0 else list(reversed(order)):
                try:
                    runs[side].append(worker(specs(name)[side], timeout=3600))
                except Exception as exc:  # noqa: BLE001 - one failing side must not lose the others' numbers
                    runs[side].append({"error": str(exc)[-2000:]})
            print(f"  {name}: round {i + 1}/{repeats} done", flush=True)
        rows.append(summarise(name, runs, ceilings[model]))
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ceilings": ceilings,
        "rows": rows,
        "missing": MISSING,
    }


def _tiny_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A measurement spec cut to the bundled tiny model, a handful of items, fp32 (this CPU)."""
    unit = "pairs" if "pairs" in spec else "examples"
    return {**spec, "model": "tiny", unit: 8, "batch_size": 4, "precision": "fp32"}


def dry_run(names: list[str]) -> dict[str, Any]:
    """The plan checked on this CPU: shapes resolve to their sizes, a tiny version of every measurement runs."""
    from benchmarks.worker import measure as measure_here

    sizes = {model: shape_size(model) for model in sorted({SCENARIOS[n][1] for n in names})}
    checks: list[dict[str, Any]] = []
    for model, size in sizes.items():
        low, high = SIZES[model]
        checks.append(
            {"check": f"shape {model}", "params": size["params"], "ok": low <= size["params"] <= high}
        )
    liger = importlib.util.find_spec("liger_kernel") is not None
    done: dict[str, bool] = {}  # tiny spec -> whether it ran
    for name in names:
        for side, spec in specs(name).items():
            check: dict[str, Any] = {"check": f"{name} {side}", "spec": spec}
            if spec.get("liger") and not liger:
                # TRL + Liger needs liger-kernel (Triton, CUDA): gpu.sh installs it; here only the TRL arguments
                # it produces are checked.
                args = common.trl_device_args(spec["precision"], True)
                check.update(
                    ok=args.get("use_liger_kernel") is True, skipped="liger-kernel not installed here"
                )
            elif json.dumps(_tiny_spec(spec), sort_keys=True) in done:  # the other size's tiny run: the same
                check.update(
                    ok=done[json.dumps(_tiny_spec(spec), sort_keys=True)], same_tiny_run_as_before=True
                )
            else:
                start = time.perf_counter()
                try:
                    result = measure_here(_tiny_spec(spec))
                    check.update(
                        ok=result["seconds"] > 0 and result["useful_tokens"] > 0, seconds=result["seconds"]
                    )
                except Exception:  # noqa: BLE001 - reported as a failed check with its traceback
                    check.update(ok=False, error=traceback.format_exc()[-2000:])
                check["wall_seconds"] = time.perf_counter() - start
                done[json.dumps(_tiny_spec(spec), sort_keys=True)] = check["ok"]
            checks.append(check)
            print(f"  dry run {check['check']}: {'ok' if check['ok'] else 'FAILED'}", flush=True)
    return {"sizes": sizes, "checks": checks, "missing": MISSING, "ok": all(c["ok"] for c in checks)}


def merge(paths: list[Path]) -> dict[str, Any]:
    """One results-gpu.json from the parts gpu.sh wrote; a part that is absent or unreadable is marked so."""
    parts: dict[str, Any] = {}
    for path in paths:
        try:
            parts[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            parts[path.stem] = {"ok": False, "error": f"{path}: {exc}"}
    return {
        "platform": platform.platform(),
        "parts": parts,
        "ok": all(p.get("ok", True) for p in parts.values()),
    }


def print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        ours = row.get("ours", {})
        parts = [f"{row['scenario']:<18} ours {ours.get('tokens_per_s', float('nan')):>9.0f} tok/s"]
        for variant in TRL_VARIANTS:
            if f"speedup_vs_{variant}" in row:
                parts.append(
                    f"{variant} {row[variant]['tokens_per_s']:>9.0f} ({row[f'speedup_vs_{variant}']:.2f}x, "
                    f"mem {row[f'memory_ratio_vs_{variant}']:.2f})"
                )
        mfu = ours.get("mfu")
        parts.append("MFU -" if mfu is None else f"MFU {mfu:.1%}")
        parts.append(", ".join(f"{goal} {'MET' if met else 'MISSED'}" for goal, met in row["goals"]))
        print("  ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=common.ROOT / "benchmarks" / "gpu-bench.json")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the plan and run tiny versions on the CPU"
    )
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="parts to merge into --out")
    args = parser.parse_args(argv)
    if args.merge:
        result = merge(args.merge)
    else:
        names = [n for n in args.only.split(",") if n] or list(SCENARIOS)
        unknown = sorted(set(names) - set(SCENARIOS))
        if unknown:
            parser.error(f"unknown scenarios {unknown}; known: {sorted(SCENARIOS)}")
        common.set_threads()
        if args.dry_run:
            result = {"dry_run": True, **dry_run(names)}
        else:
            import torch

            if not torch.cuda.is_available():
                print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
                return 2
            result = {"dry_run": False, **measure(names, args.repeats)}
            sides = ("ours", *TRL_VARIANTS)
            result["ok"] = all("error" not in row[side] for row in result["rows"] for side in sides)
            print_rows(result["rows"])
    args.out.write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    print(f"{'ok' if result['ok'] else 'FAILED'}; wrote {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
