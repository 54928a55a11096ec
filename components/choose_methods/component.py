"""KFP component: which alignment methods a compare run trains, from one comma-separated parameter."""

from typing import NamedTuple

from kfp import dsl

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def choose_methods(methods: str) -> NamedTuple(
    "Chosen", dpo=bool, rlhf=bool, grpo=bool, rloo=bool, kto=bool, online_dpo=bool
):
    """Turn a list of method names into one switch per method, for the compare pipeline's branches.

    KFP conditions compare values; they cannot ask whether a list contains a name. This step reads the list
    once, refuses an unknown name or fewer than two methods (so a typo in the Kubeflow UI fails the run here
    instead of silently training nothing), and outputs a boolean per method for each branch's dsl.If.

    Args:
        methods: Comma-separated methods to compare, two or more of dpo, rlhf, grpo, rloo, kto and online_dpo;
            "all" for every one.

    Returns:
        dpo: Train and evaluate DPO.
        rlhf: Train and evaluate RLHF (reward model + PPO).
        grpo: Train and evaluate GRPO against the reward model.
        rloo: Train and evaluate RLOO against the reward model.
        kto: Train and evaluate KTO.
        online_dpo: Train and evaluate online DPO, the reward model ranking its answers.
    """
    from collections import namedtuple

    from preftune.eval.comparison import METHODS, parse_methods

    chosen = parse_methods(methods)
    print(f"comparing: {', '.join(chosen)}")
    switches = namedtuple("Chosen", METHODS)
    return switches(*(m in chosen for m in METHODS))
