"""End to end: `preftune run dpo` through kfp.local on the bundled model and a slice of the bundled data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from e2e import bundled_slice, run_cli

from preftune.model.modeling import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One small but real DPO pipeline run, shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("e2e-dpo")
    params = {
        "sft_data": bundled_slice("sft.jsonl", tmp / "sft.jsonl", 400),
        "preference_data": bundled_slice("preferences.jsonl", tmp / "prefs.jsonl", 480),
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp / "prompts.jsonl", 12),
        "eval_fraction": 0.2,
        "sft_max_steps": 30,
        "dpo_max_steps": 30,
        "dpo_learning_rate": 1e-3,  # a short run needs a larger step to move measurably from the reference
        "eval_max_prompts": 12,
        "eval_max_new_tokens": 24,
        "registry_uri": str(tmp / "registry"),
        "model_name": "policy",
        "num_checkpoints": 2,
    }
    summary = run_cli("dpo", params, tmp / "runs")
    summary["registry"] = str(tmp / "registry")
    return summary


@pytest.mark.slow
def test_every_step_succeeded(dpo_run: dict) -> None:
    assert dpo_run["status"] == "SUCCEEDED"
    # the branches of the other dpo_method values (kto, online_dpo) are skipped
    ran = {name: step for name, step in dpo_run["steps"].items() if step["status"] != "SKIPPED"}
    assert set(ran) == {
        "fingerprint",
        "fingerprint-2",
        "ingest",
        "preference-import",
        "sft",
        "dpo",
        "champion",
        "evaluate",
        "gate",
        "promote",
    }
    assert all(step["status"] == "SUCCEEDED" for step in ran.values())
    for name, step in ran.items():
        if name.startswith("fingerprint") or name in ("champion", "gate"):
            assert step["outputs"], "parameter steps report their outputs"
            continue
        assert step["metrics"], "every step logs metrics"
        files = {k: uri for k, uri in step["artifacts"].items() if k != "metrics"}  # metrics live in metadata
        if name == "promote":  # it writes to the registry (checked below) and reports the version
            continue
        assert files and all(Path(uri).exists() for uri in files.values()), files


@pytest.mark.slow
def test_rows_balance(dpo_run: dict) -> None:
    for name in ("ingest", "preference-import"):
        m = dpo_run["steps"][name]["metrics"]
        assert m["rows_input"] == m["rows_train"] + m["rows_eval"] + m["rows_rejected"]
    assert dpo_run["steps"]["ingest"]["metrics"]["rows_input"] == 400


@pytest.mark.slow
def test_dpo_loss_starts_at_ln2_and_learns_the_preference(dpo_run: dict) -> None:
    dpo = dpo_run["steps"]["dpo"]["metrics"]
    assert abs(dpo["first_step_loss"] - math.log(2)) < 1e-4
    assert dpo["eval_reward_accuracy"] > 0.6
    evaluation = dpo_run["steps"]["evaluate"]["metrics"]
    assert evaluation["implicit_reward_accuracy"] > 0.6
    assert math.isfinite(evaluation["kl_candidate_reference"])
    assert evaluation["kl_candidate_reference"] > 0


@pytest.mark.slow
def test_model_artifacts_load_with_transformers_and_peft(dpo_run: dict) -> None:
    from peft import AutoPeftModelForCausalLM, PeftConfig

    sft_dir = dpo_run["steps"]["sft"]["artifacts"]["model"]
    dpo_dir = dpo_run["steps"]["dpo"]["artifacts"]["model"]
    # the SFT adapter sits on the base model directory: peft loads it directly
    sft = AutoPeftModelForCausalLM.from_pretrained(sft_dir)
    assert PeftConfig.from_pretrained(dpo_dir).base_model_name_or_path == sft_dir
    policy = load_causal_lm(dpo_dir)  # DPO adapter on the merged SFT model
    tokenizer = load_tokenizer(dpo_dir)
    ids = tokenizer(
        "<|user|>\nWhat colour is the sky?<|end|>\n<|assistant|>\n", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        merged_sft = sft.merge_and_unload()
        assert not torch.allclose(policy(ids).logits, merged_sft(ids).logits)
    lineage = json.loads((Path(dpo_dir) / "lineage.json").read_text())
    assert [c["stage"] for c in lineage["chain"]] == ["base", "sft", "dpo"]
    generations = dpo_run["steps"]["evaluate"]["artifacts"]["generations"]
    rows = [json.loads(line) for line in Path(generations).read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"prompt", "candidate", "reference"}


@pytest.mark.slow
def test_snapshots_become_the_reward_vs_kl_path(dpo_run: dict) -> None:
    from preftune.train.snapshots import read_index

    snapshots = read_index(dpo_run["steps"]["dpo"]["artifacts"]["checkpoints"])
    # 2 kept of 30 steps, denser early; the final one is the model
    assert [s["step"] for s in snapshots] == [3, 13]
    evaluation = dpo_run["steps"]["evaluate"]["metrics"]
    assert evaluation["frontier_points"] == 3  # no judge: the snapshots and the final model, by accuracy
    report = Path(dpo_run["steps"]["evaluate"]["artifacts"]["report"]).read_text(encoding="utf-8")
    assert "Reward vs KL over training" in report and "<td>step 13</td>" in report


@pytest.mark.slow
def test_first_run_becomes_the_champion(dpo_run: dict) -> None:
    from preftune.io import registry

    decision = json.loads(dpo_run["steps"]["gate"]["outputs"]["decision"])
    assert dpo_run["steps"]["gate"]["outputs"]["Output"] is True
    assert decision["promote"] is True
    assert "lc_win_rate_vs_champion: no champion yet" in decision["reasons"]
    pointer = registry.current_champion(dpo_run["registry"], "policy")
    assert pointer["version"] == 1
    assert (
        pointer["metrics"]["kl_candidate_reference"]
        == dpo_run["steps"]["evaluate"]["metrics"]["kl_candidate_reference"]
    )
    assert load_causal_lm(pointer["uri"]) is not None  # the registry copy loads on its own (adapters merged)
