"""KFP component: decide whether the evaluated candidate may become the champion."""

from kfp import dsl
from kfp.dsl import HTML, Input, Metrics, Output

from preftune.config.components import documented
from preftune.launch.platform import runtime_image


# The thresholds are GateConfig's fields, documented from their metadata.
@dsl.component(base_image=runtime_image(), install_kfp_package=False)
@documented("gate")
def gate(
    evaluation: Input[Metrics],
    report: Output[HTML],
    decision: dsl.OutputPath(str),
    champion_uri: str = "",
    min_win_rate_vs_champion: float = 0.5,
    max_kl: float = 10.0,
    min_diversity_ratio: float = 0.8,
    min_judge_confirmation: float = 0.5,
    length_controlled: bool = True,
) -> bool:
    """Check the evaluation against the promotion thresholds; the pipeline promotes only when this returns true.

    A missing or non-finite metric fails its check, so a broken evaluation never promotes. A negative threshold
    turns its check off. Use the result as ``with dsl.If(gate_task.outputs["Output"] == True):``.

    Args:
        evaluation: Metrics of the evaluate step: kl_candidate_reference, distinct_2_candidate,
            distinct_2_reference and, once a champion exists, win_rate_vs_champion (or its length-controlled
            lc_win_rate_vs_champion); with a held-out judge also judge_reward_gain and heldout_reward_gain.
        champion_uri: URI of the current champion (the champion step's output); when set, win_rate_vs_champion
            is required. Empty means there is no champion yet.

    Returns:
        report: The decision: each check with its value and threshold, and every metric (HTML).
        decision: The decision as JSON: promote, reasons, checks, champion_uri and the metrics it was taken on
            (the promote step records it in the registry).
        Output: True when every check passed (promote), False otherwise.
    """
    from preftune.config.components import configs_from

    (thresholds,) = configs_from("gate", locals())

    import dataclasses
    import json

    from preftune.eval.gate import run_gate

    result = run_gate(
        dict(evaluation.metadata), report.path, champion_uri=champion_uri, **dataclasses.asdict(thresholds)
    )
    with open(decision, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(result))
    for check in result["checks"]:
        print(("pass: " if check["passed"] else "FAIL: ") + check["reason"])
    return bool(result["promote"])
