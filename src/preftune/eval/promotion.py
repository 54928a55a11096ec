"""Promotion with the model in hand: an adapter candidate is merged into full weights, then published.

The registry (:mod:`preftune.io.registry`) is storage only and sits below the model layer, so it cannot load a
model. Merging the adapter chain (which needs transformers and peft) happens here, one layer up, and the
registry is handed the merge as a function; everything else about a promotion -- the gate check, staging,
verification, version numbering, the champion -- stays in the registry, on whichever backend ``registry_uri``
names (a local path or ``s3://`` for preftune's own layout, ``mlflow+http(s)://`` or ``mlflow://`` for MLflow's
model registry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.io import registry


def merge_adapter(source: Path, bundle: Path) -> None:
    """Write the full weights (every adapter in ``source``'s chain merged in) and its tokenizer to ``bundle``."""
    from preftune.model.modeling import load_causal_lm, load_tokenizer

    load_causal_lm(str(source)).save_pretrained(str(bundle), safe_serialization=True)
    load_tokenizer(str(source)).save_pretrained(str(bundle))


def promote(
    candidate_dir: str,
    registry_uri: str,
    model_name: str,
    metrics: dict[str, Any],
    *,
    run_id: str = "",
    decision: dict[str, Any] | None = None,
    merge_adapters: bool = True,
) -> dict[str, Any]:
    """Publish a candidate as the next registry version and make it the champion; returns the new pointer.

    :func:`preftune.io.registry.promote` with adapters merged into full weights (``merge_adapters``), so a
    version never depends on the pipeline artifacts of its parents. Raises RegistryError when the gate rejected
    the candidate or an upload cannot be verified, and StaleChampionError (a RegistryError) when the champion
    changed after the gate compared the candidate with it: the version is then published but not champion.
    """
    return registry.promote(
        candidate_dir,
        registry_uri,
        model_name,
        metrics,
        run_id=run_id,
        decision=decision,
        merge_adapters=merge_adapters,
        merge=merge_adapter,
    )
