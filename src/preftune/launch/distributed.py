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
import dataclasses
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.io import storage
from preftune.launch import platform

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Stage:
    """How to call one training stage and what its arguments mean to a launcher.

    ``models`` are the arguments naming models (downloaded once per node before the workers load them).
    ``outputs`` maps the names of output arguments to ``"dir"`` or ``"file"``; ``optional_outputs`` likewise for
    outputs a call may leave out (None), such as DPO's and PPO's training snapshots. ``split_batches`` are the config
    fields holding a global batch that each worker takes its share of; ``divisible`` are global batch fields
    the trainer already splits itself (PPO), which only need to divide evenly. ``fsdp`` says whether the trainer
    is ready for FSDP: under FSDP its rank-0-only save must first gather the sharded weights on every rank
    (``accelerator.get_state_dict``), which none of the trainers do yet.
    """

    module: str
    function: str
    config_class: str
    models: tuple[str, ...]
    outputs: Mapping[str, str] = field(default_factory=lambda: {"model_dir": "dir", "report_path": "file"})
    optional_outputs: Mapping[str, str] = field(default_factory=dict)
    split_batches: tuple[str, ...] = ("batch_size", "eval_batch_size")
    divisible: tuple[str, ...] = ()
    fsdp: bool = False

    def output_kinds(self, kwargs: Mapping[str, Any]) -> dict[str, str]:
        """The outputs of one call: the required ones, and the optional ones it was given (not None)."""
        given = {k: v for k, v in self.optional_outputs.items() if kwargs.get(k) is not None}
        return {**self.outputs, **given}

    def load(self) -> tuple[Any, type]:
        module = importlib.import_module(self.module)
        return getattr(module, self.function), getattr(module, self.config_class)


STAGES: dict[str, Stage] = {
    "sft": Stage("preftune.train.sft", "train_sft", "SFTConfig", models=("base_model",)),
    "reward": Stage("preftune.train.reward", "train_reward_model", "RewardConfig", models=("sft_model",)),
    "dpo": Stage(
        "preftune.train.dpo",
        "train_dpo",
        "DPOConfig",
        models=("sft_model",),
        optional_outputs={"snapshot_dir": "dir"},
    ),
    "ppo": Stage(
        "preftune.train.ppo",
        "train_ppo",
        "PPOConfig",
        models=("sft_model", "reward_model"),
        optional_outputs={"snapshot_dir": "dir"},
        split_batches=(),
        divisible=("rollout_batch_size", "mini_batch_size"),
    ),
}


@dataclass
class Scale:
    """How wide a training step runs. The defaults keep today's behaviour: one process on one device.

    Attributes:
        num_gpus: Worker processes per node, one per GPU. 0 = every GPU the step's pod sees (one process on a
            pod without GPUs). On a machine without CUDA, a positive value starts that many CPU processes
            (gloo), which is how the tests run DDP.
        num_nodes: Nodes; more than 1 submits the step as a Kubeflow Trainer TrainJob.
        strategy: ``ddp`` (a full replica per GPU) or ``fsdp`` (parameters, gradients and optimizer state
            sharded across GPUs, through accelerate's FSDP plugin).
        trainjob_runtime: The ClusterTrainingRuntime a TrainJob refers to (Kubeflow Trainer's torch runtime).
        timeout_seconds: Longest a multi-process run or a TrainJob may take (0 = the step's training timeout).
        poll_seconds: How often the TrainJob's status is read.
    """

    num_gpus: int = 0
    num_nodes: int = 1
    strategy: str = "ddp"
    trainjob_runtime: str = "torch-distributed"
    timeout_seconds: int = 0
    poll_seconds: float = 15.0

    def check(self) -> None:
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0 (0 = all visible GPUs), got {self.num_gpus}")
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"distributed_strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"
            )
        if self.num_nodes > 1 and not self.trainjob_runtime.strip():
            raise ValueError("trainjob_runtime must name a ClusterTrainingRuntime when num_nodes > 1")
        if self.timeout_seconds < 0 or self.poll_seconds <= 0:
            raise ValueError("timeout_seconds must be >= 0 and poll_seconds > 0")

    def timeout(self) -> int:
        return self.timeout_seconds or platform.training_timeout()


class StageFailed(RuntimeError):
    """A stage's worker processes (or its TrainJob) failed; the message says where and why."""


# --------------------------------------------------------------------------------------------- the call itself


def is_artifact(value: Any) -> bool:
    """A KFP artifact (anything with ``path`` and ``uri``), which is a local path here and a URI elsewhere."""
    return hasattr(value, "path") and hasattr(value, "uri") and not isinstance(value, str | Path)


def stage_spec(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(STAGES)}") from None


def config_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def per_worker_config(stage: str, config: Mapping[str, Any], world_size: int) -> dict[str, Any]:
    """The config each of ``world_size`` workers runs with: global batch fields divided among them.

    A batch that does not divide evenly is refused rather than rounded, so the global batch is exactly the
    one asked for.
    """
    spec = stage_spec(stage)
    out = dict(config)
    for name in (*spec.split_batches, *spec.divisible):
        value = out.get(name)
        if value is None:
            continue
        if value % world_size:
            raise ValueError(
                f"{stage}: {name}={value} does not divide among {world_size} worker processes; choose a "
                f"multiple of {world_size}"
            )
    for name in spec.split_batches:
        if out.get(name) is not None:
            out[name] = out[name] // world_size
    return out


def call_json(stage: str, config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> str:
    """The stage call as the JSON the workers read (``kwargs`` already plain strings / numbers / None)."""
    return json.dumps({"stage": stage, "config": dict(config), "kwargs": dict(kwargs)}, sort_keys=True)


def _plain_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Artifacts as their local paths (this pod and the torchrun workers it starts share a filesystem)."""
    return {k: (v.path if is_artifact(v) else v) for k, v in kwargs.items()}


def invoke(stage: str, config: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, float]:
    """Call the stage's train function in this process."""
    function, config_class = stage_spec(stage).load()
    return function(config=config_class(**config), **kwargs)


# ------------------------------------------------------------------------------------------------- launching


def visible_gpus() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes_per_node(scale: Scale, gpus: int | None = None) -> int:
    """How many workers one node runs: ``num_gpus``, or every visible GPU (at least one) when it is 0."""
    gpus = visible_gpus() if gpus is None else gpus
    if scale.num_gpus == 0:
        return max(1, gpus)
    if gpus and scale.num_gpus > gpus:
        raise ValueError(f"num_gpus={scale.num_gpus} but this pod sees only {gpus} GPU(s)")
    return scale.num_gpus


def worker_env(strategy: str, *, cpu: bool) -> dict[str, str]:
    """Environment that tells accelerate, in every worker, how to distribute (its own settings, no code).

    ``ACCELERATE_USE_CPU`` makes accelerate treat a torchrun world without CUDA as multi-CPU (gloo) instead
    of ignoring it. FSDP goes through accelerate's FSDP plugin: FSDP2 (``fully_shard``) wrapping each
    transformer block (the model's ``_no_split_modules``), a full state dict for saving. accelerate shards on
    GPUs only; on CPU it runs these workers as DDP.
    """
    env = {"ACCELERATE_USE_CPU": "true"} if cpu else {}
    if strategy == "fsdp":
        env.update(
            {
                "ACCELERATE_USE_FSDP": "true",
                "FSDP_VERSION": "2",
                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                "FSDP_RESHARD_AFTER_FORWARD": "true",
                "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            }
        )
    return env


def torchrun_command(nproc: int, worker_args: Sequence[str]) -> list[str]:
    """One node's torchrun (``--standalone``: its own rendezvous on a free local port) running the worker."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--module",
        "preftune.launch.distributed",
        "worker",
        *worker_args,
    ]


def run_stage(stage: str, config: Any, *, scale: Scale | None = None, **kwargs: Any) -> dict[str, float]:
    """Run a training stage as wide as ``scale`` asks and return its metrics.

    ``kwargs`` are the stage function's arguments (``train_sft``'s, ``train_dpo``'s, ...), except ``config``.
    KFP artifacts may be passed as they are: their local path is used here and by local workers, their URI by
    a TrainJob's pods (which do not share this pod's filesystem).
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
    if scale.num_nodes > 1:
        from preftune.launch import trainjob

        return trainjob.run_stage_as_trainjob(stage, values, kwargs, scale)
    nproc = processes_per_node(scale)
    plain = _plain_kwargs(kwargs)
    if nproc == 1:
        if scale.strategy == "fsdp":
            log.info("%s: one process, so FSDP has nothing to shard; training without it", stage)
        return invoke(stage, values, plain)
    return _run_torchrun(stage, per_worker_config(stage, values, nproc), plain, nproc, scale)


def _run_torchrun(
    stage: str, config: Mapping[str, Any], kwargs: Mapping[str, Any], nproc: int, scale: Scale
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"preftune-{stage}-") as tmp:
        spec_path, result_path = Path(tmp) / "call.json", Path(tmp) / "metrics.json"
        spec_path.write_text(call_json(stage, config, kwargs), encoding="utf-8")
        cmd = torchrun_command(nproc, ["--spec", str(spec_path), "--result", str(result_path)])
        env = {**os.environ, **worker_env(scale.strategy, cpu=visible_gpus() == 0)}
        if visible_gpus() == 0 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
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
    """Download every ``s3://`` model among ``values``, and each adapter's parents, into the shared cache.

    Called by each node's local rank 0 before the other ranks start, so that eight workers of a node do not
    download one model eight times, or replace a cache entry another worker is reading.
    """
    from preftune.model import modeling

    pending = [v for v in values if isinstance(v, str) and v.startswith("s3://")]
    seen: set[str] = set()
    while pending:
        uri = pending.pop()
        if uri in seen:
            continue
        seen.add(uri)
        path = storage.local_path(uri)
        if path.is_dir() and modeling.is_adapter(str(path)):
            parent = modeling.adapter_parent(str(path))
            if parent.startswith("s3://"):
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
    # the same cpu flag the trainers' Accelerator reads, or this shared state would pin it to one process
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    with state.local_main_process_first():
        if state.is_local_main_process:
            prefetch([kwargs.get(name) for name in stage_spec(stage).models])
    with tempfile.TemporaryDirectory(prefix=f"preftune-{stage}-out-") as tmp:
        if output_uri:
            kwargs.update(_output_locals(stage, kwargs, Path(tmp)))
        metrics = invoke(stage, config, kwargs)
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
