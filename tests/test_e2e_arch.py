"""End to end on other architectures: `preftune run dpo` and `preftune run rlhf` on bf16 Gemma-2 and Qwen2 bases.

The bases are made by the committed script examples/make_arch_bases.py (random weights from transformers' own
configs, saved in bf16 as hub checkpoints are; the families' chat templates, whose turns end with a token that is
not eos) and trained with bf16 autocast: Gemma-2 on eager attention (it has no sdpa), Qwen2 on sdpa. The SFT eval
loss the pipeline reports must agree, within 2%, with a plain transformers forward pass in fp32 over the same
eval rows, padded, without packing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from e2e import EXAMPLES, bundled_slice, run_cli
from safetensors import safe_open

from preftune.model.modeling import load_causal_lm, load_tokenizer
from preftune.train.batching import SFTCollator, load_sft_features, model_inputs
from preftune.train.sft import completion_nll

ARCHS = ("gemma2", "qwen2")
PIPELINES = ("dpo", "rlhf")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("arch-bases")
    script = EXAMPLES / "make_arch_bases.py"
    done = subprocess.run(
        [sys.executable, str(script), str(out), "--arch", *ARCHS], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {arch: str(out / f"tiny-{arch}") for arch in ARCHS}


def _params(tmp: Path, base: str, pipeline: str) -> dict:
    params = {
        "base_model": base,
        "sft_data": bundled_slice("sft.jsonl", tmp / "sft.jsonl", 160),
        "preference_data": bundled_slice("preferences.jsonl", tmp / "prefs.jsonl", 160),
        "eval_prompts": bundled_slice("eval_prompts.jsonl", tmp / "prompts.jsonl", 4),
        "eval_fraction": 0.2,
        "max_length": 128,
        "sft_max_steps": 6,
        "eval_max_prompts": 4,
        "eval_max_new_tokens": 8,
        "num_checkpoints": 1,
        "precision": "bf16",
        "model_name": f"{Path(base).name}-{pipeline}",
    }
    if pipeline == "dpo":
        params.update(dpo_max_steps=4, dpo_learning_rate=1e-3)
    else:
        params.update(reward_max_steps=4, ppo_iterations=2, ppo_rollout_batch_size=8, ppo_max_new_tokens=8)
    return params


@pytest.fixture(scope="module", params=[(a, p) for a in ARCHS for p in PIPELINES], ids=lambda c: "-".join(c))
def run(
    request: pytest.FixtureRequest, bases: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict:
    arch, pipeline = request.param
    tmp = tmp_path_factory.mktemp(f"e2e-{arch}-{pipeline}")
    summary = run_cli(pipeline, _params(tmp, bases[arch], pipeline), tmp / "runs")
    summary.update(arch=arch, pipeline=pipeline, base=bases[arch])
    return summary


def test_the_bases_are_bf16_checkpoints_whose_turns_do_not_end_with_eos(bases: dict[str, str]) -> None:
    for arch, base in bases.items():
        with safe_open(str(Path(base) / "model.safetensors"), "pt") as weights:
            assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}, arch  # noqa: SIM118
        assert json.loads((Path(base) / "config.json").read_text())["model_type"] == arch
        tok = load_tokenizer(base)
        end = "<end_of_turn>" if arch == "gemma2" else "<|im_end|>"
        assert end in tok.chat_template and tok.eos_token != end


@pytest.mark.slow
def test_the_pipeline_succeeds(run: dict) -> None:
    assert run["status"] == "SUCCEEDED", run["printed"][-2000:]
    trained = "dpo" if run["pipeline"] == "dpo" else "ppo"
    for name in ("ingest", "preference-import", "sft", trained, "evaluate", "gate"):
        assert run["steps"][name]["status"] == "SUCCEEDED", name
        metrics = run["steps"][name].get("metrics", {})
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), (name, metrics)
    if run["pipeline"] == "dpo":
        # the policy equals its reference at step 0: ln 2, up to bf16's resolution of the two passes
        assert abs(run["steps"]["dpo"]["metrics"]["first_step_loss"] - math.log(2)) < 5e-3
    else:
        assert run["steps"]["ppo"]["metrics"]["iterations"] == 2.0


@pytest.mark.slow
def test_the_reported_sft_eval_loss_matches_a_plain_forward(run: dict) -> None:
    """The packed, bf16-autocast, fused-head (or, for Gemma-2's soft-capped head, full-logit) eval loss of the
    SFT step against a padded fp32 forward of the saved SFT model over the same held-out rows."""
    sft = run["steps"]["sft"]
    eval_rows = run["steps"]["ingest"]["artifacts"]["eval_data"]
    model = load_causal_lm(sft["artifacts"]["model"], dtype=torch.float32).eval()
    tok = load_tokenizer(sft["artifacts"]["model"])
    features = load_sft_features(eval_rows, tok, 128)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), 8):
            batch = SFTCollator(tok)(features[start : start + 8])
            nll, count = completion_nll(model(**model_inputs(batch)).logits, batch)
            total, tokens = total + float(nll), tokens + int(count)
    plain = total / tokens
    reported = sft["metrics"]["eval_loss"]
    print(
        f"{run['arch']} {run['pipeline']}: SFT eval loss reported {reported:.5f}, plain forward {plain:.5f}"
    )
    assert abs(reported - plain) <= 0.02 * plain, (reported, plain)
