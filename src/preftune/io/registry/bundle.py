"""A version as it is published: a self-contained local copy of the candidate, with lineage, metrics and card.

Both backends publish the same bundle, so a version has the same files wherever it lives: the model (an
adapter chain merged into full weights, so a version never depends on pipeline artifacts that may be
garbage-collected), ``lineage.json`` with a ``registry`` section, ``metrics.json`` and ``README.md`` (the
model card) with a "Registry" section.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.io import storage
from preftune.io.registry.interface import RegistryError, dumps, loads, now

#: Writes the full weights and tokenizer of the adapter in the first directory into the second.
Merge = Callable[[Path, Path], None]


def new_record(
    model: str, candidate: str, metrics: dict[str, Any], run_id: str, decision: dict[str, Any] | None
) -> dict[str, Any]:
    """What the registry records about one promotion (the version number comes when it is committed)."""
    return {
        "model_name": model,
        "promotion_id": uuid.uuid4().hex,
        "run_id": run_id,
        "promoted_at": now(),
        "source_uri": str(candidate),
        "metrics": dict(metrics),
        "decision": decision,
        "merged": False,
    }


def assemble(candidate: str, bundle: Path, merge_adapters: bool, merge: Merge | None) -> bool:
    """A local, self-contained copy of the candidate in ``bundle``; True when an adapter chain was merged into
    full weights."""
    source = storage.local_path(candidate)  # s3: a verified copy in the download cache
    if not source.is_dir():
        raise FileNotFoundError(f"candidate model {candidate!r} is not a directory")
    if not (merge_adapters and (source / "adapter_config.json").is_file()):
        storage.download(str(source), bundle)  # verified copy; refuses links out of the candidate
        return False
    if merge is None:
        raise RegistryError(
            f"candidate {candidate!r} is a LoRA adapter and merging it needs the model: promote it with "
            "preftune.eval.promotion.promote, or pass merge_adapters=False to publish the adapter as it is "
            "(the version then depends on its parent models' artifacts)"
        )
    merge(source, bundle)
    for name in ("lineage.json", "README.md"):
        if (source / name).is_file():
            storage.download(str(source / name), bundle)
    return True


def model_card(previous_card: str, record: dict[str, Any]) -> str:
    """The candidate's model card with a "Registry" section: who promoted it, on which metrics and checks."""
    metrics = "\n".join(f"| {k} | {v} |" for k, v in sorted(record["metrics"].items()))
    reasons = "\n".join(f"- {r}" for r in (record.get("decision") or {}).get("reasons", []))
    return (
        f"{previous_card.rstrip()}\n\n## Registry\n\n"
        f"Promoted to `{record['model_name']}` by run `{record['run_id'] or '-'}` at {record['promoted_at']} "
        f"(promotion `{record['promotion_id']}`; the version number is in the registry's champion pointer).\n"
        f"{'Adapters were merged into full weights for the registry.' if record['merged'] else ''}\n\n"
        f"| metric | value |\n|---|---|\n{metrics}\n\n" + (f"Gate:\n\n{reasons}\n" if reasons else "")
    )


def describe(bundle: Path, record: dict[str, Any]) -> None:
    """Add what the registry knows to the bundle: lineage, ``metrics.json`` and a model card section."""
    lineage_file = bundle / "lineage.json"
    lineage = loads(lineage_file.read_bytes()) if lineage_file.is_file() else None
    lineage = lineage or {"stage": "external", "base_model": record["source_uri"], "chain": []}
    lineage["registry"] = {k: record[k] for k in ("model_name", "promotion_id", "run_id", "promoted_at")}
    lineage["registry"]["source_uri"] = record["source_uri"]
    if record["merged"]:
        lineage["adapter"] = False
    lineage_file.write_bytes(dumps(lineage))
    (bundle / "metrics.json").write_bytes(dumps(record["metrics"]))
    card = bundle / "README.md"
    previous = card.read_text(encoding="utf-8") if card.is_file() else f"# {record['model_name']}\n"
    card.write_text(model_card(previous, record), encoding="utf-8")
