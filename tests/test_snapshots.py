"""Training snapshots: where they are taken, what an index holds, and that training writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.train.snapshots import Snapshots, read_index, snapshot_steps


def test_snapshot_steps_are_spread_inside_the_run_denser_early() -> None:
    assert snapshot_steps(100, 4) == [4, 16, 36, 64]  # 100 * (k / 5)^2
    assert snapshot_steps(255, 8) == [3, 13, 28, 50, 79, 113, 154, 201]
    assert snapshot_steps(3, 4) == [1, 2]  # a short run keeps fewer; never step 0 or the final step
    assert snapshot_steps(1, 4) == []
    assert snapshot_steps(50, 0) == []
    with pytest.raises(ValueError, match="num_checkpoints"):
        snapshot_steps(10, -1)


def test_no_directory_keeps_nothing(tmp_path: Path) -> None:
    keeper = Snapshots(None, total_steps=10, count=3, stage="dpo")
    assert not any(keeper.due(s) for s in range(11))


def test_index_lists_saved_snapshots_and_refuses_escapes(tmp_path: Path) -> None:
    from tiny_models import make_model, make_tokenizer

    tokenizer = make_tokenizer(["a b c d e f"], vocab_size=300)
    model = make_model(tokenizer)
    keeper = Snapshots(str(tmp_path / "snaps"), total_steps=9, count=2, stage="ppo")
    assert read_index(tmp_path / "snaps") == []  # an index exists from the start, empty
    assert [s for s in range(10) if keeper.due(s)] == [1, 4]  # 9 * (1/3)^2, 9 * (2/3)^2
    keeper.save(3, model, tokenizer, parent_uri="base", parameters={"lr": 1.0}, values={"kl": 0.5})
    (entry,) = read_index(tmp_path / "snaps")
    assert entry["step"] == 3 and entry["values"] == {"kl": 0.5}
    lineage = json.loads((Path(entry["path"]) / "lineage.json").read_text())
    assert lineage["stage"] == "ppo-snapshot" and lineage["parameters"]["snapshot_step"] == 3

    index = tmp_path / "snaps" / "index.json"
    index.write_text(json.dumps({"snapshots": [{"step": 1, "path": "../elsewhere"}]}))
    with pytest.raises(ValueError, match="leaves the directory"):
        read_index(tmp_path / "snaps")
    with pytest.raises(ValueError, match="no index.json"):
        read_index(tmp_path)
