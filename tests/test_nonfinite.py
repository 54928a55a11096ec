"""Issue 15, item 1: a checkpoint holds only finite weights, and non-finite gradients are never applied.

The case found: a huge learning rate made DPO's gradients infinite at a step whose loss was still finite; only the
loss was checked, the infinite gradients (clipped by an infinite norm: NaN) were applied, and the "last good state"
saved at the next step's NaN loss held NaN weights, from which every retry resumed and failed again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import make_policy_dir, pair_rows, write_jsonl

from preftune.train.checkpoint import Checkpointer, NonFiniteStateError
from preftune.train.dpo import DPOConfig, train_dpo
from preftune.train.engine import NonFiniteLossError, checked_gradients
from preftune.train.loop import make_accelerator, make_optimizer

#: With LoRA on the tiny policy, lr 1e8 keeps step 2's loss finite (0.709) while its gradients are NaN.
HUGE = 1e8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("nonfinite")
    return make_policy_dir(tmp / "policy"), write_jsonl(tmp / "pairs.jsonl", pair_rows(16))


def _config(checkpoints: Path, learning_rate: float) -> DPOConfig:
    return DPOConfig(
        learning_rate=learning_rate,
        batch_size=2,
        max_steps=6,
        warmup_ratio=0.0,
        checkpoint_uri=str(checkpoints),
        checkpoint_every=1,
        logging_steps=1,
    )


def _stop(base: str, pairs: str, out: Path, checkpoints: Path) -> str:
    with pytest.raises(NonFiniteLossError) as stopped:
        train_dpo(
            base, pairs, pairs, str(out / "model"), str(out / "report.html"), _config(checkpoints, HUGE)
        )
    return str(stopped.value)


def test_infinite_gradients_at_a_finite_loss_stop_before_the_update(
    data: tuple[str, str], tmp_path: Path
) -> None:
    base, pairs = data
    checkpoints = tmp_path / "checkpoints"
    message = _stop(base, pairs, tmp_path / "run", checkpoints)

    # the step whose loss is finite but whose gradients are not is named, and was not applied
    assert re.search(
        r"gradients are not finite \(norm (nan|inf)\) though the loss \(0\.7\d+\) is at step 2", message
    )
    assert "the step was not applied" in message
    # the last good state is named only after it was read back; the error says it is deterministic and what to do
    assert (
        "the last good state (step 1) is saved in" in message
        and "read back: its weights are finite" in message
    )
    assert "deterministic: a retry with the same settings stops here again" in message
    assert "Lower the learning rate" in message and "rerun with the same checkpoint_uri" in message
    saved = sorted(p.name for p in checkpoints.iterdir())
    assert saved == ["step-00000001"], "nothing after the last good step was written"
    weights = load_file(str(checkpoints / "step-00000001" / "modules" / "policy.safetensors"))
    assert weights and all(bool(torch.isfinite(w).all()) for w in weights.values())

    # a retry resumes from that state, not from NaN weights: its step-2 loss is the same finite value, and it stops
    # there again, deterministically, before any update
    again = _stop(base, pairs, tmp_path / "again", checkpoints)
    assert again.split(";")[0] == message.split(";")[0]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000001"]

    # what the error says to do works: a lower learning rate (afresh, since step 1 already moved too far) finishes
    out = tmp_path / "lower"
    metrics = train_dpo(
        base, pairs, pairs, str(out / "model"), str(out / "report.html"), _config(tmp_path / "fresh", 1e-3)
    )
    assert metrics["steps"] == 6.0 and metrics["resumed_from_step"] == 0.0
    final = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in final.values())


def test_a_resume_puts_the_configured_learning_rate_in_force() -> None:
    from preftune.train.engine.services import retarget_learning_rate
    from preftune.train.loop import make_scheduler

    def schedule(lr: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        optimizer = make_optimizer(torch.nn.Linear(2, 2), lr, 0.0)
        return optimizer, make_scheduler(optimizer, 10, 0.2)

    saved_opt, saved_sched = schedule(1e8)
    for _ in range(3):
        saved_opt.step()
        saved_sched.step()
    optimizer, scheduler = schedule(1e-3)
    optimizer.load_state_dict(saved_opt.state_dict())
    scheduler.load_state_dict(saved_sched.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e8 * 7 / 8)  # what the checkpoint ran with
    retarget_learning_rate(optimizer, 1e-3, scheduler)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 7 / 8)  # the same point of the schedule
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 6 / 8)
    unchanged_opt, unchanged_sched = schedule(1e8)
    unchanged_opt.load_state_dict(saved_opt.state_dict())
    unchanged_sched.load_state_dict(saved_sched.state_dict())
    retarget_learning_rate(unchanged_opt, 1e8, unchanged_sched)  # a plain resume: nothing moves
    assert unchanged_opt.param_groups[0]["lr"] == saved_opt.param_groups[0]["lr"]


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path: Path) -> None:
    accelerator = make_accelerator("fp32")
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, 1e-3, 0.0)
    checkpointer = Checkpointer(str(tmp_path), 1, accelerator, stage="sft")
    checkpointer.save(1, modules={"m": model}, optimizers={"m": optimizer}, state={})
    checkpointer.verify(str(tmp_path / "step-00000001"))
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    with pytest.raises(
        NonFiniteStateError,
        match="sft: the state of step 2 is not saved: the m weight weight is not finite; the newest complete checkpoint is .*step-00000001",
    ):
        checkpointer.save(2, modules={"m": model}, optimizers={"m": optimizer}, state={})
    assert checkpointer.complete() == [1], "nothing was written"


def test_checked_gradients_clips_or_reports_a_non_finite_norm() -> None:
    accelerator = make_accelerator("fp32")
    layer = torch.nn.Linear(2, 1)
    params = list(layer.parameters())
    layer(torch.ones(1, 2)).sum().mul(10.0).backward()
    assert checked_gradients(accelerator, params, 1.0) is None
    assert float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))) == pytest.approx(
        1.0
    )
    params[0].grad[0, 0] = float("inf")
    assert checked_gradients(accelerator, params, 0.0) == float("inf")  # no clipping asked: still checked
    assert checked_gradients(accelerator, params, 1.0) is not None
