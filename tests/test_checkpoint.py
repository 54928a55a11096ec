"""Checkpoints: what a save holds, that a restore brings it all back, and that incomplete ones are ignored."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tiny_models import make_model, make_tokenizer

from preftune.io import storage
from preftune.train.checkpoint import Checkpointer
from preftune.train.loop import make_optimizer, make_scheduler


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = make_model(make_tokenizer(["a b c d e f g"], vocab_size=280))
    for p in model.model.embed_tokens.parameters():
        p.requires_grad_(False)  # a frozen part: it is not saved, and must not be expected back
    optimizer = make_optimizer(model, 1e-2, 0.0)
    scheduler = make_scheduler(optimizer, total_steps=10, warmup_ratio=0.2)
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_restore_brings_back_weights_optimizer_schedule_and_random_states(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _setup()
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), every=3, accelerator=accelerator, stage="sft")
    assert ckpt.due(3) and not ckpt.due(2) and not ckpt.due(0)
    generator = torch.Generator().manual_seed(7)
    ckpt.save(
        3,
        modules={"policy": model},
        optimizers={"policy": optimizer},
        schedulers={"policy": scheduler},
        state={"epoch": 1, "batch": 3, "history": [{"step": 1.0, "loss": 2.5}]},
        tensors={"epoch_generator": generator.get_state()},
    )
    # what comes next in an uninterrupted run
    after = (random.random(), float(np.random.rand()), torch.rand(1).item())
    _train_step(model, optimizer, scheduler)
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected_lr = scheduler.get_last_lr()

    fresh, fresh_opt, fresh_sched = _setup(seed=1)  # other initial weights: all must be overwritten
    # the frozen part is not in the checkpoint: it comes from the model artifact the step starts from
    fresh.model.embed_tokens.load_state_dict(model.model.embed_tokens.state_dict())
    restored = ckpt.restore(
        modules={"policy": fresh}, optimizers={"policy": fresh_opt}, schedulers={"policy": fresh_sched}
    )
    assert restored is not None and restored.step == 3
    assert restored.state == {"epoch": 1, "batch": 3, "history": [{"step": 1.0, "loss": 2.5}]}
    assert torch.equal(restored.tensors["epoch_generator"], generator.get_state())
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == after
    _train_step(fresh, fresh_opt, fresh_sched)
    for name, value in fresh.named_parameters():
        assert torch.equal(value, expected[name]), name
    assert fresh_sched.get_last_lr() == expected_lr


def test_only_trainable_weights_are_saved_and_the_manifest_comes_last(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _setup()
    ckpt = Checkpointer(str(tmp_path), every=1, accelerator=accelerator, stage="dpo")
    uri = ckpt.save(1, modules={"policy": model}, optimizers={"policy": optimizer}, state={})
    from safetensors.torch import load_file

    saved = load_file(Path(uri) / "modules" / "policy.safetensors")
    assert "model.embed_tokens.weight" not in saved
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    manifest = storage.read_manifest(uri)
    assert manifest is not None and "state.json" in manifest and "optimizers/policy.pt" in manifest


def test_an_incomplete_checkpoint_is_never_resumed(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer, _ = _setup()
    ckpt = Checkpointer(str(tmp_path), every=2, accelerator=accelerator, stage="dpo")
    ckpt.save(2, modules={"policy": model}, optimizers={"policy": optimizer}, state={"n": 2})
    newer = Path(ckpt.save(4, modules={"policy": model}, optimizers={"policy": optimizer}, state={"n": 4}))
    (newer / storage.MANIFEST).unlink()  # killed before its manifest was written
    restored = ckpt.restore(modules={"policy": model}, optimizers={"policy": optimizer})
    assert restored is not None and restored.step == 2 and restored.state == {"n": 2}


def test_old_checkpoints_are_pruned(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer, _ = _setup()
    ckpt = Checkpointer(str(tmp_path), every=1, accelerator=accelerator, stage="ppo", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, modules={"policy": model}, optimizers={"policy": optimizer}, state={})
    assert ckpt.complete() == [2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


def test_a_checkpoint_of_another_stage_or_world_size_is_refused(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer, _ = _setup()
    Checkpointer(str(tmp_path), every=1, accelerator=accelerator, stage="sft").save(
        1, modules={"policy": model}, optimizers={"policy": optimizer}, state={}
    )
    with pytest.raises(ValueError, match="'sft' checkpoint, not 'dpo'"):
        Checkpointer(str(tmp_path), every=1, accelerator=accelerator, stage="dpo").restore(
            modules={"policy": model}, optimizers={"policy": optimizer}
        )
    state = tmp_path / "step-00000001" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 4}))
    (tmp_path / "step-00000001" / storage.MANIFEST).unlink()
    storage.upload_dir(tmp_path / "step-00000001", str(tmp_path / "step-00000001"))  # re-manifest the edit
    with pytest.raises(ValueError, match="written by 4 processes"):
        Checkpointer(str(tmp_path), every=1, accelerator=accelerator, stage="sft").restore(
            modules={"policy": model}, optimizers={"policy": optimizer}
        )


def test_disabled_and_bad_settings(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    off = Checkpointer("", every=10, accelerator=accelerator, stage="sft")
    assert not off.enabled and not off.due(10)
    assert off.restore(modules={}, optimizers={}) is None
    assert (
        Checkpointer(str(tmp_path), every=0, accelerator=accelerator, stage="sft").restore(
            modules={}, optimizers={}
        )
        is None
    )
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        Checkpointer(str(tmp_path), every=-1, accelerator=accelerator, stage="sft")
    with pytest.raises(ValueError, match="unsupported"):
        Checkpointer("gs://bucket/ckpt", every=1, accelerator=accelerator, stage="sft")


def test_checkpoints_on_s3(s3, tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler = _setup()
    _train_step(model, optimizer, scheduler)
    ckpt = Checkpointer(s3.uri("runs/dpo/checkpoints"), every=1, accelerator=accelerator, stage="dpo", keep=1)
    for step in (1, 2):
        ckpt.save(
            step,
            modules={"policy": model},
            optimizers={"policy": optimizer},
            schedulers={"s": scheduler},
            state={"step": step},
        )
    assert ckpt.complete() == [2]
    assert not [k for k in s3.list_keys("runs/dpo/checkpoints/") if "step-00000001" in k]
    fresh, fresh_opt, fresh_sched = _setup(seed=3)
    restored = ckpt.restore(
        modules={"policy": fresh}, optimizers={"policy": fresh_opt}, schedulers={"s": fresh_sched}
    )
    assert restored is not None and restored.state == {"step": 2}
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name
