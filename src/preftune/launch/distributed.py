"""Run a training stage on one process, on every GPU of one node (torchrun), or on several nodes (a TrainJob).

A component calls :func:`run_stage` with the same arguments it would pass to the stage's ``train_*`` function.
With one process the function runs right here, in the component's own process, as it always has. With more,
the workers are started by torchrun (``torch.distributed.run``), each running this module's ``worker`` entry
point on the same stage and arguments; accelerate inside the trainers sees the torchrun environment and
sets up DDP (or FSDP, through its FSDP plugin's environment settings), and gloo on CPU-only machines. With
more than one node, :mod:`preftune.launch.trainjob` hands the same call to a Kubeflow Trainer TrainJob, whose
torch-distributed runtime runs torchrun on every node. Nothing here launches processes by hand or talks to
``torch.distributed`` directly: torchrun and accelerate do that.

Batch sizes in a stage's config are global (what one process would see); each of ``W`` workers gets ``batch
/ W`` examples per step, so a run on 8 GPUs takes the same optimisation steps over the same examples as one
run on a single GPU. Rank 0 alone writes the model, the report and the metrics (the trainers guard their
saves with ``accelerator.is_main_process``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.io import storage
from preftune.launch import cleanup, devices, failures, platform, threads
from preftune.launch.devices import visible_gpus

# Scale and StageFailed stay importable from here: the components call ``run_stage(..., scale=Scale(...))``.
from preftune.launch.stages import (
    TORCHRUN_MODULE,
    WORKER_MODULE,
    Scale,
    StageFailed,
    call_json,
    config_dict,
    in_object_storage,
    is_artifact,
    per_worker_config,
    stage_spec,
    worker_env,
)
from preftune.report import tracking

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the call itself


def _plain_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Artifacts as their local paths (this pod and the torchrun workers it starts share a filesystem)."""
    return {k: (v.path if is_artifact(v) else v) for k, v in kwargs.items()}


def invoke(
    stage: str, config: Mapping[str, Any], kwargs: Mapping[str, Any], context: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Call the stage's train function in this process, live-tracked as its ``report_to`` asks (rank 0 only).

    ``context`` is what the launching step knows better than a worker: the global config (a worker's has its
    share of the batch) and the lineage as URIs (a worker sees local paths).
    """
    function, config_class = stage_spec(stage).load()
    with _tracked(stage, config, kwargs, context or {}):
        metrics = function(config=config_class(**config), **kwargs)
        tracking.log_final(metrics)
    return metrics


#: How a step passes its tracking context (global config, lineage URIs) to the torchrun workers it starts.
TRACKING_ENV = "PREFTUNE_TRACKING_CONTEXT"


def tracking_context(stage: str, values: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The stage's global config and its lineage: each input and output argument as a URI (or its value)."""
    spec = stage_spec(stage)
    outputs = {*spec.outputs, *spec.optional_outputs}
    lineage = {}
    for name, value in kwargs.items():
        text = value.uri if is_artifact(value) else value
        if isinstance(text, str) and text:
            lineage[f"{'output' if name in outputs else 'input'}.{name}"] = text
    return {"params": dict(values), "lineage": lineage}


#: Resolved in the step's pod (KFP_RUN_ID comes from its labels) and handed to a TrainJob's pods as values.
_JOB_ENV_PREFIXES = ("KFP_", "MLFLOW_EXPERIMENT_NAME")


def job_env(context: Mapping[str, Any]) -> dict[str, str]:
    """What a TrainJob's rank 0 needs to track as this step would: the context and the KFP run's ids."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_JOB_ENV_PREFIXES)}
    return {**env, TRACKING_ENV: json.dumps(context, default=str)}


def _tracked(
    stage: str, config: Mapping[str, Any], kwargs: Mapping[str, Any], context: Mapping[str, Any]
) -> contextlib.AbstractContextManager:
    """The stage's tracker on rank 0 (every rank runs the same loop; one of them reports)."""
    report_to = str(config.get("report_to", "none"))
    if os.environ.get("RANK", "0") != "0":
        report_to = "none"
    model_dir = kwargs.get("model_dir")
    return tracking.tracked(
        report_to,
        stage=stage,
        params=context.get("params") or config,
        lineage=context.get("lineage") or tracking_context(stage, config, kwargs)["lineage"],
        log_dir=Path(str(model_dir)) / "tensorboard" / stage if model_dir else None,
    )


# ------------------------------------------------------------------------------------------------- launching


def processes_per_node(scale: Scale, gpus: int | None = None) -> int:
    """How many workers one node runs: ``num_gpus``, or every visible GPU (at least one) when it is 0."""
    gpus = visible_gpus() if gpus is None else gpus
    if scale.num_gpus == 0:
        return max(1, gpus)
    if gpus and scale.num_gpus > gpus:
        raise ValueError(f"num_gpus={scale.num_gpus} but this pod sees only {gpus} GPU(s)")
    return scale.num_gpus


def torchrun_command(nproc: int, worker_args: Sequence[str]) -> list[str]:
    """One node's torchrun (``--standalone``: its own rendezvous on a free local port) running the worker."""
    return [
        sys.executable,
        *TORCHRUN_MODULE,
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--module",
        WORKER_MODULE,
        "worker",
        *worker_args,
    ]


def run_stage(stage: str, config: Any, *, scale: Scale | None = None, **kwargs: Any) -> dict[str, float]:
    """Run a training stage as wide as ``scale`` asks and return its metrics.

    ``kwargs`` are the stage function's arguments (``train_sft``'s, ``train_dpo``'s, ...), except ``config``.
    KFP artifacts may be passed as they are: their local path is used here and by local workers, their URI by
    a TrainJob's pods (which do not share this pod's filesystem). After success the stage's resumable
    checkpoints are removed unless ``scale.keep_checkpoints``.
    """
    scale = scale or Scale()
    scale.check()
    spec = stage_spec(stage)
    missing = [name for name in spec.outputs if name not in kwargs]
    if missing:
        raise ValueError(f"{stage}: missing output argument(s) {', '.join(missing)}")
    values = config_dict(config)
    if scale.strategy == "fsdp" and not spec.fsdp and (scale.num_nodes > 1 or processes_per_node(scale) > 1):
        raise ValueError(
            f"distributed_strategy='fsdp' is not supported by the {stage} trainer yet: it saves the model from "
            "rank 0 alone, which under FSDP needs the sharded weights gathered on every rank first; use 'ddp'"
        )
    with failures.not_retried(_output_uri(kwargs.get("model_dir"))):
        if scale.num_nodes > 1:
            from preftune.launch import trainjob

            context = tracking_context(stage, values, kwargs)
            metrics = trainjob.run_stage_as_trainjob(stage, values, kwargs, scale, extra_env=job_env(context))
        else:
            metrics = _run_on_this_node(stage, values, kwargs, scale, tracking_context(stage, values, kwargs))
    if not scale.keep_checkpoints:
        cleanup.remove_checkpoints(values.get("checkpoint_uri"))
    return metrics


def _output_uri(output: Any) -> str | None:
    """The URI of a step's model output (a KFP artifact or a plain path), which its retries share."""
    if output is None:
        return None
    return output.uri if is_artifact(output) else str(output)


def _run_on_this_node(
    stage: str, values: dict[str, Any], kwargs: Mapping[str, Any], scale: Scale, context: Mapping[str, Any]
) -> dict[str, float]:
    """One process here, or one torchrun worker per GPU of this pod."""
    if devices.in_kubernetes() and platform.trainjob_launchers():
        raise ValueError(
            f"{stage}: this step was compiled as a TrainJob launcher (preftune compile --trainjob-launchers), "
            "so its pod has no GPUs; run it with num_nodes > 1, or compile the pipeline without "
            "--trainjob-launchers to train in the step's own pod"
        )
    devices.check_gpus()
    nproc = processes_per_node(scale)
    plain = _plain_kwargs(kwargs)
    if nproc == 1:
        if scale.strategy == "fsdp":
            log.info("%s: one process, so FSDP has nothing to shard; training without it", stage)
        threads.limit_threads()
        return invoke(stage, values, plain, context)
    env = {TRACKING_ENV: json.dumps(context, default=str)}
    return _run_torchrun(stage, per_worker_config(stage, values, nproc), plain, nproc, scale, env)


def _run_torchrun(
    stage: str,
    config: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    nproc: int,
    scale: Scale,
    extra_env: Mapping[str, str],
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"preftune-{stage}-") as tmp:
        spec_path, result_path = Path(tmp) / "call.json", Path(tmp) / "metrics.json"
        spec_path.write_text(call_json(stage, config, kwargs), encoding="utf-8")
        cmd = torchrun_command(nproc, ["--spec", str(spec_path), "--result", str(result_path)])
        cpu = visible_gpus() == 0
        env = {**os.environ, **extra_env, **worker_env(scale.strategy, cpu=cpu)}
        if cpu:  # the workers share this container's CPUs (on GPUs each worker's threads only feed its GPU)
            env["OMP_NUM_THREADS"] = str(threads.thread_count(nproc))
        log.info("%s: starting %d workers with torchrun (%s)", stage, nproc, scale.strategy)
        code = _run_bounded(cmd, env, scale.timeout())
        if code != 0:
            raise StageFailed(_failure_message(stage, code, Path(tmp)))
        if not result_path.is_file():
            raise StageFailed(f"{stage}: the workers exited cleanly but rank 0 wrote no metrics")
        return json.loads(result_path.read_text(encoding="utf-8"))


def _run_bounded(cmd: Sequence[str], env: Mapping[str, str], timeout: float) -> int:
    """Run torchrun with its output in this step's log; past ``timeout`` stop it (SIGTERM, then SIGKILL).

    torchrun forwards SIGTERM to its workers, so nothing is left behind. A SIGTERM to this process (a
    cancelled run) is passed on the same way.
    """
    proc = subprocess.Popen(list(cmd), env=dict(env))

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward) if _main_thread() else None
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.error("workers still running after %ss; stopping them", timeout)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)
        raise StageFailed(f"training did not finish within {timeout} s") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:  # an exception (KeyboardInterrupt) while waiting
            proc.kill()
            proc.wait(timeout=60)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _failure_message(stage: str, code: int, tmp: Path) -> str:
    errors = sorted(tmp.glob("error.rank*.txt"), key=lambda p: int(p.stem.removeprefix("error.rank")))
    if errors:
        first = errors[0]
        rank = first.stem.removeprefix("error.rank")
        return f"{stage} failed on rank {rank}: {first.read_text(encoding='utf-8').strip()}"
    return f"{stage}: torchrun exited with code {code}; the workers' output above says why"


# --------------------------------------------------------------------------------------------------- workers


def prefetch(values: Sequence[Any]) -> None:
    """Download every model in object storage among ``values``, and each adapter's parents, into the shared cache.

    Called by each node's local rank 0 before the other ranks start, so that eight workers of a node do not
    download one model eight times, or replace a cache entry another worker is reading.
    """
    from preftune.model import modeling

    pending = [v for v in values if in_object_storage(v)]
    seen: set[str] = set()
    while pending:
        uri = pending.pop()
        if uri in seen:
            continue
        seen.add(uri)
        path = storage.local_path(uri)
        if path.is_dir() and modeling.is_adapter(str(path)):
            parent = modeling.adapter_parent(str(path))
            if in_object_storage(parent):
                pending.append(parent)


def _output_locals(stage: str, kwargs: Mapping[str, Any], root: Path) -> dict[str, str]:
    """Local paths for the outputs a TrainJob's call names (each null in its JSON: the step's paths are not here)."""
    spec = stage_spec(stage)
    return {name: str(root / name) for name in (*spec.outputs, *spec.optional_outputs) if name in kwargs}


def publish_outputs(
    stage: str, kwargs: Mapping[str, Any], metrics: Mapping[str, float], output_uri: str
) -> None:
    """Rank 0 of a TrainJob: copy the outputs to ``output_uri``; ``metrics.json`` last, as the done marker."""
    base = output_uri.rstrip("/")
    for name, kind in stage_spec(stage).output_kinds(kwargs).items():
        local = Path(kwargs[name])
        if kind == "dir" and (local.is_dir() or name in stage_spec(stage).outputs):
            storage.upload_dir(local, f"{base}/{name}")
        elif kind == "file" and local.is_file():
            storage.write_bytes(f"{base}/{name}", local.read_bytes())
    storage.write_bytes(f"{base}/metrics.json", json.dumps(dict(metrics), sort_keys=True).encode("utf-8"))


def worker(spec: Mapping[str, Any], *, result: str | None = None, output_uri: str | None = None) -> None:
    """One torchrun worker: run the stage; rank 0 writes the metrics (and, in a TrainJob, uploads outputs)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    stage, config, kwargs = spec["stage"], spec["config"], dict(spec["kwargs"])
    devices.check_gpus()
    # the same cpu flag the trainers' Accelerator reads, or this shared state would pin it to one process
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with state.local_main_process_first():
        if state.is_local_main_process:
            prefetch([kwargs.get(name) for name in stage_spec(stage).models])
    with tempfile.TemporaryDirectory(prefix=f"preftune-{stage}-out-") as tmp:
        if output_uri:
            kwargs.update(_output_locals(stage, kwargs, Path(tmp)))
        metrics = invoke(stage, config, kwargs, json.loads(os.environ.get(TRACKING_ENV) or "{}"))
        state.wait_for_everyone()
        if state.is_main_process:
            if output_uri:
                publish_outputs(stage, kwargs, metrics, output_uri)
            if result:
                storage.write_bytes(result, json.dumps(metrics, sort_keys=True).encode("utf-8"))


def _record_error(result: str | None, exc: BaseException) -> None:
    """Leave this rank's error where the launcher finds it, so the step fails with the cause, not an exit code."""
    if not result:
        return
    rank = os.environ.get("RANK", "0")
    path = Path(result).parent / f"error.rank{rank}.txt"
    with contextlib.suppress(OSError):  # best effort: the traceback is in the log either way
        path.write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m preftune.launch.distributed worker ...``: what torchrun runs in every worker process."""
    parser = argparse.ArgumentParser(prog="python -m preftune.launch.distributed", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="run one stage in this torchrun worker")
    source = w.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="file holding the stage call (JSON)")
    source.add_argument("--spec-json", help="the stage call itself (JSON)")
    w.add_argument("--result", help="where rank 0 writes the metrics (JSON)")
    w.add_argument("--output-uri", help="s3:// prefix rank 0 publishes the outputs and metrics to (TrainJob)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(args.spec).read_text(encoding="utf-8") if args.spec else args.spec_json)
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def run() -> None:
        try:
            worker(spec, result=args.result, output_uri=args.output_uri)
        except BaseException as exc:
            _record_error(args.result, exc)
            raise

    start = time.perf_counter()
    run()
    log.info("%s worker done in %.1f s", spec["stage"], time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
