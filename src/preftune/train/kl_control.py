"""KL controllers: how strongly PPO's shaped reward pulls the policy back towards the reference.

RLHF's per-token reward subtracts ``kl_coef * (log pi - log ref)``. A fixed coefficient is simplest; the adaptive
controller of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") moves the coefficient so
the measured KL tracks a target: after each rollout batch,

    error = clip(KL / target - 1, -0.2, 0.2)
    kl_coef <- kl_coef * (1 + error * n_steps / horizon)

where ``KL`` is the mean per-sequence KL of the batch and ``n_steps`` the number of sequences in it. Above
target the coefficient grows, below it shrinks; the clip bounds how fast it can move.
"""

from __future__ import annotations

from typing import Any

from preftune.config.ppo import KL_CONTROLLERS


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Nothing to adapt; returns the coefficient."""
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "fixed")
        self.value = float(state["value"])


class AdaptiveKLController:
    """The proportional controller of Ziegler et al. 2019 (see the module docstring)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef <= 0:
            raise ValueError(f"init_kl_coef must be positive for the adaptive controller, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target KL must be positive, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient after a batch of ``n_steps`` sequences whose mean KL was ``current_kl``."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "adaptive")
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


KLController = FixedKLController | AdaptiveKLController


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"state of a {state.get('kind')!r} KL controller cannot load into a {kind!r} one")


def make_kl_controller(kind: str, kl_coef: float, target: float, horizon: int) -> KLController:
    """``fixed`` (constant ``kl_coef``) or ``adaptive`` (starts at ``kl_coef``, tracks ``target``)."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; expected one of {', '.join(KL_CONTROLLERS)}")
