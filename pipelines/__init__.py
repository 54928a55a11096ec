"""preftune's KFP pipelines, by name."""

from preftune.pipelines import compare, dpo, rlhf
from preftune.pipelines.compare import compare_pipeline
from preftune.pipelines.dpo import dpo_pipeline
from preftune.pipelines.rlhf import rlhf_pipeline

#: Pipeline name (as used by `preftune run NAME`) -> pipeline function.
PIPELINES = {"dpo": dpo_pipeline, "rlhf": rlhf_pipeline, "compare": compare_pipeline}

#: Pipeline name -> value rules for its parameters.
RULES = {"dpo": dpo.PARAMETER_RULES, "rlhf": rlhf.PARAMETER_RULES, "compare": compare.PARAMETER_RULES}

__all__ = ["PIPELINES", "RULES", "compare_pipeline", "dpo_pipeline", "rlhf_pipeline"]
