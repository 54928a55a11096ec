"""The benchmark's correctness gate: our DPO and reward losses equal TRL's on identical model batches (fp32).

Same weights, same pairs and token ids; TRL's losses come from its trainers' own code paths. The benchmark
(``make bench``) refuses to print a speed-up when these do not hold.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # the benchmarks package sits at the repo root
from benchmarks import correctness  # noqa: E402


def test_dpo_loss_matches_trl_on_model_batches() -> None:
    gate = correctness.dpo_gate(n_pairs=6)
    assert gate["ok"], gate
    assert gate["max_abs_diff"] <= 1e-5
    # The policy differs from the reference, so this is not the trivial ln 2 of step 0.
    assert any(abs(x - math.log(2)) > 1e-3 for x in gate["ours"])


def test_reward_loss_matches_trl_on_model_batches() -> None:
    gate = correctness.reward_gate(n_pairs=6)
    assert gate["ok"], gate
    assert gate["max_abs_diff"] <= 1e-5
    # Both the packed, prefix-shared batches the trainer uses by default and the 2B padded rows were checked.
    assert set(gate["paths"]) == {"bradley_terry", "packed", "padded"}
    assert all(d <= 1e-5 for d in gate["paths"].values())
    assert len(set(gate["trl"])) > 1  # the random head tells the pairs apart: not a constant ln 2
