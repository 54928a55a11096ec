"""The DPO pipeline run step by step inside the runtime image (kfp.local's DockerRunner on podman), with its data,
base model and registry in S3 (moto on 127.0.0.1), against the same pipeline run by the subprocess runner.

Needs the image: ``make image`` builds it and ``make test`` sets ``PREFTUNE_TEST_IMAGE`` to it (the image's own
smoke test runs in ``make image``). Without that variable the test is skipped with the reason.
Both runs use the same parameters, seed and thread count; their metrics must be equal, timings and memory aside,
which is what says that the containers run the same code on the same data as this environment: the same
preftune, the same locked dependencies and the same CPU torch wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e import bundled_slice, run_cli
from s3_server import moto_server, s3_bucket

ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("PREFTUNE_TEST_IMAGE", "")
EXAMPLES = ROOT / "examples"
#: Metrics that measure time or memory of this machine, not the computation.
TIMING = ("seconds", "per_second", "_time", "peak_", "memory", "wall")

pytestmark = pytest.mark.skipif(
    not IMAGE, reason="needs the runtime image: `make image`, then PREFTUNE_TEST_IMAGE"
)


def _timing(name: str) -> bool:
    return any(part in name for part in TIMING)


def _upload_inputs(bucket, tmp: Path) -> dict[str, str]:
    """The bundled tiny model and slices of the bundled data, in the bucket; the pipeline parameters naming them."""
    for path in sorted((EXAMPLES / "tiny-llama").rglob("*")):
        if path.is_file():
            bucket.put(f"models/tiny-llama/{path.relative_to(EXAMPLES / 'tiny-llama')}", path.read_bytes())
    data = {
        "sft_data": ("sft.jsonl", 160),
        "preference_data": ("preferences.jsonl", 160),
        "eval_prompts": ("eval_prompts.jsonl", 6),
    }
    params = {"base_model": bucket.uri("models/tiny-llama")}
    for param, (name, rows) in data.items():
        params[param] = bucket.put(f"data/{name}", Path(bundled_slice(name, tmp / name, rows)).read_bytes())
    return params


def _docker_run(params: dict, root: Path) -> dict:
    argv = [sys.executable, str(ROOT / "containers" / "run_pipeline.py"), "dpo", "--image", IMAGE]
    argv += ["--pipeline-root", str(root)]
    for name, value in params.items():
        argv += ["--param", f"{name}={value}"]
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3000, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (summary,) = root.glob("preftune-dpo-*/summary.json")
    return json.loads(summary.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_dpo_in_containers_matches_the_subprocess_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with moto_server() as endpoint:
        bucket = s3_bucket(endpoint, monkeypatch, tmp_path)
        params = {
            **_upload_inputs(bucket, tmp_path),
            "eval_fraction": 0.25,
            "sft_max_steps": 6,
            "dpo_max_steps": 6,
            "sft_batch_size": 8,
            "dpo_batch_size": 8,
            "dpo_learning_rate": 1e-3,
            "eval_max_prompts": 6,
            "eval_max_new_tokens": 12,
            "num_checkpoints": 1,
            "checkpoint_every": 3,
            "model_name": "policy",
            "seed": 7,
        }
        docker = _docker_run({**params, "registry_uri": bucket.uri("registry-docker")}, tmp_path / "docker")
        local = run_cli("dpo", {**params, "registry_uri": bucket.uri("registry-local")}, tmp_path / "local")
        keys = bucket.list_keys()

    assert docker["status"] == local["status"] == "SUCCEEDED", (docker["status"], local["status"])
    assert docker["runner"] == "docker" and docker["image"] == IMAGE
    assert set(docker["steps"]) == set(local["steps"])
    for name, step in docker["steps"].items():
        assert step["status"] == local["steps"][name]["status"], name
        ours, theirs = step["metrics"], local["steps"][name]["metrics"]
        assert set(ours) == set(theirs), name
        for metric, value in ours.items():
            if _timing(metric) or not isinstance(value, (int, float)):
                continue
            assert value == theirs[metric], (name, metric, value, theirs[metric])  # same code, data, seed
    # the steps wrote to S3 from inside the containers (the promoted version), and their checkpoints, written
    # every 3 steps next to each model, were removed once the step succeeded
    assert any(k.startswith("registry-docker/policy/v1/") for k in keys), keys
    for name in ("sft", "dpo"):
        model = Path(docker["steps"][name]["artifacts"]["model"])
        assert (model / "lineage.json").is_file(), model
        assert not list(Path(f"{model}-checkpoints").glob("step-*")), name
