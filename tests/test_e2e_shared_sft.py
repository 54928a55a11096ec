"""End to end: the demo's two pipelines into one pipeline root train one SFT model. The RLHF run takes ingest, SFT
and the preference import from the DPO run through KFP's cache (same inputs), and builds on that SFT model."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e import bundled_slice, run_cli

from preftune.model.modeling import read_lineage

SMALL = {
    "eval_fraction": 0.2,
    "sft_max_steps": 10,
    "num_checkpoints": 1,
    "eval_max_prompts": 4,
    "eval_max_new_tokens": 8,
}


@pytest.mark.slow
def test_the_rlhf_run_reuses_the_dpo_runs_sft(tmp_path: Path) -> None:
    data = {
        "sft_data": bundled_slice("sft.jsonl", tmp_path / "sft.jsonl", 200),
        "preference_data": bundled_slice("preferences.jsonl", tmp_path / "prefs.jsonl", 320),
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp_path / "prompts.jsonl", 6),
    }
    root = tmp_path / "runs"
    dpo = run_cli("dpo", {**data, **SMALL, "dpo_max_steps": 8}, root)
    rlhf_settings = {"reward_max_steps": 8, "ppo_iterations": 2, "ppo_rollout_batch_size": 8}
    rlhf = run_cli("rlhf", {**data, **SMALL, **rlhf_settings}, root)
    for step in ("ingest", "sft", "preference-import"):
        assert not dpo["steps"][step]["cached"] and rlhf["steps"][step]["cached"], step
        assert rlhf["steps"][step]["artifacts"] == dpo["steps"][step]["artifacts"]
    assert f"sft ... cached (from {dpo['run_id']})" in rlhf["printed"]
    sft = dpo["steps"]["sft"]["artifacts"]["model"]
    assert read_lineage(rlhf["steps"]["reward-model"]["artifacts"]["model"])["parent"] == sft
    assert read_lineage(rlhf["steps"]["ppo"]["artifacts"]["model"])["parent"] == sft
