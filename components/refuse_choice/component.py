"""KFP component: the branch a pipeline takes when a choice parameter names no method it has."""

from kfp import dsl

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def refuse_choice(parameter: str, value: str, allowed: str) -> None:
    """Fail the run: a choice parameter (policy_optimizer, dpo_method) names no method the pipeline has.

    Each method is a dsl.If / dsl.Elif branch on the parameter's value. A run started from the Kubeflow UI is not
    checked against the allowed values before it starts (``preftune run`` is), so a misspelt value would take no
    branch, train nothing and still succeed. This step is the pipeline's dsl.Else: it fails the run, naming the
    parameter, the value and the values allowed.

    Args:
        parameter: The pipeline parameter that chose the method.
        value: The value the run was given.
        allowed: The values with a branch, comma-separated.
    """
    choices = ", ".join(a.strip() for a in allowed.split(","))
    raise ValueError(
        f"pipeline parameter {parameter}={value!r} names no method of this pipeline; use one of: {choices}"
    )
