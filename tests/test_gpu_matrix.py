"""The GPU check (benchmarks/gpu_matrix.py) runs on this CPU as a dry run: the same code, eager and sdpa, bf16."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_checks_every_kernel_here_and_writes_its_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu-matrix.json"
    argv = [sys.executable, "-m", "benchmarks.gpu_matrix", "--dry-run", "--arch", "llama", "gemma2", "qwen2"]
    done = subprocess.run([*argv, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] is True and result["ok"] is True and result["bound"] == 0.05
    rows = {(r["arch"], r["kernel"]): r for r in result["rows"]}
    assert set(rows) == {
        ("llama", "eager"),
        ("llama", "sdpa"),
        ("gemma2", "eager"),
        ("qwen2", "eager"),
        ("qwen2", "sdpa"),
    }
    for row in rows.values():
        assert row["ok"] and "error" not in row
        assert max(row["logprob_diff"], row["reward_diff"], row["value_diff"]) <= 0.05
        assert row["sft_weights_fp32_finite"] == 1.0 and row["dpo_weights_fp32_finite"] == 1.0
    assert "all within bounds" in done.stdout


def test_without_a_gpu_it_asks_for_the_dry_run(tmp_path: Path) -> None:
    if torch.cuda.is_available():  # on a GPU machine the real check runs instead; nothing to refuse
        return
    argv = [sys.executable, "-m", "benchmarks.gpu_matrix", "--out", str(tmp_path / "x.json")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--dry-run" in done.stderr
    assert not (tmp_path / "x.json").exists()
