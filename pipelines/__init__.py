"""preftune's KFP pipelines, by name."""

from preftune.pipelines import dpo, rlhf
from preftune.pipelines.dpo import dpo_pipeline
from preftune.pipelines.rlhf import rlhf_pipeline

#: Pipeline name (as used by `preftune run NAME`) -> pipeline function.
PIPELINES = {"dpo": dpo_pipeline, "rlhf": rlhf_pipeline}

#: Pipeline name -> value rules for its parameters.
RULES = {"dpo": dpo.PARAMETER_RULES, "rlhf": rlhf.PARAMETER_RULES}

__all__ = ["PIPELINES", "RULES", "dpo_pipeline", "rlhf_pipeline"]
