"""KFP components: publish a gated candidate to the model registry, and look up the current champion."""

from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from preftune.launch.platform import runtime_image


@dsl.component(base_image=runtime_image(), install_kfp_package=False)
def promote(
    candidate: Input[Model],
    registry_uri: str,
    model_name: str,
    decision: str,
    metrics: Output[Metrics],
    run_id: str = "",
    merge_adapters: bool = True,
) -> str:
    """Publish the candidate as the next registry version and make it the champion; returns its URI.

    The files are staged and verified first and the version's manifest is written last, then the champion
    pointer moves: a promotion stopped at any point leaves the previous champion in place and no visible
    half-written version. Refuses a candidate the gate rejected, even when wired without a condition.

    Args:
        candidate: The model that passed the gate.
        registry_uri: Registry root: s3://bucket/prefix or a local directory; versions go to
            <registry_uri>/<model_name>/v<N>/.
        model_name: Name of the model in the registry (letters, digits, '.', '_', '-').
        decision: The gate step's decision output (JSON); its metrics are recorded with the version.
        run_id: Identifier of the pipeline run, recorded with the version (pass dsl.PIPELINE_JOB_ID_PLACEHOLDER).
        merge_adapters: Merge a LoRA adapter chain into full weights, so the version does not depend on the
            run's intermediate artifacts.

    Returns:
        metrics: The new version number and the metrics it was promoted on.
        Output: The URI of the new version, <registry_uri>/<model_name>/v<N>.
    """
    import json

    from preftune.eval.promotion import promote as publish
    from preftune.launch.metrics import log_metrics
    from preftune.launch.threads import limit_threads

    limit_threads()  # merging adapters runs on the CPUs this pod is given, not the node's

    verdict = json.loads(decision)
    pointer = publish(
        candidate.path,
        registry_uri,
        model_name,
        verdict.get("metrics", {}),
        run_id=run_id,
        decision=verdict,
        merge_adapters=merge_adapters,
    )
    numbers = {
        k: v for k, v in pointer["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    log_metrics(metrics, {"version": pointer["version"], **numbers})
    return pointer["uri"]
