"""What a PPO run reports: its metrics, and its HTML page (curves, sample responses, every iteration)."""

from __future__ import annotations

import math

from preftune.config.ppo import PPOConfig
from preftune.report import html as reports
from preftune.train.engine import Engine, Run
from preftune.train.loop import History, config_rows
from preftune.train.ppo.state import PPOState


def head_tail(values: list[float], share: float = 0.2) -> tuple[float, float]:
    """Means of the first and of the last ``share`` of a series (at least one point each)."""
    k = max(1, math.ceil(len(values) * share))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def ppo_metrics(engine: Engine, run: Run, state: PPOState) -> dict[str, float]:
    """The run's metrics (see ``train_ppo``), from its iteration logs and PPO's own state."""
    rows = run.history.train
    reward_first, reward_last = head_tail([r["score"] for r in rows])
    last, clips = rows[-1], state.all_clip
    seconds = state.rollout_seconds
    return {
        "reward_first": reward_first,
        "reward_last": reward_last,
        "reward_gain": reward_last - reward_first,
        "kl_last": last["kl"],
        "kl_max": max(r["kl"] for r in rows),
        "entropy_last": last["entropy"],
        "clip_fraction_mean": sum(clips) / len(clips) if clips else 0.0,
        "value_loss_last": next((r["value_loss"] for r in reversed(rows) if "value_loss" in r), float("nan")),
        "explained_variance_last": last["explained_variance"],
        "response_length_last": last["response_length"],
        "iterations": float(len(rows)),
        "early_stops": float(state.early_stops),
        "kl_blowups": float(state.blowups),
        "train_seconds": run.seconds,
        "rollout_seconds": seconds,
        "rollout_tokens_per_second": state.rollout_tokens / seconds if seconds > 0 else 0.0,
        "resumed_from_iteration": float(run.resumed_from),
        **engine.resources(run.state.tokens),
    }


# ------------------------------------------------------------------------------------------------------- report

#: Each logged value's section heading and chart title.
_CURVES: dict[str, tuple[str, str]] = {
    "score": ("Reward-model score", "Mean reward-model score of the sampled responses"),
    "reward": ("Shaped reward", "Mean shaped reward per response (normalised score - kl_coef x KL)"),
    "kl": ("KL to the SFT model", "KL to the SFT model per response (nats, mean of sum log pi - log ref)"),
    "kl_coef": ("KL coefficient", "KL coefficient (adaptive controller)"),
    "entropy": ("Policy entropy", "Policy entropy per token on its samples (nats)"),
    "response_length": ("Response length", "Mean response length (tokens, eos included)"),
    "eos_rate": ("Responses ending with eos", "Share of responses that ended with eos"),
    "policy_loss": ("Policy loss", "Clipped policy loss"),
    "value_loss": ("Value loss", "Clipped value loss"),
    "clip_fraction": ("Policy clip fraction", "Share of tokens whose ratio was clipped"),
    "value_clip_fraction": ("Value clip fraction", "Share of tokens whose value was clipped"),
    "approx_kl": ("Update size", "Approx. KL(rollout policy || updated policy) per token"),
    "explained_variance": ("Critic explained variance", "Critic explained variance of the returns"),
    "early_stop": ("Early-stopped updates", "Updates stopped early on max_approx_kl (1 = yes)"),
    "ppo_steps": ("Optimisation steps", "Optimisation steps in the iteration"),
    "lr": ("Learning rate", "Policy learning rate (linear decay to a tenth)"),
    "kl_blowup": (
        "Stopped at the KL bound",
        "1 at the iteration whose rollout KL passed max_kl (training stopped)",
    ),
}


def _heading(name: str) -> str:
    """A readable heading for a logged value with no entry in _CURVES (``score_std`` -> "Score std")."""
    return name.replace("_", " ").capitalize()


def report(
    metrics: dict[str, float],
    history: History,
    config: PPOConfig,
    state: PPOState,
    prompts: int,
    truncated: int,
) -> str:
    """The HTML report: metrics, a curve per logged value, sample responses, every iteration, the data."""
    samples = [row for it in sorted(state.samples, key=int) for row in state.samples[it]]
    intro = (
        f"PPO for {int(metrics['iterations'])} iterations of {config.rollout_batch_size} rollouts on {prompts} "
        f"unique prompts: mean reward-model score {metrics['reward_first']:.3f} -> {metrics['reward_last']:.3f} "
        f"(first vs last 20% of iterations), KL to the SFT model {metrics['kl_last']:.3f} nats per response at "
        f"the end (max {metrics['kl_max']:.3f}); updates stopped early in {int(metrics['early_stops'])} "
        f"iteration(s). {state.blowup_note}"
    )
    sections: list[tuple[str, str]] = [("Metrics", reports.key_values(metrics))]
    names = [k for k in _CURVES if any(k in r for r in history.train)]
    names += sorted({k for r in history.train for k in r} - set(_CURVES) - {"step"})
    for name in names:
        heading, title = _CURVES.get(name, (_heading(name), _heading(name)))
        chart = reports.line_chart({heading: history.series("train", name)}, title, "iteration")
        sections.append((heading, chart))
    sections += [
        (
            "Sample responses (first and last iterations)",
            reports.table(samples, ["iteration", "prompt", "response", "score"]),
        ),
        ("Iterations", reports.table(history.train)),
        ("Data", reports.key_values({"unique prompts": prompts, "prompts truncated": truncated})),
        ("Configuration", reports.table(config_rows(config))),
    ]
    return reports.page("PPO training", sections, intro=intro)
