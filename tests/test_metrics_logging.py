"""Non-finite metrics never reach a step's executor output as bare ``NaN`` / ``Infinity`` tokens.

KFP writes an artifact's metadata with ``json.dumps``, which emits those tokens for non-finite floats; they are
not JSON, and the Go launcher on a cluster fails on them (kfp.local reads them without complaint). The test
runs a component through kfp.local and parses its executor output strictly, as the launcher would. (No
``from __future__ import annotations`` here: KFP reads the component's annotations as types.)
"""

import json
import math
import re
from pathlib import Path

import pytest
from kfp import dsl, local

from preftune.launch.metrics import log_metrics, metric_value

ROOT = Path(__file__).resolve().parents[1]


class FakeMetrics:
    def __init__(self) -> None:
        self.metadata: dict = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metadata[name] = value


def test_values_are_finite_numbers_or_clear_strings(caplog: pytest.LogCaptureFixture) -> None:
    import numpy as np
    import torch

    metrics = FakeMetrics()
    logged = log_metrics(
        metrics,
        {
            "loss": 0.25,
            "steps": 7,
            "ok": True,
            "np": np.float32(1.5),
            "t": torch.tensor(2.0),
            "kl": float("nan"),
            "reward": float("inf"),
            "margin": -math.inf,
            "note": "not a number",
        },
    )
    assert metrics.metadata == logged
    assert logged == {
        "loss": 0.25,
        "steps": 7.0,
        "ok": 1.0,
        "np": 1.5,
        "t": 2.0,
        "kl": "nan",
        "reward": "inf",
        "margin": "-inf",
    }
    assert math.isnan(float(logged["kl"])) and float(logged["margin"]) == -math.inf  # read back by float()
    assert "metric kl is not finite" in caplog.text and "metric note is not a number" in caplog.text
    assert metric_value("x", "3.5") == 3.5


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def _nan_metrics(metrics: dsl.Output[dsl.Metrics], through_preftune: bool):
    values = {"loss": float("nan"), "reward": float("inf"), "kl": -float("inf"), "accuracy": 0.75}
    if through_preftune:
        from preftune.launch.metrics import log_metrics

        log_metrics(metrics, values)
    else:
        for name, value in values.items():
            metrics.log_metric(name, value)


def _executor_output(root: Path, through_preftune: bool) -> str:
    from google.protobuf.json_format import SerializeToJsonError

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    try:
        _nan_metrics(through_preftune=through_preftune)
    except SerializeToJsonError:  # this kfp's local runner reads the step's output back, and fails on it
        assert not through_preftune
    (path,) = root.rglob("executor_output.json")
    return path.read_text(encoding="utf-8")


def _strict(text: str) -> dict:
    def refuse(token: str) -> None:
        raise ValueError(f"bare {token} in the executor output")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.usefixtures("one_thread")
def test_a_nan_metric_never_appears_as_a_bare_token_in_the_executor_output(tmp_path: Path) -> None:
    raw = _executor_output(tmp_path / "raw", through_preftune=False)
    with pytest.raises(ValueError, match="bare"):  # what KFP writes on its own: the launcher would fail
        _strict(raw)
    text = _executor_output(tmp_path / "preftune", through_preftune=True)
    assert not re.search(r"(?<![\"\w])(NaN|-?Infinity)(?![\"\w])", text)
    (artifact,) = _strict(text)["artifacts"]["metrics"]["artifacts"]
    assert artifact["metadata"] == {"loss": "nan", "reward": "inf", "kl": "-inf", "accuracy": 0.75}


@pytest.mark.parametrize("name", ["promote", "compare"])
def test_these_components_log_through_log_metrics(name: str) -> None:
    source = (ROOT / "components" / name / "component.py").read_text(encoding="utf-8")
    assert "log_metrics(metrics," in source
    assert ".log_metric(" not in source
