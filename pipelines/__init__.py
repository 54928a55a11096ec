"""preftune's KFP pipelines, by name."""

from preftune.pipelines.dpo import dpo_pipeline

#: Pipeline name (as used by `preftune run NAME`) -> pipeline function.
PIPELINES = {"dpo": dpo_pipeline}

__all__ = ["PIPELINES", "dpo_pipeline"]
