"""What a GRPO / RLOO run reports: its metrics, and its HTML page (curves, sample answers, every iteration)."""

from __future__ import annotations

from typing import Any

from preftune.report import html as reports
from preftune.train.engine import Engine, Run
from preftune.train.loop import History, config_rows
from preftune.train.ppo.report import head_tail
from preftune.train.ppo.state import PPOState

_NAMES = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "rloo": "RLOO"}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def rollout_metrics(engine: Engine, run: Run, state: Any) -> dict[str, float]:
    """What every sampling stage reports from its iteration logs: the reward before any KL penalty (mean over
    the first and the last 20% of iterations), the KL to the SFT model (per answer, nats), entropy, length,
    distinct answers, KL blow-ups, generation time and speed, and the engine's resources."""
    rows = run.history.train
    reward_first, reward_last = head_tail([r["score"] for r in rows])
    last, seconds = rows[-1], state.rollout_seconds
    return {
        "reward_first": reward_first,
        "reward_last": reward_last,
        "reward_gain": reward_last - reward_first,
        "kl_last": last["kl"],
        "kl_max": max(r["kl"] for r in rows),
        "entropy_last": last["entropy"],
        "response_length_last": last["response_length"],
        "distinct_answers_last": last["distinct_answers"],
        "iterations": float(len(rows)),
        "kl_blowups": float(state.blowups),
        "train_seconds": run.seconds,
        "rollout_seconds": seconds,
        "rollout_tokens_per_second": state.rollout_tokens / seconds if seconds > 0 else 0.0,
        "resumed_from_iteration": float(run.resumed_from),
        **engine.resources(run.state.tokens),
    }


def group_metrics(engine: Engine, run: Run, state: PPOState) -> dict[str, float]:
    """The run's metrics (see ``train_grpo``)."""
    rows = run.history.train
    return {
        **rollout_metrics(engine, run, state),
        "clip_fraction_mean": _mean(state.all_clip),
        "zero_std_groups_mean": _mean([r["zero_std_groups"] for r in rows]),
    }


_CURVES: dict[str, str] = {
    "score": "Mean reward of the sampled answers (before any KL penalty)",
    "reward": "Mean reward after the KL penalty (= score when the KL acts in the loss)",
    "reward_model_score": "Mean reward-model score",
    "kl": "KL to the SFT model per answer (nats, mean of sum log pi - log ref)",
    "kl_coef": "KL coefficient",
    "entropy": "Policy entropy per token on its samples (nats)",
    "response_length": "Mean answer length (tokens, eos included)",
    "eos_rate": "Share of answers that ended with eos",
    "reward_std": "Mean standard deviation of the reward within a prompt's answers",
    "zero_std_groups": "Share of prompts whose answers all got one reward (no learning signal)",
    "distinct_answers": "Share of distinct answers within a prompt's answers",
    "loss": "Loss",
    "policy_loss": "Clipped policy loss",
    "kl_loss": "KL term of the loss (before kl_coef)",
    "clip_fraction": "Share of ratios in the clipped region",
    "approx_kl": "Approx. KL(sampling policy || updated policy) per token",
    "steps": "Optimisation steps in the iteration",
}


def curve_sections(history: History, curves: dict[str, str], x: str) -> list[tuple[str, str]]:
    """One chart per logged value: the known ones in ``curves`` order, then the rest by name."""
    names = [k for k in curves if any(k in r for r in history.train)]
    names += sorted({k for r in history.train for k in r} - set(curves) - {"step"})
    return [
        (name, reports.line_chart({name: history.series("train", name)}, curves.get(name, name), x))
        for name in names
    ]


def sample_section(state: Any) -> tuple[str, str]:
    samples = [row for it in sorted(state.samples, key=int) for row in state.samples[it]]
    return (
        "Sample answers (first and last iterations)",
        reports.table(samples, ["iteration", "prompt", "response", "score"]),
    )


def report(
    metrics: dict[str, float],
    history: History,
    config: Any,
    state: PPOState,
    prompts: int,
    truncated: int,
    rewards: str,
) -> str:
    """The HTML report: metrics, a curve per logged value, sample answers, every iteration, the data."""
    name = _NAMES[config.estimator]
    where = (
        "in the loss (k3 per token)"
        if config.kl_penalty == "loss"
        else "as a reward penalty (summed log-ratio)"
    )
    intro = (
        f"{name} for {int(metrics['iterations'])} iterations of {config.prompts_per_iteration} prompts x "
        f"{config.num_generations} answers on {prompts} unique prompts, rewarded by {rewards}: mean reward "
        f"{metrics['reward_first']:.3f} -> {metrics['reward_last']:.3f} (first vs last 20% of iterations), KL to "
        f"the SFT model {metrics['kl_last']:.3f} nats per answer at the end (max {metrics['kl_max']:.3f}), the KL "
        f"acting {where} with kl_coef {config.kl_coef}. {state.blowup_note}"
    )
    sections: list[tuple[str, str]] = [("Metrics", reports.key_values(metrics))]
    sections += curve_sections(history, _CURVES, "iteration")
    sections += [
        sample_section(state),
        ("Iterations", reports.table(history.train)),
        (
            "Data",
            reports.key_values(
                {"unique prompts": prompts, "prompts truncated": truncated, "rewards": rewards}
            ),
        ),
        ("Configuration", reports.table(config_rows(config))),
    ]
    return reports.page(f"{name} training", sections, intro=intro)
