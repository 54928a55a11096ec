"""How each task runs on a Kubeflow cluster: resources, GPUs, node pool, credentials, tracking, shared memory,
retries.

Settings are fixed at compile time (preftune.launch.platform, `preftune compile --help`) and each one is also
written into every step's pod as an environment variable, so the code in the pod sees what the pipeline was
compiled with. The local runner ignores resources and scheduling, so the same pipeline runs on a laptop.

Every step belongs to a class that sets its CPU and memory requests and limits (``preftune compile
--resources``): ``data`` (reading, validating, the registry), ``merge`` (promote, which merges adapters into full
weights in memory), ``train`` (SFT, reward model, DPO, PPO), ``evaluate`` (its own GPU count: it samples on
one GPU whatever the training steps use) and ``launcher`` (a training step compiled with
``--trainjob-launchers``: it submits a multi-node TrainJob and waits, holding no GPU).
"""

import contextlib
import functools
import inspect
from collections.abc import Iterator

from kfp import kubernetes
from kfp.dsl import PipelineTask

from preftune.launch import platform
from preftune.launch.devices import STEP_GPUS_ENV

#: Components whose class is not the default of the helper that wraps them.
STEP_CLASS = {"evaluate": "evaluate", "promote": "merge"}

#: The optional Secret naming the MLflow server (live tracking, the mlflow registry) and its credentials; each
#: of its keys becomes the environment variable of the same name, which the MLflow client reads itself.
MLFLOW_SECRET = "preftune-mlflow"
MLFLOW_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_EXPERIMENT_NAME",
)
#: The KFP run a pod belongs to, from its own metadata (KFP labels and annotates every pod of a run), so that a
#: tracking run links back to it; KFP itself sets KFP_POD_NAME, KFP_POD_UID and KFP_NAMESPACE.
KFP_RUN_FIELDS = {
    "KFP_RUN_ID": "metadata.labels['pipeline/runid']",
    "KFP_RUN_NAME": "metadata.annotations['pipelines.kubeflow.org/run_name']",
}


def step_class(task: PipelineTask, default: str) -> str:
    """The class of a task: from :data:`STEP_CLASS` by its component's name, else ``default``."""
    return STEP_CLASS.get(task.component_spec.name.replace("-", "_"), default)


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


def use_hub_settings(task: PipelineTask) -> PipelineTask:
    """HF_TOKEN from its Secret (optional: only gated models need one); offline switches when compiled so."""
    secret = platform.hf_token_secret()
    if secret:
        kubernetes.use_secret_as_env(
            task, secret_name=secret, secret_key_to_env={platform.HF_TOKEN_KEY: "HF_TOKEN"}, optional=True
        )
    if platform.offline():
        set_environment(task, dict.fromkeys(platform.OFFLINE_ENV, "1"))
    return task


def use_tracking(task: PipelineTask) -> PipelineTask:
    """MLflow's address and credentials from the optional Secret, and the KFP run and task the step belongs to.

    Optional, so a cluster without an MLflow server needs no Secret (``report_to`` none or tensorboard).
    """
    kubernetes.use_secret_as_env(
        task,
        secret_name=MLFLOW_SECRET,
        secret_key_to_env={key: key for key in MLFLOW_KEYS},
        optional=True,
    )
    for name, field_path in KFP_RUN_FIELDS.items():
        kubernetes.use_field_path_as_env(task, env_name=name, field_path=field_path)
    return task


def set_environment(task: PipelineTask, env: dict[str, str]) -> PipelineTask:
    """Set many environment variables at once.

    KFP's ``set_env_variable`` inspects the whole call stack on every call (to name itself in an error); called
    once per variable over ~500 variables it made importing the pipelines take ~20 s. One call checks that the
    task has a container, the rest go into the same dict.
    """
    if not env:
        return task
    first, *_ = env
    task.set_env_variable(first, env[first])
    task.container_spec.env.update(env)
    return task


def _common(task: PipelineTask, kind: str, gpus: int) -> PipelineTask:
    """What every step gets: storage and hub settings, the compiled settings as env, its class's resources."""
    use_object_storage(task)
    use_hub_settings(task)
    use_tracking(task)
    set_environment(
        task, {**platform.compiled_environment(), STEP_GPUS_ENV: str(gpus), "KFP_TASK_NAME": task.name}
    )
    resources = platform.step_resources(kind)
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    return task


@contextlib.contextmanager
def _cheap_caller_names() -> Iterator[None]:
    """KFP's task setters call ``inspect.stack()`` only to name themselves in an error, and that reads the source
    of every frame: ~0.1 s a call, ~190 calls across the three pipelines (20 s to import them). Inside this block
    the frames are listed without their source lines, which is all KFP reads."""
    original = inspect.stack
    inspect.stack = functools.partial(original, context=0)
    try:
        yield
    finally:
        inspect.stack = original


def data_step(task: PipelineTask, kind: str | None = None) -> PipelineTask:
    """A CPU step that reads and writes object storage (``merge`` class for promote)."""
    with _cheap_caller_names():
        return _common(task, kind or step_class(task, "data"), 0)


def training_step(task: PipelineTask, kind: str | None = None) -> PipelineTask:
    """A GPU step: accelerators, GPU pool and taint, a sized /dev/shm, retries and a timeout.

    ``kind`` is ``train`` or ``evaluate`` (default: by the component); a ``train`` step compiled with
    ``--trainjob-launchers`` is a ``launcher``: no GPU, no GPU node, small resources.
    """
    kind = kind or step_class(task, "train")
    if kind == "train" and platform.trainjob_launchers():
        kind = "launcher"
    gpus = {"train": platform.accelerator_count(), "evaluate": platform.evaluate_gpus()}.get(kind, 0)
    with _cheap_caller_names():
        _gpu_step(task, kind, gpus)
    return task


def _gpu_step(task: PipelineTask, kind: str, gpus: int) -> None:
    _common(task, kind, gpus)
    if gpus > 0:
        task.set_accelerator_type(platform.accelerator_type()).set_accelerator_limit(gpus)
        label, toleration = platform.gpu_node_label(), platform.gpu_toleration()
        if label:
            kubernetes.add_node_selector(task, label_key=label[0], label_value=label[1])
        if toleration:
            kubernetes.add_toleration(task, **toleration)
    if kind != "launcher":
        # data loader workers share tensors through /dev/shm (64 MiB in a default pod); memory-backed, it
        # counts against the step's memory limit, so it is sized
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=platform.shm_size()
        )
    # a preempted or evicted pod is retried and resumes from the step's checkpoints; an attempt after a
    # configuration or data error fails at once (preftune.launch.failures)
    task.set_retry(num_retries=3, backoff_duration="60s", backoff_factor=2.0, backoff_max_duration="3600s")
    kubernetes.set_timeout(task, seconds=platform.training_timeout())
