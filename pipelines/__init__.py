"""preftune's KFP pipelines, by name."""

from preftune.pipelines import dpo
from preftune.pipelines.dpo import dpo_pipeline

#: Pipeline name (as used by `preftune run NAME`) -> pipeline function.
PIPELINES = {"dpo": dpo_pipeline}

#: Pipeline name -> value rules for its parameters.
RULES = {"dpo": dpo.PARAMETER_RULES}

__all__ = ["PIPELINES", "RULES", "dpo_pipeline"]
