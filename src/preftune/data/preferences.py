"""Import pairwise preference feedback into the preference-pair datasets that DPO and the reward model read.

Accepted rows: ``{"prompt", "chosen", "rejected", "margin"?}`` with chosen/rejected as text or one assistant
message, or TRL-style whole conversations (the prompt is then the messages they share). Other columns (annotator,
comments, scores) are kept in ``meta``. Ranked lists and scalar ratings are not converted to pairs yet.
"""

from __future__ import annotations

from preftune.data import records, validation
from preftune.data.ingest import READ_REASONS, run_import

#: Every reason a preference row can be rejected for.
PREFERENCE_REASONS = (
    *READ_REASONS,
    "missing:prompt",
    "missing:chosen",
    "missing:rejected",
    "invalid:prompt",
    "invalid:chosen",
    "invalid:rejected",
    "invalid:margin",
    *validation.content_reasons(("prompt", "chosen", "rejected")),
)


def import_preferences(
    source: str,
    train_path: str,
    eval_path: str,
    rejected_path: str,
    report_path: str,
    *,
    eval_fraction: float = 0.1,
    seed: int = 0,
    min_chars: int = 1,
    max_chars: int = 8000,
) -> dict[str, float]:
    """Turn collected pairwise feedback (jsonl / json / csv / tsv / parquet file, directory or s3 prefix) into
    train and eval pair datasets, a rejected-rows file and an HTML validation report.

    The split is by prompt: all pairs for one prompt land in the same split, so no eval prompt is seen in
    training. Returns flat metrics (``rows_input``, ``rows_train``, ``rows_eval``, ``rows_rejected``,
    ``rejected_<reason>`` for every reason, ...). Raises DataFormatError for whole-file problems and ValueError
    when nothing usable remains or the eval split would be empty while ``eval_fraction > 0``.
    """
    return run_import(
        "preference import",
        source,
        train_path,
        eval_path,
        rejected_path,
        report_path,
        normalize=records.normalize_preference,
        validate=validation.validate_preferences,
        known_reasons=PREFERENCE_REASONS,
        eval_fraction=eval_fraction,
        seed=seed,
        min_chars=min_chars,
        max_chars=max_chars,
    )
