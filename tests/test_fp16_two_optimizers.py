"""fp16 with two optimisers fed by one backward (PPO's policy and critic): gradients unscaled exactly once.

accelerate's fp16 on CPU has no gradient scaler, so the tests give an Accelerator a real torch GradScaler, as
accelerate does on CUDA (``native_amp``), and compare one SGD step with the same step in fp32 arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from preftune.train.engine import checked_gradient_groups, checked_gradients, step_optimizers

SCALE = 1024.0


@pytest.fixture
def fp16(monkeypatch: pytest.MonkeyPatch) -> Accelerator:
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    return accelerator


def _two_models(accelerator: Accelerator) -> tuple[list, list, torch.Tensor]:
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    models = list(accelerator.prepare(*models))  # forward in fp32, so that the step compares exactly
    accelerator.native_amp = True  # from here on the scaler scales the loss and steps the optimisers
    prepared = accelerator.prepare(*optimizers)
    x = torch.randn(3, 4)
    accelerator.backward(sum(m(x).square().sum() for m in models))
    return models, list(prepared), x


def _expected(x: torch.Tensor, max_norm: float) -> list[torch.Tensor]:
    """The weights after one plain SGD step with each model's gradient clipped on its own."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
    sum(m(x).square().sum() for m in models).backward()
    out = []
    for m in models:
        torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm)
        out.append((m.weight - 0.1 * m.weight.grad).detach())
    return out


@pytest.mark.parametrize("max_norm", [1e6, 0.5])
def test_policy_and_critic_step_once_unscaled_and_clipped_apart(fp16: Accelerator, max_norm: float) -> None:
    models, optimizers, x = _two_models(fp16)
    assert models[0].weight.grad.abs().max() > 10  # scaled by the loss scale
    norms = checked_gradient_groups(fp16, [list(m.parameters()) for m in models], max_norm)
    assert norms == [None, None]
    step_optimizers(fp16, optimizers)
    for model, want in zip(models, _expected(x, max_norm), strict=True):
        torch.testing.assert_close(model.weight.detach(), want)


def test_clipping_each_group_through_accelerate_unscales_twice(fp16: Accelerator) -> None:
    """What the helpers replace: accelerate's clip_grad_norm_ unscales every optimiser on each call."""
    models, _, _ = _two_models(fp16)
    checked_gradients(fp16, list(models[0].parameters()), 1.0)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        checked_gradients(fp16, list(models[1].parameters()), 1.0)


def test_stepping_accelerates_optimisers_in_turn_shrinks_the_second_update(fp16: Accelerator) -> None:
    """The other half: each wrapped optimiser updates the shared scaler, so the second is unscaled again."""
    models, optimizers, x = _two_models(fp16)
    fp16.unscale_gradients()
    for optimizer in optimizers:
        optimizer.step()
    first, second = _expected(x, 1e6)
    torch.testing.assert_close(models[0].weight.detach(), first)
    assert not torch.allclose(models[1].weight.detach(), second)


def test_without_a_scaler_each_group_is_checked_as_before() -> None:
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[float("inf"), 0.0]])
    model.bias.grad = torch.zeros(1)
    ok = torch.nn.Linear(2, 1)
    ok.weight.grad, ok.bias.grad = torch.ones(1, 2), torch.zeros(1)
    norms = checked_gradient_groups(accelerator, [list(ok.parameters()), list(model.parameters())], 1.0)
    assert norms[0] is None and norms[1] == float("inf")
