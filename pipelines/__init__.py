"""preftune's KFP pipelines, by name."""

from preftune.pipelines.compare import compare_pipeline
from preftune.pipelines.dpo import dpo_pipeline
from preftune.pipelines.rlhf import rlhf_pipeline

#: Pipeline name (as used by `preftune run NAME`) -> pipeline function.
PIPELINES = {"dpo": dpo_pipeline, "rlhf": rlhf_pipeline, "compare": compare_pipeline}

__all__ = ["PIPELINES", "compare_pipeline", "dpo_pipeline", "rlhf_pipeline"]
