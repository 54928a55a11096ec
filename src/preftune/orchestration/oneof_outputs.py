"""``dsl.OneOf`` artifacts under kfp.local: the output of whichever branch ran.

On a cluster KFP resolves a ``dsl.OneOf`` of artifacts to the output of the branch that ran. kfp.local (2.17)
does so for parameters only: a condition group whose output is a OneOf of artifacts fails with "Expected 1
artifact in ArtifactSelectorSpec". The compare pipeline needs artifacts through OneOf (each method's branch or
its skip stand-in), so a local run resolves them here the way the parameter case already does: the one selector
whose producer ran. Installed only for the duration of a run, by :class:`.runner.LocalExecution`.
"""

from __future__ import annotations

from typing import Any


def dag_output_artifacts(cls: Any, dag_outputs_spec: Any, io_store: Any) -> dict[str, Any]:
    """A DAG's output artifacts (kfp.local's ``OrchestratorUtils.get_dag_output_artifacts``), each from the one
    artifact selector whose producer task ran; refuses none or several, as KFP does for parameters."""
    outputs: dict[str, Any] = {}
    for key, spec in dag_outputs_spec.artifacts.items():
        found = []
        for selector in spec.artifact_selectors:
            try:
                found.append(
                    io_store.get_task_output(selector.producer_subtask, selector.output_artifact_key)
                )
            except (KeyError, ValueError):  # that branch did not run
                continue
        if len(found) != 1:
            producers = [s.producer_subtask for s in spec.artifact_selectors]
            raise ValueError(
                f"output artifact {key!r}: {len(found)} of the branches {producers} produced it; dsl.OneOf needs "
                "exactly one"
            )
        outputs[key] = found[0]
    return outputs
