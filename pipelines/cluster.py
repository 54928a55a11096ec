"""How each task runs on a Kubeflow cluster: GPUs, node pool, credentials, shared memory, retries, timeouts.

Settings are fixed at compile time (see preftune.launch.platform and `preftune compile --help`). The local runner
ignores all of them, so the same pipeline runs on a laptop.
"""

from kfp import kubernetes
from kfp.dsl import PipelineTask

from preftune.launch import platform


def use_object_storage(task: PipelineTask) -> PipelineTask:
    """S3 credentials from the Secret and the endpoint from the ConfigMap, both optional.

    Optional, so clusters that grant storage through instance roles (IRSA, workload identity) need neither.
    """
    kubernetes.use_secret_as_env(
        task, secret_name=platform.s3_secret(), secret_key_to_env=platform.s3_secret_keys(), optional=True
    )
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=platform.S3_CONFIG_MAP,
        config_map_key_to_env={
            "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
        },
        optional=True,
    )
    return task


def data_step(task: PipelineTask) -> PipelineTask:
    """A CPU step that reads and writes object storage."""
    return use_object_storage(task)


def training_step(task: PipelineTask) -> PipelineTask:
    """A GPU step: accelerator request, GPU pool, taint toleration, /dev/shm, retries and a timeout."""
    use_object_storage(task)
    count = platform.accelerator_count()
    if count > 0:
        task.set_accelerator_type(platform.accelerator_type()).set_accelerator_limit(count)
        label, value = platform.GPU_NODE_LABEL
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
        kubernetes.add_toleration(task, key=platform.GPU_TAINT_KEY, operator="Exists", effect="NoSchedule")
    # data loader workers share tensors through /dev/shm, which is 64 MiB in a default pod
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    # a preempted or evicted pod is retried; later attempts resume from the step's checkpoints
    task.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    kubernetes.set_timeout(task, seconds=platform.training_timeout())
    return task
