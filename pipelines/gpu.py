"""GPU requests for pipeline tasks, fixed at compile time (see preftune.platform)."""

from kfp.dsl import PipelineTask

from preftune.platform import accelerator_count, accelerator_type


def request_accelerator(task: PipelineTask) -> PipelineTask:
    """Ask for the compile-time accelerator type and count; a count of 0 leaves the task on CPU."""
    count = accelerator_count()
    if count > 0:
        task.set_accelerator_type(accelerator_type()).set_accelerator_limit(count)
    return task
